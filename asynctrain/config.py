"""`SimConfig`: every knob of SPEC sections 2-8, validated once, plus the chip presets.

Defaults follow the paper (Koopman et al., table 6) where it gives one value for all
data sets; the training regularisers default to off (the paper's per-data-set values
are in each field's doc and in the recipes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

POLICIES = ("RS", "MS", "layered")
STOPS = ("spiking_done", "output")
READOUTS = ("counts", "potential")
INPUT_ORDERS = ("random", "index")
SURROGATE_AT = ("every", "fire_or_last")

PerNeuron = float | int | torch.Tensor


@dataclass(frozen=True, eq=False)
class SimConfig:
    """How an asynchronous SNN executes (SPEC 2-8). Immutable; use `replace`.

    Attributes:
        forward_group_size: K, the most pending outboxes delivered per forward step
            (paper default 8). Alias: `K` (``SimConfig(K=8)``, ``cfg.K``, ``replace(K=...)``).
        policy: "RS" (random), "MS" (momentum: highest pre-spike potential first) or
            "layered" (one forward step per layer; the usual synchronous SNN).
        prioritize_input: deliver all input currents at once as the first forward step
            of each pass; otherwise input spikes join the pending queue.
        input_order: MS with queued input (SPEC 6): the order among the pending input
            entries, which rank above every neuron. "random" (default): a permutation
            drawn from the call's seed, fresh for each sample and timestep, the same at
            every forward step of the pass (so the backward's recompute replays it);
            "index": lower input index first (an image swept in raster order).
            Irrelevant under RS (inputs get random keys like neurons) and with
            `prioritize_input=True` (the frame is one step).
        stop: "spiking_done" (run until nothing is pending; training default) or
            "output" (stop `steps_after_output` steps after the first output spike;
            also when nothing is pending; inference default in the paper).
        steps_after_output: F for `stop="output"`.
        max_steps: hard cap of forward steps per pass (prioritized input step included);
            passes that reach it are counted in `stats["capped_passes"]` and warned about.
        carry_pending: keep outboxes still pending when a pass stops early for the next
            pass (the paper's code does); default drops them.
        refractory: a neuron that fired is clamped to V=0 for the rest of the pass.
        refractory_dropout: training only: probability that a spike does *not* make its
            neuron refractory (paper 0.8).
        momentum_noise: training only, MS only: key = S + noise * U(0, 1)
            (paper 1e-6 N-MNIST, 0.1 SHD and DVS Gesture).
        input_dropout: training only: probability of dropping an input entry (all spikes
            of one feature in one frame) (paper 0.25 N-MNIST, 0.2 SHD / DVS Gesture).
        network_dropout: training only: probability of dropping a selected outbox when
            it is delivered (it is emptied and reaches nobody). Survivors keep their
            value: spikes are events, they are not rescaled by 1 / (1 - p).
        tau: membrane time constant in ms, a float or one value per neuron
            (`[n_neurons]`, hidden then output, layer order); `inf` = IF neuron.
        theta: firing threshold (> 0), float or per neuron. A neuron fires when V >= theta.
        dt: frame length in ms; V decays by exp(-dt / tau) between timesteps.
        sync_threshold: currents a neuron must have received in the pass before its
            threshold is evaluated; int or per neuron (`[n_neurons]`). 1 = fully async.
        barrier_messages: a neuron whose received-current count just reached its
            sync threshold without firing becomes pending with a zero-valued outbox.
        fill_slots: training only (SPEC 8): each event step's unused slots (K minus the
            entries selected) are filled with zero-valued outboxes of hidden neurons that
            are not pending and hold surrogate gradient (an evaluation since their last
            delivery that was synced and not refractory), ranked MS: highest V, RS:
            random. Fillers change no spike, potential, stat or synop; only the gradient
            (silent neurons get some). Inference never fills; no effect under
            "layered" (it delivers every outbox anyway).
        surrogate_steepness: alpha of the arctan surrogate (paper 2 N-MNIST, 10 SHD/DVS).
        detach_reset: stop the gradient through the reset V <- V * (1 - s).
        surrogate_at: which evaluations of a neuron carry the spike's surrogate
            derivative (SPEC 8; docs/semantics.md section 8, "Bounded gradients").
            "every" (default): every synced evaluation, as SPEC 8 states; a neuron
            evaluated m times before its outbox is delivered passes m surrogate terms
            on, and the gradient of deep networks at small K grows exponentially with
            the forward steps of a pass (VGG-7 at K = 64: 1e7, inf at full width).
            "fire_or_last": only the evaluations that fire and the last evaluation
            of each outbox window (before the outbox is emptied, or the pass ends);
            at every other evaluation the spike is a constant 0. Bounded at any K;
            the same gradient as "every" wherever each neuron is evaluated once per
            window (layered execution, the barrier preset). Forward unchanged.
        readout: "counts" (output spike counts per pass) or "potential" (output
            neurons' membrane potential after each pass; the paper's CIFAR-10 logits).
        seed: None draws each call's seed from torch's RNG (`torch.manual_seed` governs
            it); an int makes call i of a module use a seed derived from (seed, i).
    """

    forward_group_size: int = 8
    policy: str = "MS"
    prioritize_input: bool = False
    input_order: str = "random"
    stop: str = "spiking_done"
    steps_after_output: int = 1
    max_steps: int = 1000
    carry_pending: bool = False
    refractory: bool = True
    refractory_dropout: float = 0.0
    momentum_noise: float = 0.0
    input_dropout: float = 0.0
    network_dropout: float = 0.0
    tau: PerNeuron = 100.0
    theta: PerNeuron = 0.3
    dt: float = 10.0
    sync_threshold: PerNeuron = 1
    barrier_messages: bool = False
    fill_slots: bool = False
    surrogate_steepness: float = 10.0
    detach_reset: bool = False
    surrogate_at: str = "every"
    readout: str = "counts"
    seed: int | None = field(default=None)

    def __post_init__(self) -> None:
        _validate(self)

    def __eq__(self, other: object) -> bool:
        # per-neuron knobs may be tensors: compare them by value
        if not isinstance(other, SimConfig):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        # per-neuron knobs can hold 200k values: summarise them, never print them
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={short(v) if isinstance(v, torch.Tensor) else repr(v)}")
        return f"SimConfig({', '.join(parts)})"

    @property
    def K(self) -> int:  # noqa: N802 - the paper's name
        return self.forward_group_size

    def replace(self, **changes: Any) -> "SimConfig":
        """A copy with `changes` applied (accepts `K` for `forward_group_size`)."""
        if "K" in changes:
            k = changes.pop("K")
            if "forward_group_size" in changes and changes["forward_group_size"] != k:
                raise ValueError(f"K={k} and forward_group_size={changes['forward_group_size']} disagree")
            changes["forward_group_size"] = k
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown SimConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, net: torch.nn.Module, *, neurons_per_core: int | None = None,
               **overrides: Any) -> "SimConfig":
        """Configs of SPEC 7 (paper appendix, table 5) for the network `net`.

        - "loihi" / "barrier" / "seneca": K = neurons of the widest layer, each neuron
          waits for its whole fan-in, barrier messages on, input prioritized. Gives
          exactly the layered execution.
        - "spinnaker" / "timer" / "truenorth": needs `neurons_per_core`; K = neurons per
          core, sync threshold = min(neurons per core, fan-in) per neuron (a neuron
          with a smaller fan-in could never reach the core size), barriers on.
        - "speck" / "async" / "ubrain": K = neurons of the widest layer, sync 1, no barriers.

        `overrides` are applied last (e.g. `policy="RS"`).
        """
        from .network import Network  # late: importing network loads the kernels

        graph = Network.from_module(net)
        key = name.lower()
        fan_in = graph.fan_in_per_neuron()
        widest = max(graph.layer_sizes[1:])
        if key in ("loihi", "barrier", "seneca", "layer"):
            base = dict(forward_group_size=widest, sync_threshold=fan_in,
                        barrier_messages=True, prioritize_input=True)
        elif key in ("spinnaker", "timer", "truenorth", "core"):
            if neurons_per_core is None or int(neurons_per_core) < 1:
                raise ValueError(f"preset {name!r} needs neurons_per_core >= 1, got {neurons_per_core!r}")
            npc = int(neurons_per_core)
            base = dict(forward_group_size=npc, sync_threshold=fan_in.clamp(max=npc),
                        barrier_messages=True, prioritize_input=True)
        elif key in ("speck", "async", "ubrain"):
            if neurons_per_core is not None:
                raise ValueError(f"preset {name!r} takes no neurons_per_core")
            base = dict(forward_group_size=widest, sync_threshold=1, barrier_messages=False)
        else:
            raise ValueError(f"unknown preset {name!r}; choose loihi/barrier, spinnaker/timer "
                             f"(neurons_per_core=...) or speck/async")
        base.update(overrides)
        if "K" in base:
            base["forward_group_size"] = base.pop("K")
        return cls(**base)


_dataclass_init = SimConfig.__init__


def _init_with_k_alias(self, *args: Any, K: int | None = None, **kwargs: Any) -> None:  # noqa: N803
    # `SimConfig(K=8)`: the paper's name for forward_group_size
    if K is not None:
        if "forward_group_size" in kwargs and kwargs["forward_group_size"] != K:
            raise ValueError(f"K={K} and forward_group_size={kwargs['forward_group_size']} disagree")
        kwargs["forward_group_size"] = K
    _dataclass_init(self, *args, **kwargs)


SimConfig.__init__ = _init_with_k_alias  # type: ignore[method-assign]


def _check_prob(name: str, p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 <= float(p) <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _check_int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_per_neuron(name: str, v: PerNeuron, *, positive: bool, integer: bool = False,
                      allow_inf: bool = False) -> None:
    t = v if isinstance(v, torch.Tensor) else None
    if t is None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number or a 1-D tensor, got {type(v).__name__}")
        if integer and not (isinstance(v, int) or float(v).is_integer()):
            raise ValueError(f"{name} must be an integer count, got {v!r}")
        t = torch.tensor([float(v)])
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} tensor must be 1-D [n_neurons], got shape {tuple(t.shape)}")
    tf = t.double()
    if torch.isnan(tf).any():
        raise ValueError(f"{name} contains NaN")
    if not allow_inf and torch.isinf(tf).any():
        raise ValueError(f"{name} must be finite, got {v!r}")
    if positive and (tf <= 0).any():
        bad = tf[tf <= 0][0].item()
        raise ValueError(f"{name} must be > 0, got {bad!r}")
    if integer and ((tf != tf.round()) | (tf < 1)).any():
        raise ValueError(f"{name} must be integers >= 1, got {v!r}")


def _validate(c: SimConfig) -> None:
    _check_int("forward_group_size (K)", c.forward_group_size, 1)
    if c.policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {c.policy!r}")
    if c.stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {c.stop!r}")
    if c.input_order not in INPUT_ORDERS:
        raise ValueError(f"input_order must be one of {INPUT_ORDERS}, got {c.input_order!r}")
    if c.readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {c.readout!r}")
    if c.surrogate_at not in SURROGATE_AT:
        raise ValueError(f"surrogate_at must be one of {SURROGATE_AT}, got {c.surrogate_at!r}")
    _check_int("steps_after_output", c.steps_after_output, 0)
    _check_int("max_steps", c.max_steps, 1)
    for name in ("refractory_dropout", "input_dropout", "network_dropout"):
        _check_prob(name, getattr(c, name))
    if not isinstance(c.momentum_noise, (int, float)) or not math.isfinite(c.momentum_noise) \
            or c.momentum_noise < 0:
        raise ValueError(f"momentum_noise must be a finite number >= 0, got {c.momentum_noise!r}")
    for name in ("prioritize_input", "carry_pending", "refractory", "barrier_messages", "detach_reset",
                 "fill_slots"):
        if not isinstance(getattr(c, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(c, name)!r}")
    _check_per_neuron("tau", c.tau, positive=True, allow_inf=True)
    _check_per_neuron("theta", c.theta, positive=True)
    _check_per_neuron("sync_threshold", c.sync_threshold, positive=True, integer=True)
    if not isinstance(c.dt, (int, float)) or not math.isfinite(c.dt) or c.dt <= 0:
        raise ValueError(f"dt must be a finite number of ms > 0, got {c.dt!r}")
    if not isinstance(c.surrogate_steepness, (int, float)) or not math.isfinite(c.surrogate_steepness) \
            or c.surrogate_steepness <= 0:
        raise ValueError(f"surrogate_steepness must be > 0, got {c.surrogate_steepness!r}")
    if c.seed is not None and (isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0):
        raise ValueError(f"seed must be None or an int >= 0, got {c.seed!r}")


def per_neuron(value: PerNeuron, n: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast a scalar-or-[n] knob to a tensor [n]; a wrong length names the knob."""
    if isinstance(value, torch.Tensor):
        if value.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, the network has {n} neurons "
                             f"(hidden + output); expected [{n}]")
        return value.to(dtype)
    return torch.full((n,), float(value), dtype=dtype)


def describe(cfg: SimConfig, keys: Sequence[str] | None = None) -> str:
    """One line `k=v` summary (for logs and reports)."""
    names = keys or [f.name for f in dataclasses.fields(cfg)]
    parts = []
    for k in names:
        v = getattr(cfg, k)
        parts.append(f"{k}=<per-neuron>" if isinstance(v, torch.Tensor) else f"{k}={v}")
    return " ".join(parts)


def short(v: Any) -> str:
    """A value as text of bounded length (per-neuron tensors summarised)."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 0:
            return f"tensor{list(v.shape)}"
        lo, hi = float(v.min()), float(v.max())
        return (f"per-neuron [{v.numel()}], all {lo:g}" if lo == hi else
                f"per-neuron [{v.numel()}] in [{lo:g}, {hi:g}]")
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
