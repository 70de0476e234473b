"""Command line of the data-set recipes (`recipes/nmnist.py`, `shd.py`, `dvs_gesture.py`).

    python recipes/shd.py --data-dir data --out runs/shd          # train + evaluate
    python recipes/shd.py --quick                                  # smoke run, runs/shd/quick
    python recipes/shd.py --eval-only runs/shd/MS/model.pt --eval MS MS:K=4

Order of work, so that nothing fails late: every argument is checked by argparse
(types and ranges, `asynctrain.cli`), then the output folder is checked writable and
the checkpoints a run would resume are read and compared with this run's settings
(a difference names the setting and ``--fresh``), and only then is data loaded.

Exit status: 0 done; 1 training diverged (the message says where); 2 bad arguments,
missing or corrupt data, or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import cli
from .checkpoint import CheckpointError, load_model, read_checkpoint
from .data import DataFileError, collate_time_major
from .evaluate import DEFAULT_STEPS_AFTER_OUTPUT, UBRAIN_ENERGY_PER_SO, evaluate
from .experiment import TRAIN_LABELS, Hyper, paper_executions, run_models, subset
from .outdir import claim
from .report import markdown_table, table_rows, write_report
from .train import LOSSES, TrainingDiverged

__all__ = ["DataSpec", "recipe_main", "RESUME_ARGS", "QUICK_FOLDER"]

QUICK_FOLDER = "quick"
"""``--quick`` writes under ``<out>/quick``: a smoke checkpoint is never resumed by a
full run (nor the other way round)."""

RESUME_ARGS = ("K", "batch_size", "lr", "loss", "seed", "max_train", "max_test", "duration_ms",
               "quick", "fill_slots", "gradient_fill", "train_stop", "train_F",
               "finetune_epochs", "init_from", "train_K", "lr_schedule")
"""Recipe arguments a resumed run takes from its checkpoint: not given, they come from
the file (and are printed); given with another value, they are an error naming both
values and ``--fresh``. (``--epochs`` may grow; fit checks the model and its
SimConfig as well.)"""

MODEL_ARGS = ("K", "duration_ms")
"""Arguments fixed by a trained model: with ``--eval-only`` they come from the
checkpoint, and giving another value is an error (inference K: ``--eval MS:K=4``)."""


@dataclass
class DataSpec:
    """What a recipe knows about its data set."""

    name: str                       # "nmnist"
    title: str                      # "N-MNIST"
    n_inputs: int
    n_classes: int
    hyper: Hyper
    load: Callable[[argparse.Namespace, bool], Dataset]  # (args, train) -> dataset
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    notes: list[str] = field(default_factory=list)


def _execution(text: str) -> str:
    return text if text == "paper" else cli.execution(text)


def parser(spec: DataSpec) -> argparse.ArgumentParser:
    h = spec.hyper
    pos_i, pos_f = cli.positive(int), cli.positive(float)
    ap = argparse.ArgumentParser(
        prog=f"recipes/{spec.name}.py",
        description=f"{spec.title}: train the paper's models (layered, unlayered RS / MS) and "
                    f"evaluate them under layered and asynchronous execution (tables 2-3, "
                    f"figures 4-6 of Koopman et al.). Defaults are the paper's (table 6). "
                    f"Semantics: docs/semantics.md. Exit status: 0 done, 1 training diverged, "
                    f"2 bad arguments, missing or corrupt data, or an unusable checkpoint.",
        formatter_class=cli.HelpFormatter)
    ap.add_argument("--data-dir", default="data", help="root holding tonic's data set folder")
    ap.add_argument("--download", action="store_true", help="download missing files (internet)")
    ap.add_argument("--out", default=f"runs/{spec.name}",
                    help=f"output folder (--quick: <out>/{QUICK_FOLDER})")
    ap.add_argument("--train", nargs="+", choices=list(TRAIN_LABELS),
                    default=list(TRAIN_LABELS), help="training executions")
    ap.add_argument("--K", type=pos_i, default=h.K,
                    help="forward group size: outboxes delivered per forward step (training, "
                         "and inference unless an execution names its own)")
    ap.add_argument("--epochs", type=pos_i, default=h.epochs, help="training epochs")
    ap.add_argument("--batch-size", type=pos_i, default=h.batch_size, help="samples per batch")
    ap.add_argument("--lr", type=pos_f, default=h.lr, help="Adam learning rate")
    ap.add_argument("--loss", choices=sorted(LOSSES), default=h.loss,
                    help="cross-entropy variant (asynctrain.train.LOSSES)")
    _training_args(ap)
    ap.add_argument("--eval", nargs="+", default=["paper"], metavar="EXECUTION", type=_execution,
                    help="executions for every model, e.g. layered RS MS:K=4 RS:drain MS:F=2; "
                         "'paper' (alone) = table 2's rows (layered model: layered, RS, MS; each "
                         "unlayered model: its own policy)")
    ap.add_argument("--steps-after-output", type=cli.at_least(0), nargs="*",
                    default=list(DEFAULT_STEPS_AFTER_OUTPUT), metavar="F",
                    help="forward steps after the first output spike: the x values of the "
                         "accuracy-vs-F curve (none given: skip the curve)")
    ap.add_argument("--energy-per-so", type=cli.at_least(0.0, float), default=UBRAIN_ENERGY_PER_SO,
                    help="energy per synaptic operation, in --energy-unit (uBrain's ratio in the "
                         "paper's relative units)")
    ap.add_argument("--energy-unit", default="uBrain, rel.", help="unit of --energy-per-so")
    ap.add_argument("--seed", type=cli.at_least(0), default=0, help="seed of all randomness")
    ap.add_argument("--max-train", type=pos_i, default=None,
                    help="use a seeded random subset of this many training samples (all: none)")
    ap.add_argument("--max-test", type=pos_i, default=None,
                    help="use a seeded random subset of this many test samples (all: none)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: 64 train / 64 test samples, 1 epoch, batch 16, F in {{0, 1}} "
                         f"(options given on the command line win), written under <out>/{QUICK_FOLDER}")
    ap.add_argument("--fresh", action="store_true",
                    help="start over: delete the checkpoints of the --train models in --out")
    ap.add_argument("--eval-only", nargs="+", type=Path, default=None, metavar="CKPT",
                    help="evaluate these checkpoints (model and settings rebuilt from each file) "
                         "under --eval on the test set; no training; report under <out>/eval")
    ap.add_argument("--workers", type=cli.at_least(0), default=0,
                    help="DataLoader worker processes (0: load in the main process)")
    ap.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=cli.threads, default=None,
                    help="torch CPU threads (none: torch's choice)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    if spec.extra_args is not None:
        spec.extra_args(ap)
    return ap


def _training_args(ap: argparse.ArgumentParser) -> None:
    """Unlayered-training options of the recipes."""
    ap.add_argument("--fill-slots", action=argparse.BooleanOptionalAction, default=True,
                    help="unlayered training: fill unused slots with zero-valued outboxes of "
                         "silent neurons so gradients reach them (docs/semantics.md section 8); "
                         "changes no spike; on by default, the one change that helped in every "
                         "case of docs/unlayered_training.md")
    ap.add_argument("--gradient-fill", action="store_true",  # deprecated alias of --fill-slots
                    help=argparse.SUPPRESS)
    ap.add_argument("--train-stop", choices=["spiking_done", "output"], default="spiking_done",
                    help="stop condition of the training passes")
    ap.add_argument("--train-F", type=cli.at_least(0), default=1,
                    help="with --train-stop output: forward steps after the first output spike")
    ap.add_argument("--train-K", type=cli.at_least(1), default=None,
                    help="unlayered models: K of the training passes (default: --K); they are "
                         "evaluated at --K")
    ap.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="learning rate over the epochs: constant, or cosine decay to 0")
    ap.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                    help="layered checkpoint the unlayered models fine-tune from "
                         "(with --finetune-epochs; none: this run's layered model)")
    ap.add_argument("--finetune-epochs", type=cli.at_least(0), default=0,
                    help="> 0: unlayered models start from the layered weights and train "
                         "this many epochs")


def _training_hyper(h: Hyper, args: argparse.Namespace) -> Hyper:
    return replace(h, fill_slots=args.fill_slots,
                   gradient_fill=h.gradient_fill or args.gradient_fill, train_stop=args.train_stop,
                   train_F=args.train_F, finetune_epochs=args.finetune_epochs,
                   train_K=args.train_K,
                   lr_schedule=None if args.lr_schedule == "constant" else args.lr_schedule)


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace, spec: DataSpec) -> None:
    """Checks across arguments (argparse checked each one)."""
    if args.init_from is not None:
        if args.finetune_epochs < 1:
            ap.error("--init-from needs --finetune-epochs >= 1")
        if not args.init_from.is_file():
            ap.error(f"--init-from: no checkpoint file at {args.init_from}")
    if "paper" in args.eval and len(args.eval) > 1:
        ap.error(f"--eval: 'paper' stands for table 2's rows and cannot be combined with "
                 f"other executions, got {' '.join(args.eval)}")
    if getattr(args, "duration_ms", None) is not None:
        from .data import timesteps

        try:
            timesteps(spec.hyper.dt, args.duration_ms)
        except ValueError as err:
            ap.error(f"--duration-ms: {err}")
    try:
        cli.out_folder(args.out)
    except ValueError as err:
        ap.error(str(err))
    if args.eval_only:
        for p in args.eval_only:
            if not p.is_file():
                ap.error(f"--eval-only: no checkpoint file at {p}")


QUICK = dict(max_train=64, max_test=64, epochs=1, batch_size=16, steps_after_output=[0, 1])
"""``--quick``: what a smoke run changes (options given on the command line win); it
writes under ``<out>/quick``."""


def recipe_main(spec: DataSpec, argv: Sequence[str] | None = None) -> int:
    """Run a recipe's command line; returns the exit status (module docstring)."""
    ap = parser(spec)
    args = ap.parse_args(argv)
    given = cli.explicit(ap, argv)
    if args.quick:
        changed = cli.apply_quick(args, given, QUICK)
        args.out = str(Path(args.out) / QUICK_FOLDER)
        print(f"--quick: {', '.join(changed) or 'nothing changed (every value given)'}; out {args.out}")
    _check(ap, args, spec)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / "eval" if args.eval_only else Path(args.out)

    def body() -> int:
        with claim(out):
            try:
                return _eval_only(spec, args, given) if args.eval_only else _train(spec, args, given)
            except DataFileError as err:  # samples are read lazily: a corrupt one shows up late
                print(f"error: corrupt data: {err}", file=sys.stderr)
                return 2

    return cli.guarded(body, f"rerun the same command to resume: finished epochs are kept in {out}")


def _train(spec: DataSpec, args: argparse.Namespace, given: set[str]) -> int:
    out = Path(args.out)
    if args.fresh:
        for policy in args.train:
            shutil.rmtree(out / policy, ignore_errors=True)
    else:
        problem = _resume_args(out, args, given)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    h = _training_hyper(replace(spec.hyper, K=args.K, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, loss=args.loss), args)
    loaded = _load(spec, args, (True, False))
    if loaded is None:
        return 2
    train_ds, test_ds = loaded
    train_ds = subset(train_ds, args.max_train, args.seed)
    test_ds = subset(test_ds, args.max_test, args.seed + 1)
    print(f"{spec.title}: {len(train_ds)} train / {len(test_ds)} test samples, network "
          f"{[spec.n_inputs, *h.hidden, spec.n_classes]}, K={h.K}, {h.epochs} epochs; out: {out}")
    try:
        results = run_models(train_ds, test_ds, spec.n_inputs, spec.n_classes, h, args.train, out,
                             seed=args.seed, eval_specs=args.eval,
                             steps_after_output=args.steps_after_output,
                             energy_per_so=args.energy_per_so, energy_unit=args.energy_unit,
                             device=args.device, workers=args.workers,
                             progress=not args.no_progress, resume=not args.fresh,
                             init_from=args.init_from, recipe_args=vars(args))
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if "trained with other settings" not in str(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = f"{spec.title} (K={h.K}, {len(test_ds)} test samples)"
    _report(out, results, title, dict(hyper=asdict(h), args=vars(args), notes=spec.notes))
    return 0


def _resume_args(out: Path, args: argparse.Namespace, given: set[str]) -> str | None:
    """Take the `RESUME_ARGS` of the checkpoints under `out` that this run resumes;
    returns why it cannot (None: fine)."""
    for policy in args.train:
        path = out / policy / "model.pt"
        if not path.is_file():
            continue
        try:
            ck = read_checkpoint(path)
        except CheckpointError as err:
            return f"{err}; --fresh starts over"
        stored = dict(ck["meta"].get("args") or {})
        bad = cli.conflicts(args, given, stored, RESUME_ARGS)
        if bad:
            return (f"{path}: {'; '.join(bad)}; drop the flag to resume with the checkpoint's "
                    f"value, or --fresh to start over (or another --out)")
        taken = []
        for name in RESUME_ARGS:
            if name in stored and name not in given and not hasattr(args, "_taken_" + name):
                value = stored[name]
                if name == "init_from" and value is not None:
                    value = Path(value)
                if cli._norm(value) != cli._norm(getattr(args, name, None)):  # noqa: SLF001
                    taken.append(f"--{name.replace('_', '-')} {value}")
                setattr(args, name, value)
                setattr(args, "_taken_" + name, True)
                given = given | {name}  # a second checkpoint must agree with this one
        if taken:
            print(f"resuming {path} with its settings: {', '.join(taken)}")
    for name in [k for k in vars(args) if k.startswith("_taken_")]:
        delattr(args, name)
    return None


def _load(spec: DataSpec, args: argparse.Namespace, which: tuple[bool, ...]) -> list | None:
    try:
        return [spec.load(args, train) for train in which]
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
    except DataFileError as err:
        print(f"error: corrupt data: {err}", file=sys.stderr)
    return None


def _eval_only(spec: DataSpec, args: argparse.Namespace, given: set[str]) -> int:
    """Evaluate checkpoints: each model is rebuilt from its file alone."""
    models = []
    for path in args.eval_only:
        try:
            snn, info = load_model(path, map_location=args.device)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        stored = dict(info["args"])
        stored.setdefault("K", info["config"].forward_group_size)
        bad = cli.conflicts(args, given, stored, MODEL_ARGS)
        if bad:
            print(f"error: {path}: {'; '.join(bad)}; drop the flag to use the checkpoint's value "
                  f"(another inference K: --eval MS:K=4)", file=sys.stderr)
            return 2
        if list(snn.graph.layer_sizes)[0] != spec.n_inputs or snn.graph.n_outputs != spec.n_classes:
            print(f"error: {path}: a {list(snn.graph.layer_sizes)} model, {spec.title} needs "
                  f"{spec.n_inputs} inputs and {spec.n_classes} outputs", file=sys.stderr)
            return 2
        for name in ("duration_ms",):
            if name in stored and name not in given and hasattr(args, name):
                setattr(args, name, stored[name])  # frame the data as the model was trained
        models.append((path, snn, info))
    loaded = _load(spec, args, (False,))
    if loaded is None:
        return 2
    test_ds = subset(loaded[0], args.max_test, args.seed + 1)
    dl = DataLoader(test_ds, batch_size=64, shuffle=False, collate_fn=collate_time_major,
                    num_workers=args.workers)
    results = {}
    for path, snn, info in models:
        policy = info["config"].policy
        label = f"{TRAIN_LABELS.get(policy, policy)} ({path})"
        results[label] = evaluate(snn, dl, paper_executions(policy, args.eval),
                                  steps_after_output=args.steps_after_output,
                                  energy_per_so=args.energy_per_so, energy_unit=args.energy_unit,
                                  seed=args.seed, device=args.device,
                                  progress=not args.no_progress)
    out = Path(args.out) / "eval"
    _report(out, results, f"{spec.title} ({len(test_ds)} test samples, --eval-only)",
            dict(args=vars(args), checkpoints=[str(p) for p in args.eval_only], notes=spec.notes))
    return 0


def _report(out: Path, results: dict[str, Any], title: str, extra: dict[str, Any]) -> None:
    write_report(out, results, title, extra=extra)
    print()
    print(markdown_table(table_rows(results), title))
    print(f"written under {out}/: table.md, results.json, latency.png, accuracy_vs_steps.png, "
          f"currents_to_spike.png")
