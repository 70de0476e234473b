"""Train VGG-7 on CIFAR-10 for asynchronous execution (paper, section 5 and A.10).

    torchrun --nproc_per_node=N recipes/cifar_vgg7.py --K 64 --data-dir data
    python recipes/cifar_vgg7.py --K 64 --data-dir data          # one process
    python recipes/cifar_vgg7.py --eval-only run/last.pt --eval-K 512,64,8

Semantics: docs/semantics.md. Defaults are the paper's (docs/semantics.md section 10, table 6): batch 64 (per process; the effective
batch is N x 64), 150 epochs, Adam lr 2e-4, weight decay 0, theta 0.2, IF neurons
(tau = inf), surrogate steepness 2, refractory dropout 0.7, one timestep of analog
input (pixels / 255 as currents), logits = output membrane potentials after the pass
(``readout="potential"``), training with ``stop="spiking_done"``. The paper trained
with K = 512 (its GPU's limit) and RS; this recipe trains at any K, with the surrogate
derivative only at the evaluations that fire or end their outbox window
(``--surrogate-at fire_or_last``, the default: the exact rule of SPEC 8 gives
gradients that grow exponentially with the forward steps, inf at K = 64 full width;
docs/gradients.md).

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
``<out>/last.pt`` (or a given file), skipping the batches of a partly done epoch;
``--fresh`` starts over in an ``--out`` that holds a checkpoint (one of the two is
needed then: nothing is overwritten silently).

Checkpoints are `asynctrain.checkpoint` files: model (layer sizes), SimConfig and this
recipe's arguments, so ``--eval-only CKPT`` and ``--resume`` rebuild the model from
the file alone; a flag given with them that contradicts the file is an error naming
both values. Epochs are counted from 1. Exit status: 0 done, 1 training diverged,
2 bad arguments, missing or corrupt data, or an unusable checkpoint.
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
from asynctrain import cli, rng
from asynctrain.checkpoint import CheckpointError, load_into, load_model, read_checkpoint, save_model
from asynctrain.evaluate import inference_overrides
from asynctrain.train import TrainingDiverged, check_finite
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


MODEL_ARGS = ("width", "theta", "output_threshold", "steepness", "queue_input")
"""Arguments that define the trained model (fixed by a checkpoint)."""
RUN_ARGS = MODEL_ARGS + ("K", "policy", "batch_size", "lr", "weight_decay", "refractory_dropout",
                         "momentum_noise", "max_forward_steps", "seed", "limit_train", "surrogate_at")
"""Arguments a resumed run takes from its checkpoint (giving another value is an error)."""


def _output_threshold(text: str) -> str:
    if text == "none":
        return text
    cli.positive(float)(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    pos_i, pos_f = cli.positive(int), cli.positive(float)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--K", type=_k, default=512,
                    help="forward group size for training: outboxes per forward step (paper 512)")
    ap.add_argument("--policy", choices=("layered", "RS", "MS"), default="RS",
                    help="execution trained through (layered = layered backprop)")
    ap.add_argument("--eval-K", type=_k_list, default=[512, 64, 8],
                    help="evaluate asynchronously at these K (and layered), e.g. 512,64,8")
    ap.add_argument("--eval-policy", choices=("RS", "MS"), default=None,
                    help="async policy of the evaluation (none: the training policy; RS "
                         "for a layered-trained model)")
    ap.add_argument("--epochs", type=pos_i, default=150, help="training epochs")
    ap.add_argument("--batch-size", type=pos_i, default=64, help="images per batch and process")
    ap.add_argument("--lr", type=pos_f, default=2e-4, help="Adam learning rate")
    ap.add_argument("--weight-decay", type=cli.at_least(0.0, float), default=0.0,
                    help="Adam L2 coefficient")
    ap.add_argument("--theta", type=pos_f, default=0.2, help="firing threshold of hidden neurons")
    ap.add_argument("--steepness", type=pos_f, default=2.0, help="arctan surrogate alpha")
    ap.add_argument("--surrogate-at", choices=("fire_or_last", "every"), default="fire_or_last",
                    help="evaluations that carry the surrogate derivative (SimConfig.surrogate_at; "
                         "docs/gradients.md): 'every' is SPEC 8's exact rule, whose gradient grows "
                         "exponentially with the forward steps at K=64 and below")
    ap.add_argument("--refractory-dropout", type=cli.probability, default=0.7,
                    help="probability that a spike does not make its neuron refractory (training)")
    ap.add_argument("--momentum-noise", type=cli.at_least(0.0, float), default=0.1,
                    help="MS training only: key = pre-spike potential + noise x U(0, 1)")
    ap.add_argument("--output-threshold", type=_output_threshold, default="none",
                    help="'none' (non-spiking integrating outputs) or a threshold > 0")
    ap.add_argument("--queue-input", action="store_true",
                    help="input currents join the pending queue instead of one first step")
    ap.add_argument("--max-forward-steps", type=cli.at_least(0), default=0,
                    help="forward steps allowed per pass (0: 2 x (neurons + inputs) / K + 10)")
    ap.add_argument("--width", type=pos_f, default=1.0,
                    help="VGG-7 channel multiplier (1 = the paper's; small for smoke tests)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"),
                    help=f"folder holding {CIFAR10_FOLDER}/ (torchvision layout)")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 with torchvision first")
    ap.add_argument("--limit-train", type=cli.at_least(0), default=0,
                    help="use the first N training images (0: all)")
    ap.add_argument("--limit-test", type=cli.at_least(0), default=0,
                    help="use the first N test images (0: all)")
    ap.add_argument("--max-steps", type=cli.at_least(0), default=0,
                    help="stop after this many optimizer steps (0: no limit)")
    ap.add_argument("--out", type=Path, default=Path("runs/cifar_vgg7"), help="output folder")
    ap.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                    help="continue from <out>/last.pt or from the given checkpoint")
    ap.add_argument("--fresh", action="store_true",
                    help="start over even though <out>/last.pt exists (it is overwritten)")
    ap.add_argument("--eval-only", nargs="?", const="", default=None, metavar="CKPT",
                    help="only evaluate this checkpoint (or --checkpoint); the model is rebuilt "
                         "from the file")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint for --eval-only")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=cli.at_least(0), default=0, help="seed of all randomness")
    ap.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--workers", type=cli.at_least(0), default=0,
                    help="DataLoader worker processes per process (0: main process)")
    a = ap.parse_args(argv)
    a.given = sorted(cli.explicit(ap, argv))
    if a.eval_only is not None:
        if a.eval_only:
            a.checkpoint = Path(a.eval_only)
        if a.checkpoint is None:
            ap.error("--eval-only needs a checkpoint: --eval-only CKPT (or --checkpoint CKPT)")
        if not a.checkpoint.is_file():
            ap.error(f"--eval-only: no checkpoint file at {a.checkpoint}")
        a.eval_only = True
    else:
        a.eval_only = False
    if a.resume and a.fresh:
        ap.error("--resume and --fresh contradict each other")
    try:
        cli.out_folder(a.out)
    except ValueError as err:
        ap.error(str(err))
    return a


# ---------------------------------------------------------------------------- distributed
def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg.startswith("cuda"):
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
        tau=math.inf, theta=theta, dt=1.0, surrogate_steepness=args.steepness, readout="potential",
        surrogate_at=args.surrogate_at)
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
        _fail(str(err))
    except ValueError as err:
        _fail(f"CIFAR-10 under {args.data_dir} is unreadable: {err}")
    limit = args.limit_train if train else args.limit_test
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def _fail(message: str, status: int = 2):
    """Exit with `status` (2: bad input, 1: training diverged) and the message."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def from_checkpoint(args, path: Path, names: tuple[str, ...], fresh_hint: str) -> dict:
    """Read `path` and take the values of `names` from its stored arguments; a flag
    given on the command line that contradicts them is an error naming both."""
    try:
        ck = read_checkpoint(path)
    except CheckpointError as err:
        _fail(str(err))
    stored = dict(ck["meta"].get("args") or {})
    if "K" in names:
        stored.setdefault("K", ck["config"].forward_group_size)
    bad = cli.conflicts(args, set(args.given), stored, names)
    if bad:
        _fail(f"{path}: {'; '.join(bad)}; drop the flag to use the checkpoint's value{fresh_hint}")
    for name in names:
        if name in stored:
            setattr(args, name, stored[name])
    return ck


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
        # inference: no training-only setting (asynctrain.evaluate.inference_config)
        with snn.configured(**inference_overrides(snn.cfg, changes)):
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


def save_checkpoint(path: Path, snn: at.AsyncSNN, opt, state: dict, args) -> None:
    """An `asynctrain.checkpoint` file (atomic): model, config, optimizer, run state
    and this recipe's arguments."""
    save_model(path, snn, optimizer=opt.state_dict(), **state,
               args={k: v for k, v in vars(args).items() if k != "given"})


def main(argv=None) -> None:
    args = parse_args(argv)
    last = args.out / "last.pt"
    resume_from = None
    if args.eval_only:
        from_checkpoint(args, args.checkpoint, MODEL_ARGS, "")
    elif args.resume:
        resume_from = last if args.resume == "last" else Path(args.resume)
        if not resume_from.is_file():
            _fail(f"--resume: no checkpoint at {resume_from}")
        from_checkpoint(args, resume_from, RUN_ARGS, ", or --fresh to start over")
    elif last.is_file() and not args.fresh:
        _fail(f"{last} exists: --resume to continue it, --fresh to start over (it is "
              f"overwritten), or another --out")
    rank, world, device = setup_distributed(args.device)
    lead = rank == 0
    progress = lead and not args.no_progress
    if args.eval_only or resume_from is not None:
        try:  # the model from the file alone: its layers, weights and config
            snn, info = load_model(args.checkpoint if args.eval_only else resume_from,
                                   map_location=device)
        except CheckpointError as err:
            _fail(str(err))
        net = snn.net
        if snn.graph.n_inputs != 3072 or snn.graph.n_outputs != 10:
            _fail(f"{info['path']}: a {list(snn.graph.layer_sizes)[:1]}...{snn.graph.n_outputs} "
                  f"model; CIFAR-10 needs 3072 inputs (3 x 32 x 32) and 10 outputs")
        if args.eval_only and "policy" not in args.given:
            args.policy = snn.cfg.policy  # the default evaluation policy follows training
    else:
        net, snn = build(args, device)
    train = None if args.eval_only else load_split(args, train=True)
    test = load_split(args, train=False)
    test_loader = DataLoader(Subset(test, range(rank, len(test), world)), batch_size=args.batch_size,
                             collate_fn=collate_time_major, num_workers=args.workers)
    modes = eval_modes(args, snn)
    if args.eval_only:
        res = evaluate(snn, test_loader, modes, device, world, args.seed, progress)
        if lead:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out / "eval.json", dict(checkpoint=str(args.checkpoint),
                                                           trained=info["args"], eval=res))
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
        _fail(f"{len(train)} training images are fewer than one batch of "
              f"{args.batch_size} x {world} processes")
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model = snn if world == 1 else DistributedDataParallel(
        snn, device_ids=[device.index] if device.type == "cuda" else None)
    state = dict(epoch=0, batch=0, step=0, log=[], world_size=world)
    if resume_from is not None:
        ck = load_into(resume_from, snn, opt)
        state.update({k: ck["meta"][k] for k in ("epoch", "batch", "step", "log")})
        if lead:
            print(f"resumed from {resume_from} at epoch {state['epoch']}"
                  + (f", batch {state['batch']}" if state["batch"] else ""))
    if lead:
        args.out.mkdir(parents=True, exist_ok=True)
    stop = False
    while state["epoch"] < args.epochs and not stop:
        epoch = state["epoch"]  # epochs done; this one is number epoch + 1
        if sampler is not None:
            sampler.set_epoch(epoch)
        gen.manual_seed(args.seed * 1000 + epoch)  # same order whether resumed or not
        snn.train()
        sums, loss_sum, t0 = [0.0] * 6, 0.0, time.time()
        bar = tqdm(total=len(loader), initial=state["batch"], desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=not progress, dynamic_ncols=True)
        for i, (frames, labels) in enumerate(loader):
            if i < state["batch"]:
                continue  # consumed before a resume
            frames, labels = frames.to(device), labels.to(device)
            logits, loss = run_batch(snn, model, frames, labels, call_seed(args.seed, state["step"], rank))
            try:
                check_finite(snn, "loss", epoch, i, loss=loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                check_finite(snn, "gradient", epoch, i, lr=args.lr)
                opt.step()
                check_finite(snn, "weight", epoch, i, lr=args.lr)
            except TrainingDiverged as err:
                _fail(f"{err} (recipe step {state['step'] + 1}; {last} holds the last saved state)", 1)
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
        record = dict(epoch=epoch + 1, step=state["step"], seconds=time.time() - t0, complete=not stop,
                      train=summarize(tot[:6], tot[6]))
        if not stop:
            state["epoch"], state["batch"] = epoch + 1, 0
        state["log"].append(record)
        if lead:
            if not stop:
                save_checkpoint(args.out / f"epoch{epoch + 1:03d}.pt", snn, opt, state, args)
            save_checkpoint(last, snn, opt, state, args)
            write_json_atomic(args.out / "log.json", state["log"])
    state["rank_weight_max_abs_diff"] = _rank_weight_diff(net, device, world)
    if not args.no_eval:
        res = evaluate(snn, test_loader, modes, device, world, args.seed, progress)
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
