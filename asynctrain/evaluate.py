"""Evaluation of one trained model under several executions (SPEC 9).

    results = evaluate(snn, test_loader, executions=["layered", "RS", "MS"])
    results["RS"].accuracy, .density, .synops, .energy, .latency_steps, ...

An *execution* is how the same weights are run at inference: layered, or
asynchronous with a scheduling policy (RS / MS), a forward group size K and a stop
condition. Strings name them: ``"layered"``, ``"RS"``, ``"MS:K=4"``,
``"RS:stop=spiking_done"``, ``"MS:K=16:F=2"`` (F = steps after the first output spike).
Asynchronous executions default to the paper's inference setting: stop one forward
step after the first output spike of a pass (``stop="output"``, F = 1), K of the
model's config.

Metrics, per sample and averaged over the data set:

- accuracy: prediction = argmax of the logits (output spike counts summed over the
  timesteps, SPEC 8).
- density: hidden spikes / (samples x hidden neurons), SPEC 9 (the paper's eq. 10);
  spikes of all timesteps count.
- synops: synaptic operations, delivered (spike, target) pairs, input spikes included.
- energy: synops x `energy_per_so` (default `UBRAIN_ENERGY_PER_SO`, see there).
- latency until the decision, two ways (SPEC 9). A pass's decision is taken when the
  pass stops: under ``stop="output"`` F forward steps after its first output spike,
  else when nothing is pending; layered passes take one forward step per layer. The
  sample's decision is the argmax after its last pass, so its latency is the sum over
  its T passes of
  * ``latency_steps``: forward steps (the time of a chip that does one group of K
    deliveries per unit of time), and
  * ``latency_spikes``: spikes (outbox entries) processed, the paper's figure 6 unit
    ("a unit latency for processing one spike": the time of a sequential chip).
  Per-sample values are kept (``per_sample``) for latency distributions.
- currents-to-spike histogram: ``hist[n]`` = spikes emitted by a neuron after it had
  integrated n currents in the pass (summed over the data set; layered execution
  puts every spike at n = fan-in, as every neuron integrates its whole fan-in).
- accuracy vs forward steps allowed after the first output spike: the data set is run
  again with ``stop="output"`` and ``steps_after_output = F`` for each F of
  `steps_after_output` (and once with ``stop="spiking_done"``, key ``"drain"``).
  Asynchronous executions only (a layered pass always ends at its last layer).

Every batch's randomness (RS keys) comes from ``(seed, batch index)``, so numbers
repeat exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from . import rng
from .config import SimConfig
from .module import AsyncSNN
from ._warn import warn
from .guards import SILENT_FRACTION, check_batch, check_loader, loader_length, unpack_batch

__all__ = ["Execution", "ExecutionResult", "evaluate", "inference_config", "logits_of", "TRAINING_ONLY",
           "UBRAIN_ENERGY_PER_SO", "DEFAULT_STEPS_AFTER_OUTPUT"]

UBRAIN_ENERGY_PER_SO = 0.26
"""Energy per synaptic operation on µBrain (Stuijt et al., "µBrain: an event-driven
and fully synthesizable architecture for spiking neural networks", Front. Neurosci.
15:664208, 2021), as the paper applies it in its table 3: every row of that table
has energy / SOs = 0.26 (e.g. N-MNIST layered 0.9155 / 3.521). The powers of ten of
that table's SO and energy columns did not survive the text extraction we hold, so
this constant is in the paper's *relative* units: energy = 0.26 x SOs, comparable
between rows and models, not a physical figure. For joules, pass `energy_per_so`
from a chip's data sheet (and `energy_unit`)."""

DEFAULT_STEPS_AFTER_OUTPUT = (0, 1, 2, 4, 8, 16)
_STREAM_EVAL = 102
_OVERRIDE_KEYS = {"K": "forward_group_size", "F": "steps_after_output",
                  "stop": "stop", "steps_after_output": "steps_after_output",
                  "forward_group_size": "forward_group_size",
                  "prioritize_input": "prioritize_input", "carry_pending": "carry_pending",
                  "max_steps": "max_steps"}


def logits_of(out: torch.Tensor, readout: str) -> torch.Tensor:
    """Output of `AsyncSNN` ``[T, B, n_out]`` -> logits ``[B, n_out]`` (SPEC 8).

    "counts": output spike counts summed over the timesteps (rates up to a factor T).
    "potential": the output potentials after the last pass (CIFAR-10: T = 1).
    """
    return out.sum(0) if readout == "counts" else out[-1]


TRAINING_ONLY = {"input_dropout": 0.0, "network_dropout": 0.0, "refractory_dropout": 0.0,
                 "momentum_noise": 0.0, "fill_slots": False}
"""SimConfig fields that only shape training (SPEC 8), with their inference value.
Fields this version of SimConfig lacks are skipped. `barrier_messages` is a
training-only workaround only when every sync threshold is 1 (gradient fill, see
`inference_config`); with sync thresholds above 1 it is the barrier hardware's
synchronisation (SPEC 7) and stays."""


def inference_config(cfg: SimConfig) -> SimConfig:
    """`cfg` without its training-only settings (`TRAINING_ONLY` set to their
    inference values; barrier messages off when every sync threshold is 1, where
    they only serve to route gradients to silent neurons). `evaluate` runs every
    execution from this, so a model trained with dropouts, noise, fillers or gradient
    fill is evaluated as the paper does, whoever calls it."""
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in TRAINING_ONLY.items() if k in names and getattr(cfg, k) != v}
    sync = cfg.sync_threshold
    all_one = bool((sync == 1).all()) if isinstance(sync, torch.Tensor) else sync == 1
    if cfg.barrier_messages and all_one:
        changes["barrier_messages"] = False
    return cfg.replace(**changes) if changes else cfg


@dataclass(frozen=True)
class Execution:
    """One way to run the trained weights at inference.

    Attributes:
        policy: "layered", "RS" or "MS".
        K: forward group size; None keeps the model's.
        stop: "output" (paper inference default) or "spiking_done" ("drain").
        steps_after_output: F of the output stop.
        extra: further SimConfig overrides as (name, value) pairs.
    """

    policy: str
    K: int | None = None
    stop: str = "output"
    steps_after_output: int = 1
    extra: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: "str | Execution") -> "Execution":
        """``"RS"``, ``"MS:K=4"``, ``"RS:stop=spiking_done"``, ``"MS:F=2"``, ...
        (``drain`` is short for ``stop=spiking_done``)."""
        if isinstance(spec, Execution):
            return spec
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"an execution is a string like 'RS' or 'MS:K=4', got {spec!r}")
        head, *parts = spec.split(":")
        policy = {"layered": "layered", "rs": "RS", "ms": "MS"}.get(head.strip().lower())
        if policy is None:
            raise ValueError(f"execution {spec!r}: policy must be layered, RS or MS, got {head!r}")
        kw: dict[str, Any] = {}
        extra = []
        seen: dict[str, str] = {}
        for part in parts:
            part = part.strip()
            if part == "drain":
                if "stop" in seen:
                    raise ValueError(f"execution {spec!r}: {seen['stop']} and drain both set stop")
                seen["stop"] = "drain"
                kw["stop"] = "spiking_done"
                continue
            if "=" not in part:
                raise ValueError(f"execution {spec!r}: expected name=value, got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            if name not in _OVERRIDE_KEYS:
                raise ValueError(f"execution {spec!r}: unknown setting {name!r}; known: "
                                 f"{sorted(_OVERRIDE_KEYS)}")
            key = _OVERRIDE_KEYS[name]
            if key in seen:
                raise ValueError(f"execution {spec!r}: {seen[key]} and {name} both set {key}; "
                                 f"give it once")
            seen[key] = name
            if key == "stop":
                if value not in ("output", "spiking_done"):
                    raise ValueError(f"execution {spec!r}: stop must be output or spiking_done, "
                                     f"got {value!r}")
                kw["stop"] = value
            elif key in ("prioritize_input", "carry_pending"):
                flag = {"1": True, "true": True, "yes": True, "0": False, "false": False,
                        "no": False}.get(value.lower())
                if flag is None:
                    raise ValueError(f"execution {spec!r}: {name} must be true or false, got {value!r}")
                extra.append((key, flag))
            else:
                lo = 0 if key == "steps_after_output" else 1
                try:
                    number = int(value)
                except ValueError:
                    number = None
                if number is None or number < lo:
                    raise ValueError(f"execution {spec!r}: {name} must be an integer >= {lo}, "
                                     f"got {value!r}")
                if key == "forward_group_size":
                    kw["K"] = number
                elif key == "steps_after_output":
                    kw["steps_after_output"] = number
                else:
                    extra.append((key, number))
        if policy == "layered" and (kw or extra):
            raise ValueError(f"execution {spec!r}: layered execution takes no settings")
        return cls(policy, extra=tuple(extra), **kw)

    @property
    def name(self) -> str:
        """Canonical string (parses back to the same execution)."""
        if self.policy == "layered":
            return "layered"
        parts = [self.policy]
        if self.K is not None:
            parts.append(f"K={self.K}")
        if self.stop == "spiking_done":
            parts.append("drain")
        elif self.steps_after_output != 1:
            parts.append(f"F={self.steps_after_output}")
        parts += [f"{k}={v}" for k, v in self.extra]
        return ":".join(parts)

    @property
    def label(self) -> str:
        """The paper's wording: "Layered", "Async RS", "Async MS (K=4, drain)"."""
        if self.policy == "layered":
            return "Layered"
        notes = [n for n in self.name.split(":")[1:]]
        return f"Async {self.policy}" + (f" ({', '.join(notes)})" if notes else "")

    def overrides(self) -> dict[str, Any]:
        """SimConfig changes for `AsyncSNN.configured`."""
        if self.policy == "layered":
            return dict(policy="layered")
        kw: dict[str, Any] = dict(policy=self.policy, stop=self.stop,
                                  steps_after_output=self.steps_after_output)
        if self.K is not None:
            kw["forward_group_size"] = self.K
        kw.update(dict(self.extra))
        return kw


@dataclass
class ExecutionResult:
    """What `evaluate` measured for one execution (means per sample)."""

    execution: str
    label: str
    samples: int
    accuracy: float
    density: float
    synops: float
    energy: float
    energy_unit: str
    latency_steps: float
    latency_spikes: float
    first_output_step: float
    passes_with_output: float
    capped_passes: int
    currents_to_spike: list[int]
    accuracy_vs_steps_after_output: dict[str, float]
    per_sample: dict[str, list] = field(repr=False)

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not per_sample:
            d.pop("per_sample")
        return d


def evaluate(snn: AsyncSNN, loader: Iterable, executions: Sequence[str | Execution] = ("layered", "RS", "MS"),
             *, steps_after_output: Sequence[int] | None = DEFAULT_STEPS_AFTER_OUTPUT,
             energy_per_so: float = UBRAIN_ENERGY_PER_SO, energy_unit: str = "uBrain, rel.",
             seed: int = 0, max_batches: int | None = None, device: str | torch.device | None = None,
             progress: bool = False) -> dict[str, ExecutionResult]:
    """Run `snn` over `loader` once per execution (plus the F sweep); see the module
    docstring for every metric's definition.

    Args:
        snn: trained module; its weights and config are restored afterwards.
        loader: yields ``(frames [T, B, F], labels [B])`` (time-major).
        executions: strings or `Execution`s.
        steps_after_output: the F values of the accuracy-vs-F curve (None or empty:
            skip it; it costs one more pass over the data per value).
        energy_per_so, energy_unit: energy model (default µBrain, relative units).
        seed: randomness of the evaluation (RS selection).
        max_batches: only the first batches (smoke runs).

    Returns: ``{execution name: ExecutionResult}`` in the given order.
    """
    if not (isinstance(energy_per_so, (int, float)) and math.isfinite(energy_per_so)
            and energy_per_so >= 0):
        raise ValueError(f"energy_per_so must be a finite number >= 0, got {energy_per_so!r}")
    execs = [Execution.parse(e) for e in executions]
    if not execs:
        raise ValueError("executions is empty")
    check_loader(loader, "the evaluation loader")
    sweep = [int(f) for f in (steps_after_output or ())]
    if any(f < 0 for f in sweep):
        raise ValueError(f"steps_after_output values must be >= 0, got {sweep}")
    if device is None:
        device = next(snn.parameters()).device
    n_hidden = snn.graph.n_hidden
    was_training, was_recording, trained_cfg = snn.training, snn.record_currents, snn.cfg
    results: dict[str, ExecutionResult] = {}
    # one bar over every pass over the data (each execution runs 1 + len(F sweep) + 1
    # of them), counting batches: it moves as the work does
    runs = [1 + (len(sweep) + 1 if ex.policy != "layered" and sweep else 0) for ex in execs]
    bar = None
    if progress:
        from tqdm import tqdm
        n_batches = loader_length(loader, max_batches) or max_batches
        bar = tqdm(total=None if n_batches is None else sum(runs) * n_batches,
                   desc=f"evaluate {len(execs)} execution(s), {sum(runs)} passes over the data",
                   unit="batch", dynamic_ncols=True)
    snn.eval()
    try:
        # training-only settings (dropouts, noise, fillers, gradient fill) never reach
        # inference, whoever calls evaluate
        snn.cfg = inference_config(trained_cfg)
        with torch.no_grad():
            for ex in execs:
                snn.record_currents = True
                main = _run(snn, loader, ex.overrides(), seed, max_batches, device, bar, ex.name)
                snn.record_currents = was_recording
                curve: dict[str, float] = {}
                if ex.policy != "layered" and sweep:
                    for f in sweep:
                        o = dict(ex.overrides(), stop="output", steps_after_output=f)
                        curve[str(f)] = _run(snn, loader, o, seed, max_batches, device, bar,
                                             f"{ex.name} F={f}")["accuracy"]
                    o = dict(ex.overrides(), stop="spiking_done")
                    curve["drain"] = _run(snn, loader, o, seed, max_batches, device, bar,
                                          f"{ex.name} drain")["accuracy"]
                results[ex.name] = _result(ex, main, curve, n_hidden, energy_per_so, energy_unit)
                _warn_if_silent(results[ex.name], snn.cfg.readout)
    finally:
        snn.cfg = trained_cfg
        snn.record_currents = was_recording
        snn.train(was_training)
        if bar is not None:
            bar.close()
    return results


def _warn_if_silent(r: "ExecutionResult", readout: str) -> None:
    if readout == "counts" and r.samples and 1.0 - r.passes_with_output >= SILENT_FRACTION:
        warn(f"evaluate {r.execution}: no output spike in "
             f"{100 * (1 - r.passes_with_output):.0f}% of passes (density "
             f"{r.density:.3f}); the network is (nearly) silent, so its predictions "
             f"are mostly class 0. Lower theta or train longer.", RuntimeWarning)


def _run(snn: AsyncSNN, loader: Iterable, overrides: dict[str, Any], seed: int,
         max_batches: int | None, device: Any, bar: Any = None, name: str = "") -> dict[str, Any]:
    """One pass over the data under one execution; per-sample numbers as numpy."""
    keep: dict[str, list] = {k: [] for k in ("correct", "synops", "hidden_spikes", "latency_steps",
                                             "latency_spikes", "first_output_step", "label",
                                             "prediction")}
    hist = None
    capped = 0
    with snn.configured(**overrides):
        readout = snn.cfg.readout
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            where = f"evaluate {name or 'loader'}, batch {b + 1}"
            frames, labels = unpack_batch(batch, where)
            check_batch(frames, labels, where, snn.graph.n_outputs)
            frames, labels = frames.to(device), labels.to(device)
            out = snn(frames, seed=rng.counter_hash(int(seed), _STREAM_EVAL, b, 0))
            st = snn.stats
            pred = logits_of(out, readout).argmax(1)
            keep["correct"].append((pred == labels).cpu())
            keep["prediction"].append(pred.cpu())
            keep["label"].append(labels.cpu())
            keep["synops"].append(st["synops"].sum(0).cpu())
            keep["hidden_spikes"].append(st["hidden_spikes"].cpu())
            keep["latency_steps"].append(st["forward_steps"].sum(0).cpu())
            keep["latency_spikes"].append(st["spikes_processed"].sum(0).cpu())
            fo = st["first_output_step"].to(torch.float64)
            keep["first_output_step"].append(torch.where(fo > 0, fo, torch.nan).T.cpu())  # [B, T]
            capped += int(st["capped_passes"])
            if "currents_to_spike" in st:
                h = st["currents_to_spike"].cpu().to(torch.int64)
                hist = h if hist is None else _add_hist(hist, h)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name, refresh=False)
    if not keep["correct"]:
        raise ValueError("the evaluation loader yielded no batch")
    arrays = {k: torch.cat(v).numpy() for k, v in keep.items()}
    arrays["accuracy"] = float(arrays["correct"].mean())
    arrays["capped"] = capped
    arrays["hist"] = [] if hist is None else hist.tolist()
    return arrays


def inference_overrides(cfg: SimConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` on top of the changes `inference_config` makes to `cfg` (for
    `AsyncSNN.configured`)."""
    new = inference_config(cfg)
    out = {f.name: getattr(new, f.name) for f in dataclasses.fields(cfg)
           if getattr(new, f.name) is not getattr(cfg, f.name)}
    out.update(overrides)
    return out


def _add_hist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(len(a), len(b))
    return torch.nn.functional.pad(a, (0, n - len(a))) + torch.nn.functional.pad(b, (0, n - len(b)))


def _result(ex: Execution, r: dict[str, Any], curve: dict[str, float], n_hidden: int,
            energy_per_so: float, energy_unit: str) -> ExecutionResult:
    n = len(r["correct"])
    fo = r["first_output_step"]
    with np.errstate(invalid="ignore"):
        reached = ~np.isnan(fo)
        mean_fo = float(np.nanmean(fo)) if reached.any() else float("nan")
    synops = float(r["synops"].mean())
    return ExecutionResult(
        execution=ex.name, label=ex.label, samples=n, accuracy=r["accuracy"],
        density=float(r["hidden_spikes"].sum()) / (n * n_hidden) if n_hidden else 0.0,
        synops=synops, energy=synops * energy_per_so, energy_unit=energy_unit,
        latency_steps=float(r["latency_steps"].mean()),
        latency_spikes=float(r["latency_spikes"].mean()),
        first_output_step=mean_fo, passes_with_output=float(reached.mean()),
        capped_passes=int(r["capped"]), currents_to_spike=list(r["hist"]),
        accuracy_vs_steps_after_output=curve,
        per_sample=dict(correct=r["correct"].astype(int).tolist(),
                        prediction=r["prediction"].tolist(), label=r["label"].tolist(),
                        synops=r["synops"].tolist(), hidden_spikes=r["hidden_spikes"].tolist(),
                        latency_steps=r["latency_steps"].tolist(),
                        latency_spikes=r["latency_spikes"].tolist()))
