"""Why unlayered training underfits, across tasks (round 3 of
docs/unlayered_training.md): one run per (task, variant, policy, input mode, seed)
on the tasks of `asynctrain.tasks`, validation splits only unless --final. One JSON
line per run on stdout (and appended to --log).

    OMP_NUM_THREADS=1 python benchmarks/task_study.py --tasks rates order digits \\
        --variants base calib=0.1 --policies layered RS MS --modes frame queued --seeds 0

A variant is ``key=value,key=value`` (values JSON, or plain strings), applied on top
of the base recipe `BASE` (the demo's unlayered recipe; `base=hyper` starts from
`Hyper()`'s defaults instead, which is what part 3 of the study checks). Keys: any
`Hyper` field (`detach_reset` and `surrogate_at` among them: unlayered training
only); SimConfig fields (`readout`, ...: set on the model's
config after it is built); and the study's own:

- ``calib``: data-driven initialisation, `asynctrain.calibrate.calibrate_rates` with
  this rate (spikes per neuron and timestep) on 256 training samples before training;
  ``calib_out``: the output layer's rate (default: ``calib``);
- ``warm``: true: start from the weights of the base recipe's layered model of the
  same task and seed (trained first, kept for the process), then train the
  variant's epochs at its lr (fine-tuning);
- ``gradnorm``: true: every weight layer's gradient is scaled to norm 1 before Adam;
- ``schedule``: a schedule of unlayered_study's `lr_schedule`, e.g. "warmup" (lr
  ramps linearly over the first 2 epochs, then constant) or "warmup_cosine" (the
  ramp, then cosine decay); Hyper's ``lr_schedule="cosine"`` is `fit`'s own.

The base recipe's `fill_slots` applies to unlayered models only (SimConfig ignores it
under "layered"). Every model is evaluated at the end (``final``) on the validation
split under the executions of its table row (unlayered: its own policy at K, and the
other policy; the layered model: layered, RS and MS at K), over the input orders of EVAL_SEEDS (mean
accuracy and density), and under its own execution on N_FIT training samples
(``final_train``: how well the inference execution fits the training data).
``init``: at initialisation (after calibration), the rate of every layer (layered
execution), the fraction of training passes with an output spike and the gradient
diagnostics of one training batch (norm per layer, hidden neurons reached, cosine
with the layered gradient); ``after``: the gradient diagnostics after training.
--final reads the test split instead (once, at the very end); --held-out allows
the held-out task.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unlayered_study import emit, lr_schedule, parse_variant  # noqa: E402

from asynctrain import tasks  # noqa: E402
from asynctrain.calibrate import calibrate_rates, layer_rates  # noqa: E402
from asynctrain.config import SimConfig  # noqa: E402
from asynctrain.data import collate_time_major  # noqa: E402
from asynctrain.diagnostics import gradient_report  # noqa: E402
from asynctrain.evaluate import evaluate  # noqa: E402
from asynctrain.experiment import Hyper, build_snn  # noqa: E402
from asynctrain.train import fit  # noqa: E402

EVAL_SEEDS = (0, 1, 2)
N_FIT = 600  # training samples of final_train
N_CALIB = 256  # training samples of the calibration batch
N_DIAG = 128  # training samples of the gradient diagnostics
BASE = dict(batch_size=64, epochs=20, lr=5e-3, weight_decay=1e-5, steepness=2.0,
            refractory_dropout=0.8, momentum_noise=1e-6, fill_slots=True,
            train_stop="spiking_done", lr_schedule=None, detach_reset=False, surrogate_at="every")
"""The demo's unlayered recipe (recipes/demo.py), the start of round 3 (every training
setting pinned: Hyper's defaults became round 3's recipe afterwards)."""
STUDY_KEYS = ("calib", "calib_out", "gradnorm", "schedule", "base", "warm")
ROW_EXECUTIONS = {"layered": ("layered", "RS", "MS"), "RS": ("RS", "MS"), "MS": ("MS", "RS")}
"""Executions of the final evaluation: the table row's (first) and the other policy's
(does a model trained under one policy run better under the other?)."""


def make_hyper(task: tasks.Task, policy: str, mode: str, changes: dict
               ) -> tuple[Hyper, dict, dict]:
    """(Hyper, SimConfig changes, study options) of one run: the task's network,
    tau, dt and theta, K = 8, the input mode, then the base recipe and `changes`."""
    changes = dict(changes)
    study = {k: changes.pop(k) for k in STUDY_KEYS if k in changes}
    hyper_fields = {f.name for f in dataclasses.fields(Hyper)}
    engine = {k: changes.pop(k) for k in list(changes) if k not in hyper_fields}
    unknown = set(engine) - {f.name for f in dataclasses.fields(SimConfig)}
    if unknown:
        raise ValueError(f"unknown variant key(s) {sorted(unknown)}: not a Hyper, SimConfig or "
                         f"study key ({', '.join(STUDY_KEYS)})")
    base = {} if study.get("base") == "hyper" else BASE
    h = Hyper(hidden=task.hidden, tau=task.tau, dt=task.dt, theta=task.theta, K=8,
              prioritize_input=(mode == "frame"), **base)
    if "hidden" in changes:
        changes["hidden"] = tuple(changes["hidden"])
    return replace(h, **changes), engine, study


@contextlib.contextmanager
def grad_norm_hooks(snn, enabled: bool):
    """Scale each weight layer's gradient to norm 1 (per batch) while active."""
    handles = []
    if enabled:
        for p in snn.net.parameters():
            handles.append(p.register_hook(lambda g: g / g.norm().clamp_min(1e-30)))
    try:
        yield
    finally:
        for hd in handles:
            hd.remove()


def _loader(ds, batch: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, collate_fn=collate_time_major)


def _first(ds, n: int):
    return next(iter(_loader(Subset(ds, range(min(n, len(ds)))), n)))


def evaluate_row(snn, loader, policy: str, K: int, own_only: bool = False) -> dict:
    """Accuracy and density under the executions of ROW_EXECUTIONS[policy] (only the
    first with `own_only`), at K, with the paper's inference stop, mean over the
    orders of EVAL_SEEDS."""
    out = {}
    for ex in ROW_EXECUTIONS[policy][:1 if own_only else None]:
        spec = ex if ex == "layered" else f"{ex}:K={K}"
        runs = [evaluate(snn, loader, [spec], steps_after_output=None, seed=s, progress=False)
                for s in (EVAL_SEEDS if ex != "layered" else EVAL_SEEDS[:1])]
        res = [next(iter(r.values())) for r in runs]
        out[ex] = dict(acc=round(float(np.mean([r.accuracy for r in res])), 4),
                       density=round(float(np.mean([r.density for r in res])), 4))
    return out


def _grad(rep: dict) -> dict:
    r = lambda v: [round(x, 4) if x == x else None for x in v] if isinstance(v, list) else round(v, 4)  # noqa: E731
    return {k: r(v) for k, v in rep.items()}


@functools.lru_cache(maxsize=None)
def layered_start(task_name: str, mode: str, seed: int, hidden: tuple[int, ...]) -> dict:
    """The weights of the layered model of the base recipe (`task`, `seed`, hidden
    layers `hidden`): the start of a warm start (``warm=true``; the variant's epochs
    and lr then fine-tune it)."""
    task = tasks.get(task_name)
    h, _, _ = make_hyper(task, "layered", mode, {"hidden": hidden})
    snn = build_snn(task.n_inputs, task.n_classes, h, "layered", seed)
    fit(snn, _loader(task.split("train"), h.batch_size, shuffle=True), h.epochs, h.lr,
        h.weight_decay, seed=seed, progress=False, loss=h.loss)
    return {k: v.clone() for k, v in snn.net.state_dict().items()}


def run_one(task_name: str, name: str, changes: dict, policy: str, mode: str, seed: int,
            final: bool = False, held_out: bool = False) -> dict:
    task = tasks.get(task_name)
    if task.held_out and not held_out:
        raise ValueError(f"task {task_name!r} is held out of every tuning decision; pass "
                         f"--held-out only for the final runs")
    h, engine, study = make_hyper(task, policy, mode, changes)
    train_ds = task.split("train")
    eval_ds = task.split("test" if final else "val")
    snn = build_snn(task.n_inputs, task.n_classes, h, policy, seed)
    if engine:
        snn.cfg = snn.cfg.replace(**engine)
    t0 = time.perf_counter()
    scales = None
    if study.get("warm"):
        snn.net.load_state_dict(layered_start(task_name, mode, seed, h.hidden))
    if study.get("calib"):
        frames, _ = _first(train_ds, N_CALIB)
        scales = calibrate_rates(snn, frames, float(study["calib"]), study.get("calib_out"))
    frames, labels = _first(train_ds, N_DIAG)
    train_k = h.train_K if (h.train_K is not None and policy != "layered") else h.K
    with snn.configured(forward_group_size=train_k):
        init = dict(layer_rates=[round(x, 4) for x in layer_rates(snn, frames)],
                    grad=_grad(gradient_report(snn, frames, labels, seed=seed, loss=h.loss)))
        snn.train()
        with torch.no_grad():
            snn(frames, seed=seed)
        init["passes_with_output"] = round(float((snn.stats["first_output_step"] > 0)
                                                 .double().mean()), 4)
        with grad_norm_hooks(snn, bool(study.get("gradnorm"))), \
                lr_schedule(study.get("schedule"), h.epochs):
            hist = fit(snn, _loader(train_ds, h.batch_size, shuffle=True), h.epochs, h.lr,
                       h.weight_decay, seed=seed, progress=False, loss=h.loss,
                       val_loader=None if final else _loader(eval_ds, 300),
                       lr_schedule=h.lr_schedule)
        after = _grad(gradient_report(snn, frames, labels, seed=seed, loss=h.loss))
    r4 = lambda x: round(float(x), 4)  # noqa: E731
    fit_ds = Subset(train_ds, range(N_FIT))
    return dict(
        task=task_name, variant=name, changes=changes, policy=policy, mode=mode, seed=seed,
        split="test" if final else "val", epochs=h.epochs, calib_scales=scales,
        train_acc=[r4(x["train_accuracy"]) for x in hist],
        loss=[r4(x["loss"]) for x in hist],
        passes_with_output=[r4(x["passes_with_output"]) for x in hist],
        val_acc=[r4(x["val_accuracy"]) for x in hist if "val_accuracy" in x],
        val_density=[r4(x["val_density"]) for x in hist if "val_density" in x],
        last_train=r4(hist[-1]["train_accuracy"]), init=init, after=after,
        final=evaluate_row(snn, _loader(eval_ds, 300), policy, h.K),
        final_train=evaluate_row(snn, _loader(fit_ds, 300), policy, h.K, own_only=True),
        seconds=round(time.perf_counter() - t0, 1))


# ---------------------------------------------------------------------- summary
def _own(r: dict) -> float:
    return r["final"]["layered" if r["policy"] == "layered" else r["policy"]]["acc"]


def summary(paths, split: str = "val") -> str:
    """Per (task, mode, variant): mean over seeds of the final accuracy of each model
    under its row's executions, and the gap to the layered model of the same task,
    mode and seeds run with the same policy ("vs L"); training accuracy (last epoch).
    The layered reference is the `variant` "layered" rows (any variant whose policy
    is layered is listed as a model of its own too)."""
    rows = [json.loads(t) for p in paths for t in open(p) if t.strip()]
    rows = [r for r in rows if r.get("split", "val") == split]
    ref = defaultdict(list)
    for r in rows:
        if r["policy"] == "layered":
            ref[(r["task"], r["mode"], r["variant"])].append(r)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["mode"], r["variant"], r["policy"])].append(r)
    lines = ["| task | mode | variant | policy | seeds | acc (own exec) | layered under RS / MS | "
             "train acc | fit (train samples, own) | passes with output at init |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (task, mode, variant, policy), rs in sorted(groups.items()):
        m = lambda f, rs=rs: float(np.mean([f(r) for r in rs]))  # noqa: E731
        lr = ""
        if policy == "layered":
            lr = f"{m(lambda r: r['final']['RS']['acc']):.3f} / {m(lambda r: r['final']['MS']['acc']):.3f}"
        lines.append(
            f"| {task} | {mode} | {variant} | {policy} | {len(rs)} | {m(_own):.3f} | {lr} | "
            f"{m(lambda r: r['last_train']):.3f} | "
            f"{m(lambda r: next(iter(r['final_train'].values()))['acc']):.3f} | "
            f"{m(lambda r: r['init']['passes_with_output']):.2f} |")
    return "\n".join(lines)


def diagnostics(paths, variant: str = "base") -> str:
    """The gradient diagnostics of `variant`'s runs, per task, mode and policy (mean
    over seeds): at initialisation the fraction of training passes with an output
    spike, the rate of each layer (layered execution), the gradient norm per weight
    layer (input side first) and the cosine with the layered gradient; the same
    norm and cosine after training; hidden neurons reached by gradient."""
    rows = [json.loads(t) for p in paths for t in open(p) if t.strip()]
    groups = defaultdict(list)
    for r in rows:
        if r["variant"] == variant and r.get("split", "val") == "val":
            groups[(r["task"], r["mode"], r["policy"])].append(r)
    f = lambda v: " / ".join("-" if x is None else f"{x:.2g}" for x in v)  # noqa: E731
    mean = lambda rs, get: [None if any(get(r)[i] is None for r in rs) else  # noqa: E731
                            float(np.mean([get(r)[i] for r in rs])) for i in range(len(get(rs[0])))]
    lines = ["| task | mode | policy | output at init | layer rates at init | grad norm at init | "
             "cos vs layered at init | grad norm after | cos vs layered after | reached after |",
             "|---|---|---|---:|---|---|---|---|---|---|"]
    for (task, mode, policy), rs in sorted(groups.items()):
        lines.append(
            f"| {task} | {mode} | {policy} | "
            f"{np.mean([r['init']['passes_with_output'] for r in rs]):.2f} | "
            f"{f(mean(rs, lambda r: r['init']['layer_rates']))} | "
            f"{f(mean(rs, lambda r: r['init']['grad']['grad_norm']))} | "
            f"{f(mean(rs, lambda r: r['init']['grad']['cosine_layered']))} | "
            f"{f(mean(rs, lambda r: r['after']['grad_norm']))} | "
            f"{f(mean(rs, lambda r: r['after']['cosine_layered']))} | "
            f"{f(mean(rs, lambda r: r['after']['reached']))} |")
    return "\n".join(lines)


def screen(paths, reference: str = "base", seeds: tuple[int, ...] | None = None) -> str:
    """A screening table: one row per variant, one column per (task, mode, unlayered
    policy): the final validation accuracy under the model's own execution, mean over
    the seeds it has, and in brackets the change from `reference` on the same seeds;
    the last columns: the mean change over all cells and the mean training accuracy
    (last epoch) as a fraction of the layered model's of the same task, mode and
    seeds (the "layered" reference rows, policy layered of variant `reference`)."""
    rows = [json.loads(t) for p in paths for t in open(p) if t.strip()]
    rows = [r for r in rows if r.get("split", "val") == "val"
            and (seeds is None or r["seed"] in seeds)]
    acc = defaultdict(dict)  # variant -> (task, mode, policy) -> {seed: acc}
    train = defaultdict(dict)
    lay_async = defaultdict(dict)  # (task, mode, policy) -> {seed: the layered model's acc}
    for r in rows:
        if r["policy"] == "layered" and r["variant"] == reference:
            for p in ("RS", "MS"):
                lay_async[(r["task"], r["mode"], p)][r["seed"]] = r["final"][p]["acc"]
        acc[r["variant"]].setdefault((r["task"], r["mode"], r["policy"]), {})[r["seed"]] = _own(r)
        train[r["variant"]].setdefault((r["task"], r["mode"], r["policy"]), {})[r["seed"]] = \
            r["last_train"]
    cells = sorted({c for v in acc.values() for c in v if c[2] != "layered"})
    head = [f"{t} {m[0]} {p}" for t, m, p in cells]
    lines = ["| variant | " + " | ".join(head) + " | mean change | train / layered |",
             "|---|" + "---:|" * (len(cells) + 2)]
    ref = acc.get(reference, {})
    lay_train = train.get(reference, {})
    lines.append("| (layered model, same execution) | " + " | ".join(
        f"{np.mean(list(lay_async[c].values())):.3f}" if lay_async.get(c) else ""
        for c in cells) + " | | |")
    for variant in sorted(acc, key=lambda v: (v != reference, v)):
        out, deltas, fracs = [], [], []
        for c in cells:
            got = acc[variant].get(c)
            if not got:
                out.append("")
                continue
            a = float(np.mean(list(got.values())))
            base = [ref.get(c, {}).get(s) for s in got]
            if variant != reference and all(b is not None for b in base):
                d = a - float(np.mean(base))
                deltas.append(d)
                out.append(f"{a:.3f} ({d:+.3f})")
            else:
                out.append(f"{a:.3f}")
            lt = [lay_train.get((c[0], c[1], "layered"), {}).get(s) for s in got]
            if all(x is not None for x in lt):
                fracs.append(np.mean(list(train[variant][c].values())) / np.mean(lt))
        md = f"{np.mean(deltas):+.3f}" if deltas else ""
        fr = f"{np.mean(fracs):.2f}" if fracs else ""
        lines.append(f"| {variant} | " + " | ".join(out) + f" | {md} | {fr} |")
    return "\n".join(lines)


def targets(paths, split: str = "test", variant: str = "base=hyper",
            refs: tuple[str, ...] = ("base", "base=hyper")) -> str:
    """The targets of part 3 per (task, input mode, unlayered policy): `variant`'s
    unlayered accuracy under its own execution (mean over seeds) against the layered
    models of the `refs` variants run under the same execution; the margin is taken
    to the stronger of them (target >= +0.05); training accuracy (last epoch) against
    the stronger layered model's (target >= 0.8x)."""
    rows = [json.loads(t) for p in paths for t in open(p) if t.strip()]
    rows = [r for r in rows if r.get("split", "val") == split]
    unl = defaultdict(list)
    lay = defaultdict(list)
    for r in rows:
        if r["policy"] != "layered" and r["variant"] == variant:
            unl[(r["task"], r["mode"], r["policy"])].append(r)
        elif r["policy"] == "layered" and r["variant"] in refs:
            lay[(r["task"], r["mode"], r["variant"])].append(r)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    lines = [f"| task | mode | policy | seeds | unlayered | layered under the same execution ({' / '.join(refs)}) | "
             f"margin | target +0.05 | train acc unlayered / layered | ratio | target 0.8x |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for (task, mode, policy), rs in sorted(unl.items()):
        seeds = {r["seed"] for r in rs}
        same = [mean([r["final"][policy]["acc"] for r in lay[(task, mode, v)] if r["seed"] in seeds]) for v in refs]
        train_l = [mean([r["last_train"] for r in lay[(task, mode, v)] if r["seed"] in seeds]) for v in refs]
        best = int(np.nanargmax(same))
        accs = [r["final"][policy]["acc"] for r in rs]
        acc = mean(accs)
        tr = mean([r["last_train"] for r in rs])
        margin, ratio = acc - same[best], tr / train_l[best]
        lines.append(f"| {task} | {mode} | {policy} | {len(rs)} | {acc:.3f} ± {float(np.std(accs)):.3f} | "
                     f"{' / '.join(f'{x:.3f}' for x in same)} | {margin:+.3f} | "
                     f"{'met' if margin >= 0.05 else 'MISSED'} | {tr:.3f} / {train_l[best]:.3f} | {ratio:.2f} | "
                     f"{'met' if ratio >= 0.8 else 'MISSED'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=tasks.tuning_names(), choices=tasks.names())
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--policies", nargs="+", default=["RS", "MS"], choices=["layered", "RS", "MS"])
    ap.add_argument("--modes", nargs="+", default=["frame", "queued"], choices=["frame", "queued"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--final", action="store_true", help="evaluate on the test split (once)")
    ap.add_argument("--held-out", action="store_true", help="allow the held-out task")
    ap.add_argument("--log", default=None, help="append the JSON lines here too")
    ap.add_argument("--summary", nargs="+", metavar="JSONL", help="print a table of these results")
    ap.add_argument("--targets", nargs="+", metavar="JSONL",
                    help="print part 3's targets (base=hyper's unlayered models against the layered models "
                         "of base and base=hyper under the same execution) of these results; with --final "
                         "the test split's")
    ap.add_argument("--screen", nargs="+", metavar="JSONL",
                    help="print the screening table (variants x cells) of these results "
                         "(--seeds: only these seeds)")
    ap.add_argument("--diagnostics", nargs="+", metavar="JSONL",
                    help="print the gradient diagnostics of --variants' first variant")
    a = ap.parse_args(argv)
    if a.diagnostics:
        print(diagnostics(a.diagnostics, a.variants[0]))
        return 0
    if a.summary:
        print(summary(a.summary, "test" if a.final else "val"))
        return 0
    if a.targets:
        print(targets(a.targets, "test" if a.final else "val"))
        return 0
    if a.screen:
        seeds = tuple(a.seeds) if "--seeds" in (argv or sys.argv) else None
        print(screen(a.screen, seeds=seeds))
        return 0
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*no output spike")
    for spec in a.variants:
        name, changes = parse_variant(spec)
        for task in a.tasks:
            for mode in a.modes:
                for policy in a.policies:
                    for seed in a.seeds:
                        emit(run_one(task, name, changes, policy, mode, seed, a.final,
                                     a.held_out), a.log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
