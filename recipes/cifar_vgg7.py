"""Train VGG-7 on CIFAR-10 for asynchronous execution (paper, section 5 and A.10).

    torchrun --nproc_per_node=N recipes/cifar_vgg7.py --K 64 --data-dir data
    python recipes/cifar_vgg7.py --K 64 --data-dir data          # one process
    python recipes/cifar_vgg7.py --eval-only --checkpoint run/last.pt --eval-K 512,64,8

Defaults are the paper's (SPEC 10, table 6): batch 64 (per process; the effective
batch is N x 64), 150 epochs, Adam lr 2e-4, weight decay 0, theta 0.2, IF neurons
(tau = inf), surrogate steepness 2, refractory dropout 0.7, one timestep of analog
input (pixels / 255 as currents), logits = output membrane potentials after the pass
(``readout="potential"``), training with ``stop="spiking_done"``. The paper trained
with K = 512 (its GPU's limit) and RS; this recipe trains at any K.

Choices where the paper is silent (written down here and in the JSON log):
- the input frame is delivered at once as the first forward step
  (``prioritize_input``; ``--queue-input`` makes the 3072 pixel currents compete for
  slots like spikes);
- output neurons integrate without a threshold (theta = 1e9, they never fire or
  reset), so the logits are the accumulated potentials; ``--output-threshold 0.2``
  makes them ordinary IF neurons;
- momentum noise for MS: 0.1 (the paper only says "large"); max forward steps per pass:
  2 x (neurons + inputs) / K (with refractoriness a pass needs at most one step per
  spike / K), never reached in practice; reaching it is counted in the log.

Distributed: ``torch.distributed`` (gloo on CPU, nccl on CUDA) when started by
torchrun (``WORLD_SIZE`` > 1), DistributedDataParallel, a DistributedSampler for
training and a strided shard of the test set per rank (sums all-reduced, so the
metrics cover each test sample once). Rank 0 writes checkpoints (every epoch and when
``--max-steps`` stops the run, atomically: temporary file + rename) and the JSON log
``<out>/log.json``, and shows the progress bar. ``--resume`` continues from
``<out>/last.pt`` (or a given file), skipping the batches of a partly done epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import asynctrain as at
from asynctrain import rng
from asynctrain.data import CIFAR10_FOLDER, cifar10, collate_time_major
from asynctrain.models import vgg7

OUTPUT_THETA_NONE = 1e9  # "never fires": V never reaches it; its surrogate is 0 in fp32
_STREAM_RECIPE = 211     # counter-hash stream of this recipe's call seeds


# ----------------------------------------------------------------------------- arguments
def _k(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer >= 1, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"K must be an integer >= 1, got {k}")
    return k


def _k_list(text: str) -> list[int]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"--eval-K must list integers >= 1 like 512,64,8, got {text!r}")
    return [_k(p.strip()) for p in parts]


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}")
        return v
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--K", type=_k, default=512, help="forward group size for training (paper 512)")
    ap.add_argument("--policy", choices=("layered", "RS", "MS"), default="RS",
                    help="execution trained through (layered = layered backprop)")
    ap.add_argument("--eval-K", type=_k_list, default=[512, 64, 8],
                    help="evaluate asynchronously at these K (and layered), e.g. 512,64,8")
    ap.add_argument("--eval-policy", choices=("RS", "MS"), default=None,
                    help="async policy of the evaluation (default: the training policy; RS "
                         "for a layered-trained model)")
    ap.add_argument("--epochs", type=_positive(int), default=150)
    ap.add_argument("--batch-size", type=_positive(int), default=64, help="per process")
    ap.add_argument("--lr", type=_positive(float), default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--theta", type=_positive(float), default=0.2)
    ap.add_argument("--steepness", type=_positive(float), default=2.0, help="surrogate alpha")
    ap.add_argument("--refractory-dropout", type=float, default=0.7)
    ap.add_argument("--momentum-noise", type=float, default=0.1, help="MS training only")
    ap.add_argument("--output-threshold", default="none",
                    help="'none' (non-spiking integrating outputs, default) or a threshold")
    ap.add_argument("--queue-input", action="store_true",
                    help="input currents join the pending queue instead of one first step")
    ap.add_argument("--max-forward-steps", type=int, default=0,
                    help="cap per pass (0: 2 x (neurons + inputs) / K)")
    ap.add_argument("--width", type=_positive(float), default=1.0,
                    help="VGG-7 channel multiplier (1 = the paper's; small for smoke tests)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"),
                    help=f"folder holding {CIFAR10_FOLDER}/ (torchvision layout)")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision first")
    ap.add_argument("--limit-train", type=int, default=0, help="use the first N training images")
    ap.add_argument("--limit-test", type=int, default=0, help="use the first N test images")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps")
    ap.add_argument("--out", type=Path, default=Path("runs/cifar_vgg7"))
    ap.add_argument("--resume", nargs="?", const="last", default=None,
                    help="continue from <out>/last.pt or from the given checkpoint")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint for --eval-only")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    a = ap.parse_args(argv)
    if a.eval_only and a.checkpoint is None:
        ap.error("--eval-only needs --checkpoint PATH")
    for name in ("refractory_dropout",):
        if not 0.0 <= getattr(a, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(a, name)}")
    if a.max_forward_steps < 0 or a.max_steps < 0 or a.limit_train < 0 or a.limit_test < 0:
        ap.error("--max-forward-steps, --max-steps and --limit-* must be >= 0")
    if a.output_threshold != "none":
        try:
            if float(a.output_threshold) <= 0:
                raise ValueError
        except ValueError:
            ap.error(f"--output-threshold must be 'none' or a number > 0, got {a.output_threshold!r}")
    return a


# ---------------------------------------------------------------------------- distributed
def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available")
        device = torch.device("cuda", local if device_arg == "cuda" else torch.device(device_arg).index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------- model
def build(args, device: torch.device) -> tuple[torch.nn.Module, at.AsyncSNN]:
    torch.manual_seed(args.seed)
    net = vgg7(num_classes=10, width=args.width).to(device)
    snn = at.AsyncSNN(net, at.SimConfig())
    g = snn.graph
    theta = torch.full((g.n_neurons,), args.theta)
    theta[-g.n_outputs:] = OUTPUT_THETA_NONE if args.output_threshold == "none" \
        else float(args.output_threshold)
    snn.cfg = at.SimConfig(
        forward_group_size=args.K, policy=args.policy, prioritize_input=not args.queue_input,
        stop="spiking_done", max_steps=step_cap(args, snn, args.K), refractory=True,
        refractory_dropout=args.refractory_dropout,
        momentum_noise=args.momentum_noise if args.policy == "MS" else 0.0,
        tau=math.inf, theta=theta, dt=1.0, surrogate_steepness=args.steepness, readout="potential")
    return net, snn


def step_cap(args, snn: at.AsyncSNN, k: int) -> int:
    """Forward steps allowed per pass: --max-forward-steps, or twice what a pass in
    which every neuron and input spikes once would need at this K."""
    g = snn.graph
    return args.max_forward_steps or math.ceil(2 * (g.n_neurons + g.n_inputs) / k) + 10


def eval_modes(args, snn: at.AsyncSNN) -> list[tuple[str, dict]]:
    pol = args.eval_policy or (args.policy if args.policy != "layered" else "RS")
    modes = [("layered", dict(policy="layered"))]
    for k in args.eval_K:
        modes.append((f"{pol} K={k}", dict(policy=pol, forward_group_size=k,
                                           max_steps=step_cap(args, snn, k))))
    return modes


# ----------------------------------------------------------------------------------- data
def load_split(args, train: bool):
    try:
        ds = cifar10(args.data_dir, train=train, download=args.download)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    except ValueError as err:
        sys.exit(f"error: CIFAR-10 under {args.data_dir} is unreadable: {err}")
    limit = args.limit_train if train else args.limit_test
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


# ------------------------------------------------------------------------------ training
def call_seed(seed: int, step: int, rank: int) -> int:
    return rng.counter_hash(seed, _STREAM_RECIPE, step, rank)


def run_batch(snn, module, frames, labels, seed):
    out = module(frames, seed=seed)
    logits = out[-1]  # potentials after the (single) pass
    return logits, F.cross_entropy(logits, labels)


def batch_stats(snn, logits, labels) -> list[float]:
    st = snn.stats
    n_hidden = snn.graph.n_hidden
    return [float(logits.argmax(1).eq(labels).sum()), float(labels.numel()),
            float(st["hidden_spikes"].sum()) / max(n_hidden, 1), float(st["synops"].sum()),
            float(st["forward_steps"].sum()), float(st["capped"].sum())]


def summarize(sums: list[float], loss_sum: float | None = None) -> dict:
    correct, n, density, synops, steps, capped = sums
    out = dict(accuracy=correct / max(n, 1), density=density / max(n, 1),
               synops=synops / max(n, 1), forward_steps=steps / max(n, 1), capped_passes=int(capped),
               samples=int(n))
    if loss_sum is not None:
        out = dict(loss=loss_sum / max(n, 1), **out)
    return out


@torch.no_grad()
def evaluate(snn: at.AsyncSNN, loader, modes, device, world, seed: int, progress: bool) -> dict:
    snn.eval()
    results = {}
    for name, changes in modes:
        sums = [0.0] * 6
        with snn.configured(**changes):
            for i, (frames, labels) in enumerate(tqdm(loader, desc=f"eval {name}", disable=not progress,
                                                      leave=False)):
                frames, labels = frames.to(device), labels.to(device)
                logits = snn(frames, seed=call_seed(seed, i, 10**6))[-1]
                sums = [a + b for a, b in zip(sums, batch_stats(snn, logits, labels))]
        results[name] = summarize(all_sum(sums, device, world))
    return results


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_checkpoint(path: Path, net, opt, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(model=net.state_dict(), optimizer=opt.state_dict(), **state), tmp)
    os.replace(tmp, path)


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    lead = rank == 0
    net, snn = build(args, device)
    train = None if args.eval_only else load_split(args, train=True)
    test = load_split(args, train=False)
    test_loader = DataLoader(Subset(test, range(rank, len(test), world)), batch_size=args.batch_size,
                             collate_fn=collate_time_major, num_workers=args.workers)
    modes = eval_modes(args, snn)
    if args.eval_only:
        ck = torch.load(args.checkpoint, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        res = evaluate(snn, test_loader, modes, device, world, args.seed, lead)
        if lead:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out / "eval.json", dict(checkpoint=str(args.checkpoint),
                                                           trained=ck.get("args", {}), eval=res))
            _print_eval(res)
        _finish(world)
        return
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True) if world > 1 else None
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                        generator=gen if sampler is None else None, drop_last=True,
                        collate_fn=collate_time_major, num_workers=args.workers)
    if len(loader) == 0:
        sys.exit(f"error: {len(train)} training images are fewer than one batch of "
                 f"{args.batch_size} x {world} processes")
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model = snn if world == 1 else DistributedDataParallel(
        snn, device_ids=[device.index] if device.type == "cuda" else None)
    state = dict(epoch=0, batch=0, step=0, log=[], args={k: str(v) for k, v in vars(args).items()},
                 config=at.config.describe(snn.cfg), world_size=world)
    if args.resume:
        path = args.out / "last.pt" if args.resume == "last" else Path(args.resume)
        if not path.is_file():
            sys.exit(f"error: --resume: no checkpoint at {path}")
        ck = torch.load(path, map_location=device, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        state.update(epoch=ck["epoch"], batch=ck["batch"], step=ck["step"], log=ck["log"])
    if lead:
        args.out.mkdir(parents=True, exist_ok=True)
    stop = False
    while state["epoch"] < args.epochs and not stop:
        epoch = state["epoch"]
        if sampler is not None:
            sampler.set_epoch(epoch)
        gen.manual_seed(args.seed * 1000 + epoch)  # same order whether resumed or not
        snn.train()
        sums, loss_sum, t0 = [0.0] * 6, 0.0, time.time()
        bar = tqdm(total=len(loader), initial=state["batch"], desc=f"epoch {epoch}", disable=not lead)
        for i, (frames, labels) in enumerate(loader):
            if i < state["batch"]:
                continue  # consumed before a resume
            frames, labels = frames.to(device), labels.to(device)
            logits, loss = run_batch(snn, model, frames, labels, call_seed(args.seed, state["step"], rank))
            if not torch.isfinite(loss):
                sys.exit(f"error: loss is {loss.item()} at step {state['step']}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            state["batch"] = i + 1
            loss_sum += float(loss.detach()) * labels.numel()
            sums = [a + b for a, b in zip(sums, batch_stats(snn, logits.detach(), labels))]
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", steps=f"{snn.stats['forward_steps'].float().mean():.0f}")
            if args.max_steps and state["step"] >= args.max_steps:
                stop = True
                break
        bar.close()
        tot = all_sum(sums + [loss_sum], device, world)
        record = dict(epoch=epoch, step=state["step"], seconds=time.time() - t0, complete=not stop,
                      train=summarize(tot[:6], tot[6]))
        if not stop:
            state["epoch"], state["batch"] = epoch + 1, 0
        state["log"].append(record)
        if lead:
            if not stop:
                save_checkpoint(args.out / f"epoch{epoch:03d}.pt", net, opt, state)
            save_checkpoint(args.out / "last.pt", net, opt, state)
            write_json_atomic(args.out / "log.json", state["log"])
    state["rank_weight_max_abs_diff"] = _rank_weight_diff(net, device, world)
    if not args.no_eval:
        res = evaluate(snn, test_loader, modes, device, world, args.seed, lead)
        state["log"].append(dict(step=state["step"], eval=res))
        if lead:
            _print_eval(res)
    if lead:
        state["log"].append(dict(step=state["step"],
                                 rank_weight_max_abs_diff=state["rank_weight_max_abs_diff"]))
        write_json_atomic(args.out / "log.json", state["log"])
    _finish(world)


def _rank_weight_diff(net, device, world) -> float:
    """Largest difference between any rank's weights and rank 0's (DDP keeps it 0)."""
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).to(device)
    if world == 1:
        return 0.0
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def _print_eval(res: dict) -> None:
    print(f"{'execution':14} {'accuracy':>8} {'density':>8} {'synops':>12} {'steps':>8}")
    for name, r in res.items():
        print(f"{name:14} {r['accuracy']:8.4f} {r['density']:8.4f} {r['synops']:12.0f} "
              f"{r['forward_steps']:8.1f}")


def _finish(world: int) -> None:
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
