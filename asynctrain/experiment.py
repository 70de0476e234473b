"""The paper's experiment as a function: train models (layered, unlayered RS / MS),
evaluate each under a matrix of executions, write the report. The recipes in
``recipes/`` are this plus a data set and the paper's hyper-parameters (SPEC 10):

    python recipes/nmnist.py --data-dir data --out runs/nmnist
    python recipes/shd.py --train layered MS --K 4 --epochs 20
    python recipes/dvs_gesture.py --quick            # smoke run on a few samples

Files under ``--out``: ``table.md`` (tables 2 + 3 of the paper for this data set),
``results.json``, ``latency.png``, ``accuracy_vs_steps.png``,
``currents_to_spike.png``, and per trained model ``<policy>/model.pt`` (checkpoint,
resumed when present; ``--fresh`` starts over) and ``<policy>/train.jsonl`` (log).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import SimConfig
from .data import collate_time_major
from .evaluate import DEFAULT_STEPS_AFTER_OUTPUT, UBRAIN_ENERGY_PER_SO, Execution, evaluate
from .module import AsyncSNN
from .train import fit

__all__ = ["Hyper", "TRAIN_LABELS", "PAPER_EXECUTIONS", "build_snn", "train_config",
           "paper_executions", "run_models", "subset"]

TRAIN_LABELS = {"layered": "Layered", "RS": "Unlayered RS", "MS": "Unlayered MS"}
PAPER_EXECUTIONS = {"layered": ("layered", "RS", "MS"), "RS": ("RS",), "MS": ("MS",)}
"""Table 2 of the paper (plus the layered model under async MS): which executions
each trained model is evaluated under when ``--eval paper`` (the default)."""


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one data set (the paper's table 6; SPEC 10).

    ``hidden``: hidden layer sizes; ``tau`` and ``dt`` in ms; the regularisers apply
    only while training unlayered or layered (input dropout applies to both,
    refractory dropout and momentum noise only to the asynchronous executions).
    Defaults: the paper's N-MNIST column where it has one, a 2 x 128 hidden MLP.
    """

    hidden: tuple[int, ...] = (128, 128)
    dt: float = 10.0
    batch_size: int = 64
    epochs: int = 20
    lr: float = 5e-4
    theta: float = 0.3
    weight_decay: float = 1e-5
    tau: float = 100.0
    steepness: float = 2.0
    input_dropout: float = 0.0
    K: int = 8
    refractory_dropout: float = 0.8
    momentum_noise: float = 1e-6
    prioritize_input: bool = False
    loss: str = "counts"
    init_gain: float = 1.0
    gradient_fill: bool = False
    """Deprecated alias of `fill_slots` (it used to send zero-valued barrier messages
    during unlayered training, which under RS take slots and change the spikes);
    `train_config` maps it to ``fill_slots`` with a FutureWarning (shown by default, unlike
    DeprecationWarning, so a user of `--gradient-fill` sees it)."""
    fill_slots: bool = False
    """Training only, unlayered: fill each forward step's unused slots with the
    zero-valued outboxes of silent neurons so the gradient reaches them (SPEC 8);
    changes no spike. Evaluation never fills."""
    input_order: str | None = None
    """Order of queued input spikes (SPEC 6: "random" or "index"); None: SimConfig's
    default (random)."""
    train_stop: str = "spiking_done"
    """Stop condition of the training passes: "spiking_done" (drain, the paper's
    training default) or "output" (stop `train_F` steps after the first output spike,
    as at inference)."""
    train_F: int = 1
    train_K: int | None = None
    """Unlayered models only: K of the training passes when it differs from the K they
    are evaluated at (`K`); None: train at `K`. On the demo data with queued input,
    training MS at K = 16 and running it at K = 8 was worth +0.03 validation accuracy
    (docs/unlayered_training.md, round 2). Checkpoints and `fit`'s per-epoch
    validation keep the training K; `run_models` evaluates at `K`."""
    lr_schedule: str | None = None
    """`fit`'s `lr_schedule`: None (constant) or "cosine"."""
    finetune_epochs: int = 0
    """> 0: unlayered models start from the layered model's weights (this run's, or
    `run_models(init_from=...)`) and train this many epochs instead of `epochs`."""


def train_config(h: Hyper, policy: str) -> SimConfig:
    """The training execution of `policy` ("layered", "RS", "MS") for `h`: drain every
    pass (stop on spiking done, the paper's training default) with its regularisers."""
    async_ = policy != "layered"
    cfg = SimConfig(policy=policy, forward_group_size=h.K, theta=h.theta, tau=h.tau, dt=h.dt,
                    surrogate_steepness=h.steepness, input_dropout=h.input_dropout,
                    refractory_dropout=h.refractory_dropout if async_ else 0.0,
                    momentum_noise=h.momentum_noise if policy == "MS" else 0.0,
                    prioritize_input=h.prioritize_input, stop=h.train_stop,
                    steps_after_output=h.train_F)
    return cfg.replace(**_engine_options(h, async_))


def _engine_options(h: Hyper, async_: bool) -> dict[str, Any]:
    """input_order, and fill_slots for unlayered training; `gradient_fill` is the
    deprecated alias of fill_slots (it used to send barrier messages, which under RS
    take slots and change the spikes)."""
    out: dict[str, Any] = {}
    if h.input_order is not None:
        out["input_order"] = h.input_order
    if h.gradient_fill:
        warnings.warn("Hyper.gradient_fill / --gradient-fill is deprecated: use fill_slots / "
                      "--fill-slots", FutureWarning, stacklevel=3)
    if (h.fill_slots or h.gradient_fill) and async_:
        out["fill_slots"] = True
    return out


def build_snn(n_inputs: int, n_classes: int, h: Hyper, policy: str, seed: int) -> AsyncSNN:
    """A bias-free MLP ``n_inputs - hidden... - n_classes`` with torch's default
    initialisation times ``h.init_gain``, seeded by `seed`, wrapped for `policy`."""
    gen = torch.Generator().manual_seed(int(seed))
    sizes = [n_inputs, *h.hidden, n_classes]
    layers = []
    for n, m in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(n, m, bias=False)
        bound = h.init_gain / n ** 0.5  # torch's default for Linear: U(-1/sqrt(n), 1/sqrt(n))
        with torch.no_grad():
            lin.weight.copy_((torch.rand(m, n, generator=gen) * 2 - 1) * bound)
        layers.append(lin)
    return AsyncSNN(nn.Sequential(*layers), train_config(h, policy))


def paper_executions(policy: str, eval_specs: Sequence[str]) -> list[Execution]:
    """Executions a model trained with `policy` is evaluated under. ``["paper"]``
    selects `PAPER_EXECUTIONS`; otherwise every spec applies to every model. An
    execution without K runs at the model's K (the training K)."""
    specs = PAPER_EXECUTIONS[policy] if list(eval_specs) == ["paper"] else eval_specs
    return [Execution.parse(s) for s in specs]


def subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of `n` samples (all when n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return Subset(ds, idx.tolist())


def run_models(train_ds: Dataset, test_ds: Dataset, n_inputs: int, n_classes: int,
               h: Hyper | Mapping[str, Hyper], policies: Sequence[str], out: Path, *, seed: int = 0,
               eval_specs: Sequence[str] = ("paper",),
               steps_after_output: Sequence[int] = DEFAULT_STEPS_AFTER_OUTPUT,
               energy_per_so: float = UBRAIN_ENERGY_PER_SO, energy_unit: str = "uBrain, rel.",
               device: str | torch.device = "cpu", workers: int = 0, progress: bool = True,
               resume: bool = True, max_batches: int | None = None,
               log: Callable[[str], None] = print, val_ds: Dataset | None = None,
               on_epoch: Callable[[str, dict[str, Any]], None] | None = None,
               init_from: str | Path | None = None,
               recipe_args: Mapping[str, Any] | None = None,
               eval_config: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Train one model per policy (checkpoint ``out/<policy>/model.pt``) and evaluate
    it on `test_ds`; returns ``{training label: {execution name: ExecutionResult}}``.
    `h` is one `Hyper` for all, or one per policy; `recipe_args` are stored in every
    checkpoint (``meta["args"]``).

    `val_ds`: evaluated after every epoch under the model's own execution
    (``val_accuracy`` in the log and the history; choose settings on it, not on
    `test_ds`). `on_epoch(policy, record)`: called after every epoch.
    `eval_config`: SimConfig changes for the evaluation only (e.g. another input
    mode of the same trained model: ``dict(prioritize_input=True)``).
    Warm start: a policy whose `Hyper.finetune_epochs` is > 0 starts from the
    layered weights (`init_from`, a layered checkpoint, or else this call's layered
    model, which then trains first) and trains that many epochs."""
    hypers = {p: (h[p] if isinstance(h, Mapping) else h) for p in policies}
    batch = max(x.batch_size for x in hypers.values())
    # No generator: `fit` seeds torch's RNG per epoch, which fixes the shuffle order
    # whether or not the run was resumed.
    test_dl = DataLoader(test_ds, batch_size=max(batch, 64), shuffle=False,
                         collate_fn=collate_time_major, num_workers=workers)
    val_dl = None if val_ds is None else DataLoader(
        val_ds, batch_size=max(batch, 64), shuffle=False, collate_fn=collate_time_major,
        num_workers=workers)
    results: dict[str, dict[str, Any]] = {}
    for policy in _training_order(policies, hypers, init_from):
        h = hypers[policy]
        train_dl = DataLoader(train_ds, batch_size=h.batch_size, shuffle=True,
                              collate_fn=collate_time_major, num_workers=workers)
        snn = build_snn(n_inputs, n_classes, h, policy, seed).to(device)
        folder = out / policy
        warm = policy != "layered" and h.finetune_epochs > 0
        callback = None if on_epoch is None else (lambda rec, p=policy: on_epoch(p, rec))
        train_k = h.train_K if (h.train_K is not None and policy != "layered") else snn.cfg.K
        with snn.configured(forward_group_size=train_k):  # evaluated at h.K below
            history = fit(snn, train_dl, h.finetune_epochs if warm else h.epochs, h.lr,
                          h.weight_decay, seed=seed,
                          log_path=folder / "train.jsonl", checkpoint_path=folder / "model.pt",
                          resume=resume, progress=progress, loss=h.loss, device=device,
                          desc=f"train {TRAIN_LABELS[policy]} (seed {seed})",
                          max_batches=max_batches,
                          init_from=(init_from or out / "layered" / "model.pt") if warm else None,
                          val_loader=val_dl, on_epoch_end=callback, recipe_args=recipe_args,
                          lr_schedule=h.lr_schedule)
        if history:
            last = history[-1]
            log(f"{TRAIN_LABELS[policy]:13s} seed {seed}: {len(history)} epochs, loss "
                f"{last['loss']:.3f}, train accuracy {last['train_accuracy']:.3f}, "
                f"{sum(r['seconds'] for r in history):.0f} s")
        execs = paper_executions(policy, eval_specs)
        with snn.configured(**dict(eval_config or {})):
            results[TRAIN_LABELS[policy]] = evaluate(
                snn, test_dl, execs, steps_after_output=steps_after_output,
                energy_per_so=energy_per_so, energy_unit=energy_unit, seed=seed, device=device,
                progress=progress, max_batches=max_batches)
    return results


def _training_order(policies: Sequence[str], hypers: Mapping[str, Hyper],
                    init_from: str | Path | None) -> list[str]:
    """Layered first when an unlayered model warm-starts from it."""
    warm = [p for p in policies if p != "layered" and hypers[p].finetune_epochs > 0]
    if warm and init_from is None:
        if "layered" not in policies:
            raise ValueError(f"{warm} fine-tune from the layered model: train 'layered' too "
                             f"or pass init_from (a layered checkpoint)")
        return ["layered", *[p for p in policies if p != "layered"]]
    return list(policies)
