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
    """

    hidden: tuple[int, ...]
    dt: float
    batch_size: int
    epochs: int
    lr: float
    theta: float
    weight_decay: float
    tau: float
    steepness: float
    input_dropout: float
    K: int
    refractory_dropout: float
    momentum_noise: float
    prioritize_input: bool = False
    loss: str = "counts"
    init_gain: float = 1.0
    gradient_fill: bool = False
    """Training only, unlayered: a neuron that received currents without firing sends
    one zero-valued message (SPEC 5's barrier message with sync threshold 1), so the
    gradient reaches silent neurons (SPEC 8 leaves such a slot-filling option open;
    the paper's code has it implicitly, this engine has no dedicated one yet). Under
    MS these messages rank below every spike, fill only slots spikes leave free and
    change no spike; under RS they compete for slots and delay spikes. Evaluation
    never sends them."""


def train_config(h: Hyper, policy: str) -> SimConfig:
    """The training execution of `policy` ("layered", "RS", "MS") for `h`: drain every
    pass (stop on spiking done, the paper's training default) with its regularisers."""
    async_ = policy != "layered"
    return SimConfig(policy=policy, forward_group_size=h.K, theta=h.theta, tau=h.tau, dt=h.dt,
                     surrogate_steepness=h.steepness, input_dropout=h.input_dropout,
                     refractory_dropout=h.refractory_dropout if async_ else 0.0,
                     momentum_noise=h.momentum_noise if policy == "MS" else 0.0,
                     prioritize_input=h.prioritize_input, stop="spiking_done",
                     barrier_messages=h.gradient_fill and async_)


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
               log: Callable[[str], None] = print,
               recipe_args: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Train one model per policy (checkpoint ``out/<policy>/model.pt``) and evaluate
    it on `test_ds`; returns ``{training label: {execution name: ExecutionResult}}``.
    `h` is one `Hyper` for all, or one per policy; `recipe_args` are stored in every
    checkpoint (``meta["args"]``)."""
    hypers = {p: (h[p] if isinstance(h, Mapping) else h) for p in policies}
    batch = max(x.batch_size for x in hypers.values())
    # No generator: `fit` seeds torch's RNG per epoch, which fixes the shuffle order
    # whether or not the run was resumed.
    test_dl = DataLoader(test_ds, batch_size=max(batch, 64), shuffle=False,
                         collate_fn=collate_time_major, num_workers=workers)
    results: dict[str, dict[str, Any]] = {}
    for policy in policies:
        h = hypers[policy]
        train_dl = DataLoader(train_ds, batch_size=h.batch_size, shuffle=True,
                              collate_fn=collate_time_major, num_workers=workers)
        snn = build_snn(n_inputs, n_classes, h, policy, seed).to(device)
        folder = out / policy
        history = fit(snn, train_dl, h.epochs, h.lr, h.weight_decay, seed=seed,
                      log_path=folder / "train.jsonl", checkpoint_path=folder / "model.pt",
                      resume=resume, progress=progress, loss=h.loss, device=device,
                      desc=f"train {TRAIN_LABELS[policy]} (seed {seed})", max_batches=max_batches,
                      recipe_args=recipe_args)
        if history:
            last = history[-1]
            log(f"{TRAIN_LABELS[policy]:13s} seed {seed}: {len(history)} epochs, loss "
                f"{last['loss']:.3f}, train accuracy {last['train_accuracy']:.3f}, "
                f"{sum(r['seconds'] for r in history):.0f} s")
        execs = paper_executions(policy, eval_specs)
        results[TRAIN_LABELS[policy]] = evaluate(
            snn, test_dl, execs, steps_after_output=steps_after_output,
            energy_per_so=energy_per_so, energy_unit=energy_unit, seed=seed, device=device,
            progress=progress, max_batches=max_batches)
    return results


# ------------------------------------------------------------------- recipes' CLI
def __getattr__(name: str) -> Any:
    # the recipes' command line lives in asynctrain.recipe (which imports this module)
    if name in ("DataSpec", "recipe_main"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
