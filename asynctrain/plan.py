"""How one call runs (`Plan`), chosen once per call from the device, the backend, the
network, K and the knobs, before any step: which step-evaluation mode evaluates its
event steps, whether its loops may read the host, how often they test their stop
condition, how the backward keeps its states.

The modes, one class each, all giving the same spikes, stats and gradients:

- "fused": the backend's fused steps (`fused.FusedMode` around a `FusedSteps`: the C
  steps of kernels/cpu_step.py, the Triton steps of kernels/steps_triton.py) run whole
  forward steps, their replays and reverses; fully connected networks;
- "whole": the per-op torch ops or kernels over the whole [B, W] state
  (`steps.WholeState`), functional: every step under autograd, fully connected
  networks without fused steps, sync-free conv steps whose receiver list is long;
- "receivers": conv steps at their receivers only, listed on the host, in place
  (`receivers.AtReceivers`; a step that reaches more than `RECEIVERS_BELOW` of the
  columns runs over the whole state);
- "listed": sync-free conv steps at a fixed-size list of their receivers, in place
  (`receivers.ListedReceivers`).

Under autograd (``checkpoint_every=0``, or gradients wanted for the frames with grad
enabled) every event step is "whole" (`Plan.mode`).

Host syncs (the sync-free mode, CUDA): a value read on the host waits for the queued
kernels, so there the step loops read nothing but their stop test (`kernels/host.py`;
the per-op loop every `stop_every` steps, the fused steps once per launch). What the
CPU path lists (pending entries, receivers, a step's layers, nonzero outboxes of a
checkpoint) is computed over the whole state instead: the selection keys of every
column (`Ops.select_keyed`: the triton select kernel computes them itself from the
pending flags, potentials and hashes, no [B, W] key tensors; the torch twin over every
column), the K entries sorted by layer on the device and each conv layer's kernel
launched over its own segment of them (`conv.ImageSynapses.segments`), checkpoints
dense; fully connected steps are evaluated over the whole state, conv steps at a
fixed-size list of their receivers when it is short ("listed"), else over the whole
state. The same numbers and operations on the entries that count, so the same spikes,
stats and gradients (tests/test_no_sync.py); on a CPU, where a read costs nothing,
the receivers are listed.

Forcing: tests and benchmarks run CUDA's modes on the CPU (or any mode anywhere it
applies) with ``with plan.forced(sync_free=True, steps="listed"): ...``: engines made
inside the block take those choices (`Forced`); an impossible one raises naming why.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from .kernels.step_spec import FusedSteps, StepSpec
from .network import Network

MODES = ("fused", "whole", "receivers", "listed")

# The per-op loop tests its stop condition before every N-th step, N by device type
# (default 1): on CUDA N = 8, each test being a host sync; up to N - 1 no-op steps
# (every sample done: all dump slots) run after the last sample is done and are
# recorded, changing no spike, stat or gradient. Elsewhere before every step, so the
# ops and step counts are those of N = 1.
STOP_EVERY = {"cuda": 8}
# Devices where the step loops read nothing on the host but their stop test.
SYNC_FREE_DEVICES = ("cuda",)
# "receivers": a conv step that reaches more than this fraction of the [B, W] columns
# is evaluated over the whole state, and its backward record is the whole state's
# (10 B per receiver against 7 B per column).
RECEIVERS_BELOW = 0.5
# Sync-free conv steps without autograd run at a fixed-size list of their receivers
# (K x `ImageSynapses.list_width` per sample, repeats included: "listed") when that
# list is at most this fraction of the state's width, else over the whole state. Fixed
# by K and the network, never by the data (VGG-7: K <= 24). An indexed op costs
# several elementwise ones per element: on the CPU (benchmarks/sync_free_cost.py) a
# list 0.08 of the width (VGG-7, K = 8) made the iteration 1.36x faster than the
# whole-state steps, one 0.30 of it (width 0.25) 1.24x slower. The GPU's crossover is
# unmeasured.
LISTED_BELOW = 0.25


@dataclass(frozen=True)
class Forced:
    """Choices that override the plan's own; None: the plan's own.

    sync_free: run the loops without host reads (True; CUDA's mode) or with them.
    stop_every: per-op steps between stop tests.
    steps: the event steps' mode without autograd (one of `MODES`), taken at every
        step: "receivers" then never falls back to the whole state.
    """

    sync_free: bool | None = None
    stop_every: int | None = None
    steps: str | None = None

    def __post_init__(self):
        if self.steps is not None and self.steps not in MODES:
            raise ValueError(f"steps must be one of {MODES}, got {self.steps!r}")
        if self.stop_every is not None and (isinstance(self.stop_every, bool)
                                            or not isinstance(self.stop_every, int) or self.stop_every < 1):
            raise ValueError(f"stop_every must be an int >= 1, got {self.stop_every!r}")


# Forced is a frozen dataclass: the shared default cannot be mutated (B039 is about
# mutable defaults).
_FORCED: ContextVar[Forced] = ContextVar("asynctrain_forced", default=Forced())  # noqa: B039


@contextlib.contextmanager
def forced(**choices) -> Iterator[Forced]:
    """Engines made inside the block run with these `Forced` choices (nested blocks
    add to the outer ones)::

        with plan.forced(sync_free=True):            # CUDA's loops, on the CPU
            out = snn(frames)
        with plan.forced(sync_free=True, steps="whole", stop_every=8):
            ...

    The choice is the engine's for its whole call (forward and backward), wherever
    its backward runs."""
    unknown = set(choices) - {f.name for f in fields(Forced)}
    if unknown:
        raise TypeError(f"forced() takes {[f.name for f in fields(Forced)]}, got {sorted(unknown)}")
    token = _FORCED.set(replace(_FORCED.get(), **choices))
    try:
        yield _FORCED.get()
    finally:
        _FORCED.reset(token)


def current_forced() -> Forced:
    """The choices forced where this is called (`forced`)."""
    return _FORCED.get()


def sync_free_on(device: torch.device, force: Forced | None = None) -> bool:
    """Whether engines on `device` run their loops without host reads."""
    force = current_forced() if force is None else force
    if force.sync_free is not None:
        return force.sync_free
    return torch.device(device).type in SYNC_FREE_DEVICES


def why_not_fused(steps: type[FusedSteps] | None, spec: StepSpec, *, image: bool, histogram: bool) -> str:
    """Why a backend's fused steps do not run a call ("" when they do)."""
    if steps is None:
        return "the backend has no fused steps"
    if image:
        return "convolutional networks run the per-op steps"
    reason = steps.unsupported(spec)
    if reason:
        return reason
    if histogram and not steps.records_histogram:
        return f"{steps.__name__} does not record the currents-to-spike histogram"
    if spec.fill and not steps.fills_slots:
        return f"{steps.__name__} does not fill slots (fill_slots)"
    return ""


@dataclass(frozen=True)
class Plan:
    """How one call runs; `choose` makes it, once per call (`Engine.plan`)."""

    sync_free: bool        # the loops read nothing on the host but their stop test
    stop_every: int        # per-op steps between stop tests
    steps: str             # the event steps' mode without autograd (one of `MODES`)
    why_not_fused: str     # why the fused steps do not run ("" when they do)
    receivers_below: float  # "receivers": steps reaching more of the columns run over the whole state
    # A step's backward record over a checkpoint (`Checkpoints`): ~K x mean fan-out
    # receivers per sample at 10 B each ("receivers") or K x list width at ~11 B
    # ("listed") against ~8 B (13 B sync-free) per column of a packed state.
    record_ratio: float
    nested: bool           # the backward splits each segment again (`sub_segment`)

    @staticmethod
    def choose(net: Network, spec: StepSpec, *, fused_steps: type[FusedSteps] | None, histogram: bool,
               checkpoint_every: int | None, force: Forced | None = None) -> "Plan":
        """The plan of a call described by `spec` on `net`; `force` (default: the
        block's, `forced`) overrides choices and raises where one cannot apply."""
        force = current_forced() if force is None else force
        dev = torch.device(spec.device).type
        sync_free = sync_free_on(spec.device, force)
        syn = net.synapses if net.image else None
        w, K = spec.width, spec.k
        why = why_not_fused(fused_steps, spec, image=syn is not None, histogram=histogram)
        if syn is None:
            steps = "whole" if why else "fused"
        elif sync_free:
            steps = "listed" if K * syn.list_width <= LISTED_BELOW * w else "whole"
        else:
            steps = "receivers"
        below = RECEIVERS_BELOW
        if force.steps is not None:
            _check_forced(force.steps, why, image=syn is not None, sync_free=sync_free)
            steps, below = force.steps, math.inf
        if steps != "fused" and not why:
            why = f"steps={steps!r} forced"
        # Conv networks, adaptive checkpoints: the backward splits each segment again,
        # so its memory grows as ops^(1/3), not sqrt(ops), for one more recompute of
        # the forward (fully connected networks: two levels).
        ratio = 1.0
        if steps == "receivers":
            ratio = min(1.0, 10 * K * syn.mean_fan_out / (8 * w))
        elif steps == "listed":
            ratio = min(1.0, 11 * K * syn.list_width / (13 * w))
        return Plan(sync_free=sync_free, stop_every=force.stop_every or STOP_EVERY.get(dev, 1), steps=steps,
                    why_not_fused=why, receivers_below=below, record_ratio=ratio,
                    nested=syn is not None and checkpoint_every is None)

    def mode(self, autograd: bool) -> str:
        """The event steps' mode of a call: "whole" under autograd (functional torch
        ops, through which autograd runs), else `steps`."""
        return "whole" if autograd else self.steps

    def sub_segment(self, n_ops: int) -> int | None:
        """Ops between the states the backward keeps inside a segment of `n_ops` ops
        (None: it keeps every op's record instead). Nested plans split a segment whose
        records would outweigh 4 states: c ~ sqrt(n / r) ops per sub-segment, so about
        2 sqrt(n r) states' worth of states and records are held at once."""
        r = self.record_ratio
        if not self.nested or n_ops * r <= 4:
            return None
        return math.ceil(math.sqrt(n_ops / r))


def _check_forced(steps: str, why_not: str, *, image: bool, sync_free: bool) -> None:
    if steps == "fused" and why_not:
        raise ValueError(f"steps='fused' forced, but the fused steps do not run this call: {why_not}")
    if steps in ("receivers", "listed") and not image:
        raise ValueError(f"steps={steps!r} forced, but only convolutional networks evaluate at receivers")
    if steps == "receivers" and sync_free:
        raise ValueError("steps='receivers' forced in the sync-free mode: it lists receivers on the host "
                         "(use 'listed')")
    if steps == "listed" and not sync_free:
        raise ValueError("steps='listed' forced outside the sync-free mode (force sync_free=True too)")
