"""How much does a trained SNN lose on an asynchronous chip? One command.

    python -m asynctrain.audit model.nir --data digits
    python -m asynctrain.audit runs/nmnist/layered/model.pt --data nmnist --data-dir data
    python -m asynctrain.audit model.nir --data frames.pt --finetune-epochs 10 --out audit-out

MODEL: a ``.nir`` file (`asynctrain.nir`; graphs of other libraries need ``--dt`` when
they carry none) or one of our checkpoints (`asynctrain.checkpoint`). DATA: a
recipe's data set (``nmnist``, ``shd``, ``dvs_gesture``: tonic's files under
``--data-dir``, framed at the recipe's dt), the demo's ``digits`` (scikit-learn, rate
coded into ``--T`` frames) or a ``.pt`` file holding ``{"frames": [N, T, ...],
"labels": [N]}`` (optionally ``"train_frames"`` / ``"train_labels"`` for
``--finetune-epochs``). Each frame is one timestep of the model.

The model is evaluated (`asynctrain.evaluate`) layered and asynchronously: RS and MS
at the model's K with the accuracy-vs-F curve, further executions (``--eval``,
default RS and MS at K = 1, 8, 64),
and the chip presets of SPEC 7 (``--presets``, scheduled by MS). Printed: the paper's table
(`asynctrain.report`), the accuracy vs forward steps after the first output, and
one sentence on the accuracy lost asynchronously. Written under ``--out``: the
report files of `report.write_report` (table.md, results.json, latency.png,
accuracy_vs_steps.png, currents_to_spike.png) and ``audit.md``.

``--finetune-epochs N`` then trains the model unlayered (``--finetune-policy``, default
MS) from those weights with `asynctrain.train.fit`, evaluates it again under the same
executions, and writes ``finetuned.nir`` and ``finetuned.pt`` (checkpoint).

One audit per ``--out``: a folder holding another audit's results (other settings, in
its ``audit-run.json``) is refused before any work unless ``--fresh``; the same
command again replaces its own results. Exit status: 0 done, 1 fine-tuning diverged,
2 bad arguments, data, model files or paths, 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .config import SimConfig
from .data import DataFileError, collate_time_major
from .evaluate import DEFAULT_STEPS_AFTER_OUTPUT, ExecutionResult, evaluate
from .module import AsyncSNN
from .outdir import write_text

__all__ = ["main", "load_model_file", "load_data", "RECIPE_DATA", "PRESETS", "audit",
           "loss_sentence"]

RECIPE_DATA = {"nmnist": dict(dt=10.0, loader="nmnist"), "shd": dict(dt=10.0, loader="shd"),
               "dvs_gesture": dict(dt=20.0, loader="dvs_gesture")}
"""The recipes' data sets and their frame length dt in ms (recipes/<name>.py HYPER)."""
PRESETS = {"loihi": "barrier/layer", "spinnaker": "timer/core", "speck": "asynchronous"}
"""Chip presets of SPEC 7 evaluated by default (one per row of its table)."""
DEFAULT_K = (1, 8, 64)


# ----------------------------------------------------------------------- loading
def load_model_file(path: str | os.PathLike, dt: float | None = None) -> AsyncSNN:
    """A ``.nir`` file or one of our checkpoints -> `AsyncSNN` (the one place that
    knows the formats). `dt` (ms): for NIR graphs without a dt of their own."""
    path = Path(path)
    if path.suffix == ".nir":
        from . import nir as anir

        return anir.from_nir(anir.read(path), None if dt is None else SimConfig(dt=dt))
    from .checkpoint import load_model

    snn, _ = load_model(path)
    return snn


class _Frames(Dataset):
    """Frames ``[N, T, ...]`` in memory -> items ``(frames [T, F] float32, label)``."""

    def __init__(self, frames: torch.Tensor, labels: torch.Tensor, where: str):
        if not isinstance(frames, torch.Tensor) or frames.dim() < 3:
            raise ValueError(f"{where}: frames must be a tensor [N, T, ...], got "
                             f"{getattr(frames, 'shape', type(frames).__name__)}")
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or len(labels) != len(frames):
            raise ValueError(f"{where}: labels must be [N] with N = {len(frames)}, got shape "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or (labels < 0).any():
            raise ValueError(f"{where}: labels must be integers >= 0")
        if frames.is_floating_point() and not bool(torch.isfinite(frames).all()):
            bad = (~torch.isfinite(frames)).flatten(1).any(1).nonzero()[:, 0]
            raise DataFileError(f"{where}: frames of {len(bad)} sample(s) hold NaN/inf values, first "
                                f"sample {int(bad[0])}")
        self.frames, self.labels = frames, labels.to(torch.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(labels) else 0
        self.num_features = math.prod(frames.shape[2:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.frames[i].to(torch.float32).reshape(self.frames.shape[1], -1), int(self.labels[i])


def load_data(name: str, *, train: bool, data_dir: str | None = None, T: int = 8,
              min_files: int | None = None) -> Dataset:
    """The test (or train) split of DATA (see the module docstring); the data set has
    ``num_classes`` and ``num_features``."""
    from . import data

    if name == "digits":
        return data.digits(train=train, T=T, seed=0)
    if name in RECIPE_DATA:
        spec = RECIPE_DATA[name]
        kw: dict[str, Any] = dict(train=train, dt=spec["dt"], download=False)
        if min_files is not None and name != "shd":
            kw["min_files"] = min_files
        return getattr(data, spec["loader"])(data_dir, **kw)
    try:
        blob = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"{name}: not a readable torch file of tensors ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{name}: expected a dict with 'frames' and 'labels', got "
                         f"{type(blob).__name__}")
    keys = ("train_frames", "train_labels") if train else ("frames", "labels")
    if not all(k in blob for k in keys):
        raise ValueError(f"{name}: has keys {sorted(blob)}; needs {list(keys)}"
                         + (" for --finetune-epochs (a training split)" if train else ""))
    return _Frames(blob[keys[0]], blob[keys[1]], name)


def check_fit(snn: AsyncSNN, ds: Dataset, data_name: str) -> None:
    """Model and data agree on the input size and the classes (else ValueError)."""
    n_in, n_out = snn.graph.n_inputs, snn.graph.n_outputs
    feats = getattr(ds, "num_features", None)
    if feats is None:
        feats = math.prod(ds[0][0].shape[1:])
    if feats != n_in:
        raise ValueError(f"the model takes {n_in} input features but data {data_name!r} has "
                         f"{feats} per frame; audit it on the data it was trained for")
    classes = getattr(ds, "num_classes", None)
    if classes is not None and classes > n_out:
        raise ValueError(f"the model has {n_out} outputs but data {data_name!r} has {classes} "
                         f"classes")


# --------------------------------------------------------------------- the audit
def audit(snn: AsyncSNN, loader: Any, *, Ks: Sequence[int] = DEFAULT_K,
          executions: Sequence[str] | None = None,
          presets: Sequence[str] = tuple(PRESETS), neurons_per_core: int = 32,
          steps_after_output: Sequence[int] = DEFAULT_STEPS_AFTER_OUTPUT, seed: int = 0,
          progress: bool = True, max_batches: int | None = None) -> dict[str, ExecutionResult]:
    """Every execution of the audit: ``{name: ExecutionResult}`` (layered, RS and MS at
    the model's K with the F curve, the K sweep, then ``preset:<chip>``). `executions`
    (strings of `asynctrain.evaluate.Execution`) replace the K sweep (RS and MS at each
    of `Ks` but the model's own)."""
    K0 = snn.cfg.K
    kw = dict(seed=seed, progress=progress, max_batches=max_batches)
    res = dict(evaluate(snn, loader, ["layered", "RS", "MS"], steps_after_output=steps_after_output,
                        **kw))
    for p in ("RS", "MS"):  # say the K in the row, as the sweep's rows do
        res[p] = dataclasses.replace(res[p], label=f"{res[p].label} (K={K0})")
    sweep = list(executions) if executions is not None else \
        [f"{p}:K={k}" for p in ("RS", "MS") for k in Ks if k != K0]
    if sweep:
        res.update(evaluate(snn, loader, sweep, steps_after_output=None, **kw))
    for chip in presets:
        npc = neurons_per_core if PRESETS.get(chip) == "timer/core" else None
        chip_cfg = SimConfig.preset(chip, snn.net, neurons_per_core=npc)
        # the chip's K, synchronisation and barriers; everything else stays the model's
        pcfg = snn.cfg.replace(policy="MS", forward_group_size=chip_cfg.K,
                               sync_threshold=chip_cfg.sync_threshold,
                               barrier_messages=chip_cfg.barrier_messages,
                               prioritize_input=chip_cfg.prioritize_input or snn.cfg.prioritize_input)
        chip_snn = AsyncSNN(snn.net, pcfg, backend=snn.backend, input_shape=snn.graph.input_shape)
        r = evaluate(chip_snn, loader, ["MS"], steps_after_output=None, **kw)["MS"]
        sync = pcfg.sync_threshold
        sync_txt = "fan-in" if isinstance(sync, torch.Tensor) else str(sync)
        label = (f"{chip} ({PRESETS.get(chip, chip)}: K={pcfg.K}, sync {sync_txt}, barriers "
                 f"{'on' if pcfg.barrier_messages else 'off'})")
        res[f"preset:{chip}"] = dataclasses.replace(r, execution=f"preset:{chip}", label=label)
    return res


def curve_table(results: dict[str, ExecutionResult]) -> str:
    """Accuracy vs forward steps allowed after the first output spike (Markdown)."""
    rows = [(r.label, r.accuracy_vs_steps_after_output) for r in results.values()
            if r.accuracy_vs_steps_after_output]
    if not rows:
        return ""
    keys = list(rows[0][1])
    lines = ["| Inference | " + " | ".join(f"F={k}" if k != "drain" else "drain" for k in keys) + " |",
             "|---|" + "---:|" * len(keys)]
    lines += [f"| {label} | " + " | ".join(f"{c[k]:.3f}" for k in keys) + " |" for label, c in rows]
    return "\n".join(lines) + "\n"


def loss_sentence(results: dict[str, ExecutionResult], what: str = "The model") -> str:
    """One sentence: accuracy lost (or gained) under asynchronous execution."""
    lay = results["layered"].accuracy
    rs, ms = results["RS"].accuracy, results["MS"].accuracy
    asyn = {k: r for k, r in results.items() if k != "layered"}
    worst = min(asyn.values(), key=lambda r: r.accuracy)

    def change(acc: float) -> str:
        return f"loses {lay - acc:.3f}" if acc <= lay else f"gains {acc - lay:.3f}"

    return (f"{what} {change(rs)} accuracy under asynchronous RS and {change(ms)} under MS at "
            f"its K (layered {lay:.3f} -> RS {rs:.3f}, MS {ms:.3f}); the worst of the "
            f"{len(asyn)} asynchronous executions ({worst.label}) {change(worst.accuracy)}.")


# -------------------------------------------------------------------------- CLI
QUICK = dict(max_test=64, max_train=64, steps_after_output=[0, 1])
"""``--quick``: a smoke run (options given on the command line win), under <out>/quick."""
OUTPUTS = ("audit.md", "table.md", "results.json", "latency.png", "accuracy_vs_steps.png",
           "currents_to_spike.png", "finetuned.nir", "finetuned.pt", "finetune.jsonl")
"""What an audit writes under --out (``--fresh`` deletes them)."""
RECORD = "audit-run.json"
"""The settings of the audit whose results --out holds (another audit is refused)."""
_NOT_IDENTITY = ("out", "no_progress", "threads", "device", "fresh", "quick", "K")


def _parser() -> argparse.ArgumentParser:
    from . import cli

    pos_int, nonneg_int = cli.positive(int), cli.at_least(0)
    ap = argparse.ArgumentParser(prog="python -m asynctrain.audit", description=__doc__,
                                 formatter_class=cli.HelpFormatter)
    ap.add_argument("model", help="a .nir file or an asynctrain checkpoint (.pt)")
    ap.add_argument("--data", required=True,
                    help=f"{', '.join(RECIPE_DATA)} (with --data-dir), digits, or a .pt with "
                         f"'frames' [N, T, ...] and 'labels' [N]")
    ap.add_argument("--data-dir", default="data", help="root of tonic's data set folders")
    ap.add_argument("--min-files", type=pos_int, default=None,
                    help="accept a partial tonic copy with at least this many files (none: tonic's)")
    ap.add_argument("--T", type=pos_int, default=8, help="frames per digits sample")
    ap.add_argument("--dt", type=cli.positive(float), default=None,
                    help="ms per timestep for a .nir graph without dt in its metadata "
                         "(snnTorch exports: 0.1; none: the graph's)")
    ap.add_argument("--out", default="audit-out", help="output folder (--quick: <out>/quick)")
    ap.add_argument("--eval", nargs="*", type=cli.execution, default=None, metavar="EXECUTION",
                    help="executions besides layered, RS and MS at the model's K, e.g. RS:K=1 "
                         "MS:K=64 MS:drain (none: RS and MS at K = 1, 8 and 64 but the model's own)")
    ap.add_argument("--K", type=pos_int, nargs="*", default=None,
                    action=cli.deprecated("--eval RS:K=k MS:K=k"), help=argparse.SUPPRESS)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS),
                    help="chip presets of SPEC 7")
    ap.add_argument("--neurons-per-core", type=pos_int, default=32, help="for the spinnaker preset")
    ap.add_argument("--steps-after-output", type=nonneg_int, nargs="*",
                    default=list(DEFAULT_STEPS_AFTER_OUTPUT),
                    help="F values of the accuracy-vs-F curve (none given: skip the curve)")
    ap.add_argument("--max-test", type=pos_int, default=None,
                    help="evaluate a seeded random subset of this many test samples (none: all)")
    ap.add_argument("--max-samples", dest="max_test", type=pos_int, default=None,
                    action=cli.deprecated("--max-test"), help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=pos_int, default=64, help="samples per batch")
    ap.add_argument("--seed", type=nonneg_int, default=0,
                    help="evaluation randomness (RS), subsets, fine-tuning")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 test (and training) samples, F in {0, 1} (options given "
                         "on the command line win), written under <out>/quick")
    ap.add_argument("--fresh", action="store_true",
                    help="replace the results of another audit in --out")
    ft = ap.add_argument_group("fine-tuning (unlayered training from the model's weights)")
    ft.add_argument("--finetune-epochs", type=nonneg_int, default=0, metavar="EPOCHS",
                    help="epochs of unlayered fine-tuning (0: none)")
    ft.add_argument("--finetune", dest="finetune_epochs", type=nonneg_int, default=0,
                    action=cli.deprecated("--finetune-epochs"), help=argparse.SUPPRESS)
    ft.add_argument("--finetune-policy", choices=["MS", "RS"], default="MS",
                    help="scheduling policy trained through")
    ft.add_argument("--lr", type=cli.positive(float), default=1e-3, help="Adam learning rate")
    ft.add_argument("--weight-decay", type=cli.at_least(0.0, float), default=1e-5,
                    help="Adam L2 coefficient")
    ft.add_argument("--refractory-dropout", type=cli.probability, default=0.8, help="paper: 0.8")
    ft.add_argument("--momentum-noise", type=cli.at_least(0.0, float), default=1e-6, help="MS only")
    ft.add_argument("--fill-slots", action=argparse.BooleanOptionalAction, default=True,
                    help="unlayered training with slot filling (SPEC 8 fill_slots: unused slots "
                         "carry silent neurons' zero outboxes, so the gradient reaches them)")
    ft.add_argument("--max-train", type=pos_int, default=None,
                    help="train on a seeded random subset of this many samples (none: all)")
    ap.add_argument("--device", type=cli.device, default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=cli.threads, default=None,
                    help="torch CPU threads (none: torch's choice)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _validate(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """What argparse's types cannot see: files, folders, the data's kind."""
    from . import cli

    model = Path(a.model)
    if not model.is_file():
        ap.error(f"MODEL {a.model!r}: no such file")
    if model.suffix not in (".nir", ".pt", ".pth"):
        ap.error(f"MODEL {a.model!r}: expected a .nir file or a .pt checkpoint")
    if a.data in RECIPE_DATA:
        if not Path(a.data_dir).is_dir():
            ap.error(f"--data {a.data} reads tonic's files under --data-dir, but "
                     f"{a.data_dir!r} is not a folder")
    elif a.data != "digits":
        if not a.data.endswith(".pt"):
            ap.error(f"--data {a.data!r}: choose {', '.join(RECIPE_DATA)}, digits or a .pt file")
        if not Path(a.data).is_file():
            ap.error(f"--data {a.data!r}: no such file")
    try:
        cli.out_folder(a.out)
    except ValueError as err:
        ap.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asynctrain.audit``: the exit status (0 done, 1 fine-tuning diverged,
    2 bad arguments, data, model files or paths, 130 interrupted)."""
    from . import cli
    from .outdir import check_owner, claim

    ap = _parser()
    a = ap.parse_args(argv)
    if a.K is not None and a.eval is None:  # the deprecated --K sweep
        a.eval = [f"{p}:K={k}" for p in ("RS", "MS") for k in a.K]
    if a.quick:
        changed = cli.apply_quick(a, cli.explicit(ap, argv), QUICK)
        a.out = str(Path(a.out) / "quick")
        print(f"--quick: {', '.join(changed) or 'nothing changed (every value given)'}; out {a.out}")
    _validate(ap, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)

    def body() -> int:
        with claim(out):
            check_owner(out, RECORD, _identity(a), fresh=a.fresh, outputs=OUTPUTS)
            return _run(a, out)

    return cli.guarded(body, "rerun the same command (the audit starts over)")


def _identity(a: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(a).items() if k not in _NOT_IDENTITY}


def _run(a: argparse.Namespace, out: Path) -> int:
    from .experiment import subset
    from .outdir import write_record
    from .report import markdown_table, table_rows, write_report
    from .train import TrainingDiverged

    try:
        snn = load_model_file(a.model, a.dt).to(a.device)
        test_ds = load_data(a.data, train=False, data_dir=a.data_dir, T=a.T, min_files=a.min_files)
        check_fit(snn, test_ds, a.data)
        train_ds = None
        if a.finetune_epochs:
            train_ds = load_data(a.data, train=True, data_dir=a.data_dir, T=a.T,
                                 min_files=a.min_files)
            check_fit(snn, train_ds, a.data)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    test_ds = subset(test_ds, a.max_test, a.seed + 1)
    loader = DataLoader(test_ds, batch_size=a.batch_size, shuffle=False,
                        collate_fn=collate_time_major)
    layers = list(snn.graph.layer_sizes)
    print(f"audit of {a.model}: layers {layers}, K={snn.cfg.K}, dt={snn.cfg.dt:g} ms; data "
          f"{a.data}: {len(test_ds)} test samples; out: {out}")
    frame_dt = RECIPE_DATA.get(a.data, {}).get("dt")
    if frame_dt is not None and frame_dt != snn.cfg.dt:
        print(f"note: {a.data} is framed at {frame_dt:g} ms per frame (its recipe) and each frame "
              f"is one timestep of the model, whose decay per timestep was set for dt = "
              f"{snn.cfg.dt:g} ms")
    kw = dict(executions=a.eval, presets=a.presets, neurons_per_core=a.neurons_per_core,
              steps_after_output=a.steps_after_output, seed=a.seed, progress=not a.no_progress)
    label = "As given"
    write_record(out, RECORD, _identity(a))  # from here on, --out holds this audit's files
    try:  # samples are read lazily: a corrupt one shows up here
        results = {label: audit(snn, loader, **kw)}
        sentences = [loss_sentence(results[label], "The model")]
        if a.finetune_epochs:
            tuned = _finetune(snn, train_ds, a, out)
            label_ft = f"Fine-tuned unlayered {a.finetune_policy} ({a.finetune_epochs} epochs)"
            results[label_ft] = audit(tuned, loader, **kw)
            sentences.append(loss_sentence(results[label_ft], "Fine-tuned, it"))
    except DataFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: fine-tuning diverged: {err}", file=sys.stderr)
        return 1
    title = f"Audit of {Path(a.model).name} on {a.data} ({len(test_ds)} test samples)"
    paths = write_report(out, results, title, extra=dict(args=vars(a), sentences=sentences))
    text = [markdown_table(table_rows(results), title)]
    for lab, res in results.items():
        text += [f"Accuracy vs forward steps allowed after the first output spike ({lab}):", "",
                 curve_table(res)]
    text += sentences
    write_text(out / "audit.md", "\n".join(text) + "\n", "audit report")
    print()
    print("\n".join(text))
    print(f"\nwritten under {out}/: audit.md, " + ", ".join(p.name for p in paths.values())
          + (", finetuned.nir, finetuned.pt" if a.finetune_epochs else ""))
    return 0


def _finetune(snn: AsyncSNN, train_ds: Dataset, a: argparse.Namespace, out: Path) -> AsyncSNN:
    from . import nir as anir
    from .checkpoint import save_model
    from .experiment import subset
    from .train import fit

    train_ds = subset(train_ds, a.max_train, a.seed)
    dl = DataLoader(train_ds, batch_size=a.batch_size, shuffle=True, collate_fn=collate_time_major)
    ms = a.finetune_policy == "MS"
    cfg = snn.cfg.replace(policy=a.finetune_policy, stop="spiking_done",
                          refractory_dropout=a.refractory_dropout,
                          momentum_noise=a.momentum_noise if ms else 0.0,
                          fill_slots=a.fill_slots)
    tuned = AsyncSNN(copy.deepcopy(snn.net), cfg, backend=snn.backend, input_shape=snn.graph.input_shape)
    log = out / "finetune.jsonl"
    if log.exists():
        log.unlink()  # this audit's log only (check_owner let this run own --out)
    fit(tuned, dl, a.finetune_epochs, a.lr, a.weight_decay, seed=a.seed, progress=not a.no_progress,
        log_path=log, resume=False, desc=f"fine-tune unlayered {a.finetune_policy}")
    tuned.cfg = snn.cfg.replace(policy=a.finetune_policy)  # the training knobs stay behind
    out.mkdir(parents=True, exist_ok=True)
    anir.write(out / "finetuned.nir", tuned)
    save_model(out / "finetuned.pt", tuned, finetune=dict(epochs=a.finetune_epochs, lr=a.lr,
                                                          source=str(a.model), data=a.data))
    return tuned


if __name__ == "__main__":
    sys.exit(main())
