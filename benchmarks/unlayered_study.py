"""Why unlayered training fits worse than layered: one run per variant, on a
validation split carved from the demo's training split (the test split is never
read). One JSON line per run on stdout (and appended to --log).

    OMP_NUM_THREADS=1 python benchmarks/unlayered_study.py --variants base lr2e-3 \\
        --policies RS MS --modes frame queued --seeds 0

A variant is a name of VARIANTS (a dict of changes to the demo's settings) or
``key=value,key=value`` of such changes. Keys: any `Hyper` field, plus ``stop``
/ ``F`` (the training stop condition), ``init`` ("layered": warm-start from the
layered model of the same seed, trained once and cached under --cache) and
``fill_slots`` / ``input_order`` (engine options, when the engine has them), and
(round 2) ``T`` (timesteps of the data), ``schedule`` ("cosine" or "step": the
learning rate per epoch; step = /10 after 2/3 of the epochs) and ``infer_K`` (the K
of the final evaluation; train at ``K``, infer at ``infer_K``).
Modes: "frame" (the whole input frame is one forward step, prioritize_input=True,
as the paper's code) and "queued" (input spikes queued with the others).

Each line holds: the training accuracy per epoch (training execution, with its
regularisers), the validation accuracy and density per epoch under the model's own
asynchronous execution (the paper's inference stop), and gradient diagnostics on one
fixed training batch before and after training (norm per layer, fraction of hidden
neurons reached, cosine with the layered gradient). After training, ``final``: the
validation accuracy under the model's own policy at ``infer_K`` and under queued MS at
K = 8 (the ceiling question), over EVAL_SEEDS input orders (mean, and the accuracy of
the majority vote of those orders: how much of the error is the order's chance), and
``final_train``: the same on N_VAL training samples.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
from asynctrain import data  # noqa: E402
from asynctrain.data import collate_time_major  # noqa: E402
from asynctrain.diagnostics import gradient_report  # noqa: E402
from asynctrain.experiment import Hyper, build_snn  # noqa: E402
# _run: one pass with per-sample predictions (for the vote), which evaluate() does not return
from asynctrain.evaluate import _run, inference_config  # noqa: E402
from asynctrain.train import fit, save_checkpoint  # noqa: E402

T = 8
N_VAL = 300
EVAL_SEEDS = (0, 1, 2)
VARIANTS: dict[str, dict] = {
    "base": {},
    "barrier": dict(barrier_messages=True),  # the old gradient-fill workaround
    "fill": dict(fill_slots=True),
    "steep1": dict(steepness=1.0), "steep5": dict(steepness=5.0), "steep10": dict(steepness=10.0),
    "rate": dict(loss="rate"), "per_pass": dict(loss="per_pass"),
    "lr2e-3": dict(lr=2e-3), "lr1e-2": dict(lr=1e-2),
    "stop_out1": dict(stop="output", F=1), "stop_out4": dict(stop="output", F=4),
    "refdrop0": dict(refractory_dropout=0.0), "refdrop0.5": dict(refractory_dropout=0.5),
    "refdrop1": dict(refractory_dropout=1.0),
    "indrop0.2": dict(input_dropout=0.2),
    "detach": dict(detach_reset=True),
    "warm": dict(init="layered"),
    "warm5": dict(init="layered", epochs=5),
}
ENGINE_KEYS = ("fill_slots", "input_order", "detach_reset", "barrier_messages", "network_dropout", "surrogate_at")


def base_hyper() -> Hyper:
    """The demo's settings before this study (without its gradient fill)."""
    return Hyper(hidden=(32, 32, 32), dt=10.0, batch_size=64, epochs=20, lr=5e-3, theta=0.3,
                 weight_decay=1e-5, tau=1.0, steepness=2.0, input_dropout=0.0, K=8,
                 refractory_dropout=0.8, momentum_noise=1e-6)


def splits(seed: int = 0, steps: int = T):
    """(train, val) of the digits training split: N_VAL samples held out, seeded."""
    full = data.digits(train=True, T=steps, seed=0)
    perm = np.random.default_rng(seed).permutation(len(full))
    return Subset(full, np.sort(perm[N_VAL:]).tolist()), Subset(full, np.sort(perm[:N_VAL]).tolist())


def parse_variant(spec: str) -> tuple[str, dict]:
    if spec in VARIANTS:
        return spec, dict(VARIANTS[spec])
    changes = {}
    for part in re.split(r",(?![^\[]*\])", spec):  # commas inside [...] belong to a list
        k, v = part.split("=", 1)
        try:
            changes[k] = json.loads(v)
        except json.JSONDecodeError:
            changes[k] = v  # a plain string: stop=output, loss=rate
    return spec, changes


def make_model(h: Hyper, policy: str, mode: str, seed: int, engine: dict):
    h = replace(h, prioritize_input=(mode == "frame"))
    snn = build_snn(64, 10, h, policy, seed)
    if engine:
        snn.cfg = snn.cfg.replace(**engine)
    return snn, h


def layered_checkpoint(cache: Path, h: Hyper, seed: int, train_dl, epochs: int) -> Path:
    """The layered start model of a warm start: `h`'s network, trained at the demo's
    learning rate and weight decay (not the fine-tuning's), cached per seed."""
    base = base_hyper()
    path = cache / f"layered_seed{seed}_e{epochs}_lr{base.lr:g}.pt"
    if not path.is_file():
        snn = build_snn(64, 10, replace(h, epochs=epochs), "layered", seed)
        fit(snn, train_dl, epochs, base.lr, base.weight_decay, seed=seed, progress=False)
        save_checkpoint(path, snn, None, epoch=epochs)
    return path


def run_one(name: str, changes: dict, policy: str, mode: str, seed: int, epochs: int,
            cache: Path, layered_epochs: int) -> dict:
    changes = dict(changes)
    stop, F = changes.pop("stop", None), changes.pop("F", None)
    init = changes.pop("init", None)
    ep = int(changes.pop("epochs", epochs))
    steps, schedule = int(changes.pop("T", T)), changes.pop("schedule", None)
    infer_K = changes.pop("infer_K", None)
    engine = {k: changes.pop(k) for k in ENGINE_KEYS if k in changes}
    if mode == "queued" and "input_order" not in engine and _has_field("input_order"):
        engine["input_order"] = "random"
    h = replace(base_hyper(), **changes)
    train_ds, val_ds = splits(0, steps)
    train_dl = DataLoader(train_ds, batch_size=h.batch_size, shuffle=True,
                          collate_fn=collate_time_major)
    val_dl = DataLoader(val_ds, batch_size=150, shuffle=False, collate_fn=collate_time_major)
    snn, h = make_model(h, policy, mode, seed, engine)
    init_from = None
    if init == "layered":
        init_from = layered_checkpoint(cache, h, seed, train_dl, layered_epochs)
    frames, labels = next(iter(DataLoader(train_ds, batch_size=128, shuffle=False,
                                          collate_fn=collate_time_major)))
    t0 = time.perf_counter()
    if init_from is not None:
        fit(snn, train_dl, 0, h.lr, progress=False, init_from=init_from)
    before = gradient_report(snn, frames, labels, seed=seed, loss=h.loss)
    start = final_eval(snn, val_dl, policy, infer_K or h.K) if init_from is not None else None
    with lr_schedule(schedule, ep):
        hist = fit(snn, train_dl, ep, h.lr, h.weight_decay, seed=seed, progress=False,
                   loss=h.loss, stop=stop, steps_after_output=F, val_loader=val_dl)
    after = gradient_report(snn, frames, labels, seed=seed, loss=h.loss)
    from asynctrain.evaluate import evaluate

    # the fit on the training data under the inference execution (no regularisers,
    # the paper's inference stop): the training accuracy without the training-only
    # settings, on N_VAL training samples
    fit_dl = DataLoader(Subset(train_ds, list(range(N_VAL))), batch_size=150, shuffle=False,
                        collate_fn=collate_time_major)
    own = "layered" if policy == "layered" else policy
    train_inf = evaluate(snn, fit_dl, [own], steps_after_output=None, seed=seed)[own].accuracy
    async_val = {}
    if policy == "layered":  # the layered model run as a chip runs it
        res = evaluate(snn, val_dl, ["RS", "MS"], steps_after_output=None, seed=seed)
        async_val = {k: dict(accuracy=round(v.accuracy, 4), density=round(v.density, 4))
                     for k, v in res.items()}
    r = lambda x: round(float(x), 4)  # noqa: E731
    extra = {k: v for k, v in dict(T=steps, schedule=schedule, infer_K=infer_K).items()
             if v is not None and (k, v) != ("T", T)}  # only what differs from the default
    return dict(variant=name, policy=policy, mode=mode, seed=seed, epochs=ep,
                changes={**changes, **engine, **({"stop": stop, "F": F} if stop else {}),
                         **({"init": init} if init else {}),
                         **extra},
                train_acc=[r(x["train_accuracy"]) for x in hist],
                val_acc=[r(x["val_accuracy"]) for x in hist],
                val_density=[r(x["val_density"]) for x in hist],
                best_val=r(max(x["val_accuracy"] for x in hist)),
                last_val=r(hist[-1]["val_accuracy"]), last_train=r(hist[-1]["train_accuracy"]),
                grad_before={k: _round(v) for k, v in before.items()},
                grad_after={k: _round(v) for k, v in after.items()},
                train_inference_acc=round(train_inf, 4), async_val=async_val,
                final=final_eval(snn, val_dl, policy, infer_K or h.K, mode == "queued"),
                # the same on N_VAL training samples: can the inference execution fit them?
                final_train=final_eval(snn, fit_dl, policy, infer_K or h.K, mode == "queued"),
                **({"start": start} if start else {}),
                seconds=round(time.perf_counter() - t0, 1))


def final_eval(snn, val_dl, policy: str, K: int, ms8: bool = True) -> dict:
    """Validation accuracy after training over EVAL_SEEDS input orders: under the
    model's own policy at `K` ("own") and, for queued input, under MS at K = 8 ("MS8",
    whatever the model was trained for). Per execution: mean accuracy over the orders,
    and the accuracy of the majority vote of the orders' predictions."""
    execs = {"own": dict(policy=policy, forward_group_size=K)} if policy != "layered" else {}
    if ms8:
        execs["MS8"] = dict(policy="MS", forward_group_size=8)
    out, trained, was_training = {}, snn.cfg, snn.training
    n_hidden = sum(snn.graph.layer_sizes[1:-1])
    snn.eval()
    snn.cfg = inference_config(trained)  # no training-only setting at inference
    try:
        with torch.no_grad():
            for name, over in execs.items():
                over = dict(over, stop="output", steps_after_output=1)
                runs = [_run(snn, val_dl, over, s, None, torch.device("cpu")) for s in EVAL_SEEDS]
                preds = np.stack([r["prediction"] for r in runs])  # [orders, samples]
                vote = np.array([np.bincount(col, minlength=10).argmax() for col in preds.T])
                out[name] = dict(acc=round(float(np.mean([r["accuracy"] for r in runs])), 4),
                                 vote=round(float((vote == runs[0]["label"]).mean()), 4),
                                 density=round(float(np.mean([r["hidden_spikes"].mean()
                                                              for r in runs])) / n_hidden, 4))
    finally:
        snn.cfg = trained
        snn.train(was_training)
    return out


class lr_schedule:
    """Context: the learning rate of `fit`'s epoch e (from 0) of `epochs` becomes
    lr * factor(e): "cosine": (1 + cos(pi e / epochs)) / 2; "step": 1/10 from epoch
    2/3 epochs on; "warmup": a linear ramp (e + 1) / (WARMUP + 1) over the first WARMUP
    epochs, then 1; "warmup_cosine": the ramp, then cosine decay over the rest; None:
    constant. `fit` sets Adam's lr at the start of every epoch from
    `asynctrain.train.scheduled_lr`, which this replaces for the duration (an lr set
    on Adam between epochs would be overwritten)."""

    WARMUP = 2
    KINDS = (None, "cosine", "step", "warmup", "warmup_cosine")

    def __init__(self, kind: str | None, epochs: int):
        if kind not in self.KINDS:
            raise ValueError(f"schedule must be one of {self.KINDS[1:]}, got {kind!r}")
        self.kind, self.epochs = kind, epochs

    def factor(self, e: int) -> float:
        if self.kind == "cosine":
            return (1 + np.cos(np.pi * e / self.epochs)) / 2
        if self.kind == "step":
            return 0.1 if e >= round(2 * self.epochs / 3) else 1.0
        if self.kind in ("warmup", "warmup_cosine") and e < self.WARMUP:
            return (e + 1) / (self.WARMUP + 1)
        if self.kind == "warmup_cosine":
            return (1 + np.cos(np.pi * (e - self.WARMUP) / (self.epochs - self.WARMUP))) / 2
        return 1.0

    def __enter__(self):
        if self.kind is not None:
            from asynctrain import train

            self.saved = train.scheduled_lr
            train.scheduled_lr = lambda lr, schedule, epoch, epochs: lr * float(self.factor(epoch))
        return self

    def __exit__(self, *exc):
        if self.kind is not None:
            from asynctrain import train

            train.scheduled_lr = self.saved


def _round(v):
    return [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)


def _has_field(name: str) -> bool:
    from asynctrain.config import SimConfig

    return name in {f.name for f in dataclasses.fields(SimConfig)}


def summary(paths) -> str:
    """A Markdown table of JSON-line results: training accuracy (last epoch), the
    validation accuracy under the model's own execution (mean of the last 5
    epochs, less noisy than one epoch on 300 samples; and the last epoch), density,
    the fraction of hidden neurons reached by gradient and the cosine with the
    layered gradient (per layer, after training), and the final evaluation over
    EVAL_SEEDS orders (mean accuracy, majority vote in brackets)."""
    lines = ["| variant | mode | run | policy | train acc | train acc, inference | val acc (last 5) | val acc (last) "
             "| density | reached | cos vs layered | final own (vote) | final MS K=8 (vote) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for path in paths:
        for text in open(path):
            r = json.loads(text)
            va = r["val_acc"]
            g = r["grad_after"]
            lines.append(
                f"| {r['variant']} | {r['mode']} | s{r['seed']} {r['epochs']} ep | {r['policy']} | "
                f"{r['last_train']:.3f} | {r.get('train_inference_acc', float('nan')):.3f} | "
                f"{sum(va[-5:]) / len(va[-5:]):.3f} | {r['last_val']:.3f} | "
                f"{r['val_density'][-1]:.2f} | {' '.join(f'{x:.2f}' for x in g['reached'])} | "
                f"{' '.join(f'{x:.2f}' for x in g['cosine_layered'])} | "
                + " | ".join(_final(r.get("final", {}).get(k)) for k in ("own", "MS8")) + " |")
    return "\n".join(lines)


def _final(f: dict | None) -> str:
    return "" if not f else f"{f['acc']:.3f} ({f['vote']:.3f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--policies", nargs="+", default=["RS", "MS"], choices=["layered", "RS", "MS"])
    ap.add_argument("--modes", nargs="+", default=["frame"], choices=["frame", "queued"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--layered-epochs", type=int, default=20)
    ap.add_argument("--cache", default="study-cache")
    ap.add_argument("--log", default=None, help="append the JSON lines here too")
    ap.add_argument("--summary", nargs="+", metavar="JSONL", help="print a table of these results")
    a = ap.parse_args(argv)
    if a.summary:
        print(summary(a.summary))
        return 0
    torch.set_num_threads(1)
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    for spec in a.variants:
        name, changes = parse_variant(spec)
        for mode in a.modes:
            for policy in a.policies:
                for seed in a.seeds:
                    line = json.dumps(run_one(name, changes, policy, mode, seed, a.epochs, cache,
                                              a.layered_epochs))
                    print(line, flush=True)
                    if a.log:
                        with open(a.log, "a") as f:
                            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
