"""Train VGG-7 on CIFAR-10 for asynchronous execution (paper, section 5 and A.10).

    torchrun --nproc_per_node=N recipes/cifar_vgg7.py --K 64 --data-dir data
    python recipes/cifar_vgg7.py --K 64 --data-dir data          # one process
    python recipes/cifar_vgg7.py --eval-only run/last.pt --eval layered RS:K=512 RS:K=8
    python recipes/cifar_vgg7.py --quick --data-dir data          # smoke run

Semantics: docs/semantics.md. Defaults are the paper's (docs/semantics.md section 10,
table 6): batch 64 (per process; the effective batch is N x 64), 150 epochs, Adam lr
2e-4, weight decay 0, theta 0.2, IF neurons (tau = inf), surrogate steepness 2,
refractory dropout 0.7, one timestep of analog input (pixels / 255 as currents),
logits = output membrane potentials after the pass (``readout="potential"``),
training with ``stop="spiking_done"``. The paper trained with K = 512 (its GPU's
limit) and RS; this recipe trains at any K, with the surrogate derivative only at the
evaluations that fire or end their outbox window (``--surrogate-at fire_or_last``,
the default: the exact rule of SPEC 8 gives gradients that grow exponentially with
the forward steps, inf at K = 64 full width; docs/gradients.md). The bounded rule
barely learns a CIFAR-like proxy, though: ``--surrogate-at every`` learned it at
K = 512 and ``--surrogate-at every --detach-reset`` at K = 64 (width 0.125), with
gradients finite but not bounded (docs/gradients.md section 4).

Choices where the paper is silent (written down here and in the checkpoint):
- the input frame is delivered at once as the first forward step
  (``prioritize_input``; ``--queue-input`` makes the 3072 pixel currents compete for
  slots like spikes);
- output neurons integrate without a threshold (theta = 1e9, they never fire or
  reset), so the logits are the accumulated potentials; ``--output-threshold 0.2``
  makes them ordinary IF neurons;
- momentum noise for MS: 0.1 (the paper only says "large"); max forward steps per pass:
  2 x (neurons + inputs) / K (with refractoriness a pass needs at most one step per
  spike / K), never reached in practice; reaching it is counted in the log.

Training is `asynctrain.train.fit` with `asynctrain.distributed.Distributed`: when
started by torchrun (``WORLD_SIZE`` > 1) the processes join a process group (gloo on
CPU, nccl on CUDA), each trains on its share of every batch (a DistributedSampler),
gradients are averaged after every backward, and rank 0 writes the checkpoints
(``<out>/last.pt`` after every epoch and when ``--max-steps`` stops the run, plus a copy
``epochNNN.pt`` per epoch, atomically) and the log ``<out>/train.jsonl``, and shows the
progress bar. Evaluation (`asynctrain.evaluate`, merged over the ranks' shards):
``<out>/summary.json`` (and ``eval.json`` for ``--eval-only``). ``--resume``
continues from ``<out>/last.pt`` (or a given file), inside a partly done epoch too;
``--fresh`` starts over in an ``--out`` that holds a checkpoint (one of the two is
needed then: nothing is overwritten silently). One run per ``--out`` at a time.

Checkpoints are `asynctrain.checkpoint` files: model (layer sizes), SimConfig and this
recipe's arguments, so ``--eval-only CKPT`` and ``--resume`` rebuild the model from
the file alone; a flag given with them that contradicts the file is an error naming
both values. Epochs are counted from 1. Exit status: 0 done, 1 training diverged,
2 bad arguments, missing or corrupt data, an unusable checkpoint or output folder,
130 interrupted (rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

import asynctrain as at
from asynctrain import cli, outdir
from asynctrain.checkpoint import CheckpointError, load_model, read_checkpoint
from asynctrain.data import CIFAR10_FOLDER, DataFileError, cifar10, collate_time_major
from asynctrain.distributed import Distributed
from asynctrain.evaluate import Execution
from asynctrain.experiment import subset
from asynctrain.models import vgg7
from asynctrain.report import markdown_table, table_rows
from asynctrain.train import TrainingDiverged, fit

OUTPUT_THETA_NONE = 1e9  # "never fires": V never reaches it; its surrogate is 0 in fp32
EVAL_K = (512, 64, 8)
"""K of the asynchronous evaluations by default (the paper's table: 512; and two smaller)."""


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
                         "momentum_noise", "max_forward_steps", "seed", "max_train", "surrogate_at",
                         "detach_reset")
"""Arguments a resumed run takes from its checkpoint (giving another value is an error)."""
QUICK = dict(width=0.125, max_train=64, max_test=32, epochs=1, batch_size=8)
"""``--quick``: a smoke run (options given on the command line win), under <out>/quick;
it evaluates layered and at K = 64 only."""


def _output_threshold(text: str) -> str:
    if text == "none":
        return text
    cli.positive(float)(text)
    return text


def _zero_is_all(n: int) -> int | None:
    return n or None  # the old --limit-* spelled "all" as 0


def parser() -> argparse.ArgumentParser:
    """The command line (`parse_args` adds the checks across options)."""
    pos_i, pos_f = cli.positive(int), cli.positive(float)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--K", type=_k, default=512,
                    help="forward group size for training: outboxes per forward step (paper 512)")
    ap.add_argument("--policy", choices=("layered", "RS", "MS"), default="RS",
                    help="execution trained through (layered = layered backprop)")
    ap.add_argument("--eval", nargs="+", type=cli.execution, default=None, metavar="EXECUTION",
                    help="executions of the evaluation, e.g. layered RS:K=512 MS:K=8:F=2 (none: "
                         "layered and the training policy, RS for a layered model, at K = "
                         f"{', '.join(map(str, EVAL_K))})")
    ap.add_argument("--eval-K", type=_k_list, default=None, help=argparse.SUPPRESS,
                    action=cli.deprecated("--eval layered RS:K=512 RS:K=64 ..."))
    ap.add_argument("--eval-policy", choices=("RS", "MS"), default=None, help=argparse.SUPPRESS,
                    action=cli.deprecated("--eval MS:K=512 ..."))
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
                         "exponentially with the forward steps at K=64 and below; fire_or_last "
                         "is bounded at any K but barely learned a CIFAR-like proxy, where "
                         "'every' learned at K=512 and 'every' with --detach-reset at K=64, "
                         "width 0.125 (one run each; docs/gradients.md section 4)")
    ap.add_argument("--detach-reset", action=argparse.BooleanOptionalAction, default=False,
                    help="no gradient through the reset (SimConfig.detach_reset); with "
                         "--surrogate-at every it learned a narrow CIFAR-like proxy at K=64 "
                         "fastest of the rules measured, with gradients finite but not "
                         "bounded (docs/gradients.md section 4)")
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
    ap.add_argument("--max-train", type=pos_i, default=None,
                    help="use a seeded random subset of this many training images (none: all)")
    ap.add_argument("--max-test", type=pos_i, default=None,
                    help="use a seeded random subset of this many test images (none: all)")
    ap.add_argument("--limit-train", dest="max_train", type=cli.at_least(0), help=argparse.SUPPRESS,
                    action=cli.deprecated("--max-train", _zero_is_all))
    ap.add_argument("--limit-test", dest="max_test", type=cli.at_least(0), help=argparse.SUPPRESS,
                    action=cli.deprecated("--max-test", _zero_is_all))
    ap.add_argument("--max-steps", type=cli.at_least(0), default=0,
                    help="stop after this many optimizer steps in all (0: no limit); --resume "
                         "continues inside the epoch")
    ap.add_argument("--out", type=Path, default=Path("runs/cifar_vgg7"),
                    help="output folder (--quick: <out>/quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: width 1/8, 64 train / 32 test images, 1 epoch, batch 8, "
                         "evaluated layered and at K = 64 (options given on the command line "
                         "win), written under <out>/quick")
    ap.add_argument("--resume", nargs="?", const="last", default=None, metavar="CKPT",
                    help="continue from <out>/last.pt or from the given checkpoint")
    ap.add_argument("--fresh", action="store_true",
                    help="start over even though <out>/last.pt exists (it is overwritten)")
    ap.add_argument("--eval-only", nargs="*", default=None, metavar="CKPT",
                    help="only evaluate these checkpoints (each model rebuilt from its file) "
                         "under --eval; results in <out>/eval.json")
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS,
                    action=cli.deprecated("--eval-only CKPT"))
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--seed", type=cli.at_least(0), default=0, help="seed of all randomness")
    ap.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--workers", type=cli.at_least(0), default=0,
                    help="DataLoader worker processes per process (0: main process)")
    ap.add_argument("--threads", type=cli.threads, default=None,
                    help="torch CPU threads per process (none: torch's choice)")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    a = ap.parse_args(argv)
    given = cli.explicit(ap, argv)
    a.given = sorted(given)
    if a.quick:
        print(f"--quick: {', '.join(cli.apply_quick(a, given, QUICK)) or 'every value given'}")
        a.out = a.out / "quick"
        if a.eval is None and a.eval_K is None:
            a.eval_K = [64]
    if a.eval_only is not None:
        a.checkpoints = [Path(p) for p in a.eval_only] or ([a.checkpoint] if a.checkpoint else [])
        if not a.checkpoints:
            ap.error("--eval-only needs a checkpoint: --eval-only CKPT (or --checkpoint CKPT)")
        for p in a.checkpoints:
            if not p.is_file():
                ap.error(f"--eval-only: no checkpoint file at {p}")
        a.eval_only = True
    else:
        a.eval_only, a.checkpoints = False, []
    if a.resume and a.fresh:
        ap.error("--resume and --fresh contradict each other")
    try:
        cli.out_folder(a.out)
    except ValueError as err:
        ap.error(str(err))
    return a


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
        surrogate_at=args.surrogate_at, detach_reset=args.detach_reset)
    return net, snn


def step_cap(args, snn: at.AsyncSNN, k: int) -> int:
    """Forward steps allowed per pass: --max-forward-steps, or twice what a pass in
    which every neuron and input spikes once would need at this K."""
    g = snn.graph
    return args.max_forward_steps or math.ceil(2 * (g.n_neurons + g.n_inputs) / k) + 10


def executions(args, snn: at.AsyncSNN) -> list[str]:
    """--eval, or layered plus the evaluation policy at each K (--eval-K)."""
    if args.eval is not None:
        return list(args.eval)
    pol = args.eval_policy or (args.policy if args.policy != "layered" else "RS")
    return ["layered", *(f"{pol}:K={k}" for k in (args.eval_K or EVAL_K))]


# ----------------------------------------------------------------------------------- data
def load_split(args, train: bool):
    try:
        ds = cifar10(args.data_dir, train=train, download=args.download)
    except FileNotFoundError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(f"CIFAR-10 under {args.data_dir} is unreadable: {err}")
    return subset(ds, args.max_train if train else args.max_test, args.seed + (0 if train else 1))


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


# ---------------------------------------------------------------------------- the run
def main(argv=None) -> int:
    args = parse_args(argv)
    last = args.out / "last.pt"
    resume_from = None
    if args.eval_only:
        for path in args.checkpoints:
            from_checkpoint(args, path, MODEL_ARGS, "")
    elif args.resume:
        resume_from = last if args.resume == "last" else Path(args.resume)
        if not resume_from.is_file():
            _fail(f"--resume: no checkpoint at {resume_from}")
        if resume_from != last and last.is_file():
            _fail(f"--resume {resume_from}: {last} holds another run's checkpoint; choose "
                  f"another --out")
        from_checkpoint(args, resume_from, RUN_ARGS, ", or --fresh to start over")
    elif last.is_file() and not args.fresh:
        _fail(f"{last} exists: --resume to continue it, --fresh to start over (it is "
              f"overwritten), or another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist = Distributed.from_env(args.device)
    try:
        return cli.guarded(lambda: _owned(args, dist, resume_from),
                           f"rerun with --resume to continue from {last}")
    finally:
        dist.close()


def _owned(args, dist: Distributed, resume_from: Path | None) -> int:
    """Rank 0 claims --out (one run at a time); every rank learns whether it could."""
    with contextlib.ExitStack() as stack:
        busy = None
        if dist.lead:
            try:
                stack.enter_context(outdir.claim(args.out))
            except outdir.OutputError as err:
                busy = err
        if dist.any(busy is not None):
            if busy is not None:
                print(f"error: {busy}", file=sys.stderr)
            return 2
        return _evaluate_only(args, dist) if args.eval_only else _train(args, dist, resume_from)


def _test_shard(args, dist: Distributed) -> DataLoader:
    test = load_split(args, train=False)
    return DataLoader(Subset(test, range(dist.rank, len(test), dist.world)), batch_size=args.batch_size,
                      collate_fn=collate_time_major, num_workers=args.workers)


def _evaluate(args, dist: Distributed, snn: at.AsyncSNN, loader: DataLoader) -> dict | None:
    """Every execution over the whole test set (rank 0 gets the results); the step cap
    is the largest any of them needs."""
    execs = executions(args, snn)
    ks = [Execution.parse(e).K or snn.cfg.K for e in execs]
    try:
        with snn.configured(max_steps=max(step_cap(args, snn, k) for k in ks)):
            res = dist.evaluate(snn, loader, execs, steps_after_output=None, seed=args.seed,
                                device=dist.device, progress=dist.lead and not args.no_progress)
    except DataFileError as err:
        _fail(f"CIFAR-10 under {args.data_dir} is unreadable: {err}")
    if res is not None:
        print(markdown_table(table_rows({f"{snn.cfg.policy}-trained": res}),
                             f"CIFAR-10, VGG-7 (width {args.width:g}), {res[execs[0]].samples} test images"))
    return None if res is None else {k: r.to_dict(per_sample=False) for k, r in res.items()}


def _evaluate_only(args, dist: Distributed) -> int:
    runs = []
    for path in args.checkpoints:
        try:  # the model from the file alone: its layers, weights and config
            snn, info = load_model(path, map_location=dist.device)
        except CheckpointError as err:
            _fail(str(err))
        if snn.graph.n_inputs != 3072 or snn.graph.n_outputs != 10:
            _fail(f"{info['path']}: a {list(snn.graph.layer_sizes)[:1]}...{snn.graph.n_outputs} "
                  f"model; CIFAR-10 needs 3072 inputs (3 x 32 x 32) and 10 outputs")
        if "policy" not in args.given:
            args.policy = snn.cfg.policy  # the default evaluation policy follows training
        runs.append(dict(checkpoint=str(path), trained=info["args"],
                         eval=_evaluate(args, dist, snn, _test_shard(args, dist))))
    if dist.lead:
        outdir.write_text(args.out / "eval.json", json.dumps(dict(runs=runs), indent=1), "evaluation")
    return 0


def _train(args, dist: Distributed, resume_from: Path | None) -> int:
    last = args.out / "last.pt"
    net, snn = build(args, dist.device)
    train = load_split(args, train=True)
    test_loader = _test_shard(args, dist)
    sampler = DistributedSampler(train, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=args.seed, drop_last=True) if dist.world > 1 else None
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None,
                        drop_last=True, collate_fn=collate_time_major, num_workers=args.workers)
    if len(loader) == 0:
        _fail(f"{len(train)} training images are fewer than one batch of "
              f"{args.batch_size} x {dist.world} processes")
    if dist.lead:
        if args.fresh:
            for old in [last, *args.out.glob("epoch*.pt"), args.out / "train.jsonl"]:
                old.unlink(missing_ok=True)
        if resume_from is not None and resume_from != last:
            shutil.copyfile(resume_from, last)
    dist.any(False)  # every rank waits for rank 0's files

    def keep_epoch(record: dict) -> None:  # a copy of every epoch's checkpoint
        if dist.lead:
            with outdir.saving(args.out / f"epoch{record['epoch']:03d}.pt", "checkpoint") as tmp:
                shutil.copyfile(last, tmp)

    try:
        fit(snn, loader, args.epochs, args.lr, args.weight_decay, seed=args.seed,
            log_path=args.out / "train.jsonl", checkpoint_path=last, resume=resume_from is not None,
            progress=not args.no_progress, device=dist.device, on_epoch_end=keep_epoch,
            desc=f"VGG-7 {args.policy} K={args.K}", max_steps=args.max_steps or None,
            distributed=dist, recipe_args={k: v for k, v in vars(args).items() if k != "given"})
    except TrainingDiverged as err:
        _fail(f"{err} ({last} holds the last saved state)", 1)
    except (ValueError, DataFileError) as err:  # NaN weights, other settings, bad data
        _fail(str(err))
    summary = dict(step=read_checkpoint(last)["meta"].get("step") if dist.lead else None,
                   rank_weight_max_abs_diff=dist.weight_spread(net.parameters()), world_size=dist.world)
    if not args.no_eval:
        summary["eval"] = _evaluate(args, dist, snn, test_loader)
    if dist.lead:
        outdir.write_text(args.out / "summary.json", json.dumps(summary, indent=1), "summary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
