"""Step-evaluation modes (`plan.Plan`): what every mode of a call provides
(`StepMode`), what a per-op mode shares (`PerOpMode`), and the whole-state mode
(`WholeState`). The receivers' modes are in `receivers.py`, the fused steps in
`fused.py`.

A mode owns, for one event step: its evaluation (`step`: deliver, evaluate the
neurons, empty the outboxes), its bookkeeping (`bookkeep`: pending flags, pre-spike
potentials, spikes, first output step, histogram in the pass), its backward record
(`record`, built in the backward's recompute) and the record's backward
(`evaluation_backward`: surrogate, reset, refractory clamp; `step_backward`: the
whole step). The sweep (`loop.CallLoop`) runs a record's backward through the mode
that made it (`StepRecord.mode`).

The sweep is SPEC 8 written out. Per forward step, going backwards, with adjoints
(`state.Adjoints`: gV, gO, gacc) of membrane, outboxes and the pass's output
accumulator:

    gs   = gO * is_source + gacc (at output columns)        # O += s, acc += s
    gV, gI = LIF backward (arctan surrogate, reset, refractory clamp)
    gvals, gW += deliver backward (rows of the K sources)    # I = sum vals * W rows
    gO   = gO with the taken slots zeroed, + gvals at the delivered slots

so a pending outbox that was not selected keeps its adjoint until the step that
filled it, exactly as "its gradient flows straight from the step that delivered it
to the evaluations that filled it".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch

from . import rng
from .engine import Engine
from .ops import lif, window_carrier
from .passes import Pass
from .retain import RecordStores
from .state import Adjoints, State
from .timeline import EventStep


@dataclass
class Sweep:
    """One backward call: its inputs and what it accumulates (in place)."""

    frames: torch.Tensor                # [T, B, n_inputs]
    wt: torch.Tensor                    # the weight table
    grad_out: torch.Tensor              # [T, B, n_out]
    adj: Adjoints                       # carried from segment to segment
    grad_wt: torch.Tensor
    grad_frames: torch.Tensor | None    # wanted for analog inputs (an encoder in front)


@dataclass
class StepRecord:
    """What the backward's recompute keeps of one step; `mode` runs its backward."""

    mode: "StepMode" = field(repr=False)


class StepMode(ABC):
    """One step-evaluation mode of a call (`plan.MODES`)."""

    name = ""

    def __init__(self, eng: Engine):
        self.eng = eng

    @abstractmethod
    def step_backward(self, op: EventStep, rec: StepRecord, sweep: Sweep) -> None:
        """The reverse of event step `op` from its record: updates `sweep.adj` and adds
        into `sweep.grad_wt`, in place."""


class PerOpMode(StepMode):
    """A mode that evaluates one step at a time with the per-op torch ops or kernels of
    the call's backend (`backends.Ops`). Subclasses define `step`, `bookkeep`,
    `record` and `evaluation_backward`; the reverse of the step around the evaluation
    (deliveries, emptied outboxes) is the engine's, the same for all."""

    @abstractmethod
    def step(self, st: State, sel: torch.Tensor, sel_deliv: torch.Tensor, wt: torch.Tensor, t: int,
             step: int, ps: Pass | None = None, stores: RecordStores | None = None
             ) -> tuple[State, object, "PerOpMode"]:
        """Event step `step` of pass `t` with the selection (sel, sel_deliv int64 [B, K],
        as recorded). Returns (the state after it, what the evaluation leaves, the mode
        that evaluated it: this one, or one it handed the step to). `ps` (the forward)
        and `stores` (a replay that keeps records): for modes whose step does the
        pass's bookkeeping or writes its record itself (`receivers.ListedReceivers`);
        the others do them in `bookkeep` and `record`."""

    @abstractmethod
    def bookkeep(self, ps: Pass, st: State, info) -> None:
        """The non-differentiable bookkeeping after an evaluation (never replayed)."""

    @abstractmethod
    def record(self, info, stores: RecordStores) -> StepRecord:
        """What the step's backward needs of its evaluation (copied into `stores`)."""

    @abstractmethod
    def evaluation_backward(self, rec: StepRecord, adj: Adjoints) -> torch.Tensor:
        """The reverse of the evaluation: updates `adj` (the membranes' adjoint; the
        outboxes' and accumulator's feed the spikes) and returns the current's
        gradient [B, W]."""

    def release(self, rec: StepRecord) -> None:
        """Called once the current's gradient of `rec` has been read."""

    def step_backward(self, op: EventStep, rec: StepRecord, sweep: Sweep) -> None:
        eng, adj = self.eng, sweep.adj
        # fillers (fill_slots) as their columns: delivered like any outbox
        sel, sel_deliv = (eng.decode(x)[1] for x in op.selections())
        g_current = self.evaluation_backward(rec, adj)
        g_vals = eng.deliver_backward(g_current, rec.vals, sel_deliv, sweep.wt, sweep.grad_wt)
        self.release(rec)
        eng.outboxes_backward(adj, sel, sel_deliv, g_vals)


@dataclass
class StepInfo:
    """What one evaluation over the whole state leaves for the bookkeeping and the
    backward record."""

    vals: torch.Tensor      # [B, K] delivered values (the frame for the input step)
    spikes: torch.Tensor    # [B, W]
    v_pre: torch.Tensor     # [B, W] V1 (pre-spike potential)
    received: torch.Tensor  # bool [B, W]
    n_before: torch.Tensor  # int32 [B, W]
    gate: torch.Tensor      # bool [B, W] received and synced
    refr: torch.Tensor      # bool [B, W] refractory before the step


@dataclass
class DenseRecord(StepRecord):
    """The backward record of a whole-state evaluation: ~7 B per column."""

    vals: torch.Tensor      # [B, K] (the frame [B, n_inputs] for the input step)
    v_pre: torch.Tensor     # [B, W]
    refr: torch.Tensor      # bool [B, W]
    received: torch.Tensor  # bool [B, W]
    gate: torch.Tensor      # bool [B, W]


class WholeState(PerOpMode):
    """Every step over the whole [B, W] state, functional: autograd may run through it
    (plain autograd, ``checkpoint_every=0``); fully connected networks without fused
    steps; sync-free conv steps whose receiver list would be long; the prioritized
    input step of every mode."""

    name = "whole"

    def step(self, st, sel, sel_deliv, wt, t, step, ps=None, stores=None):
        eng = self.eng
        d = eng.deliver(st, sel_deliv, wt)
        st = eng.empty_outboxes(st, eng.decode(sel)[1])
        st, info = self.evaluate(st, d.current, d.n_add, d.received, t, step, d.vals)
        return st, info, self

    def evaluate(self, st: State, current: torch.Tensor, n_add: torch.Tensor, received: torch.Tensor,
                 t: int, step: int, vals: torch.Tensor) -> tuple[State, StepInfo]:
        """LIF, outboxes, accumulator and refractoriness of the neurons that `received`
        (`current` [B, W] and counted currents `n_add`, its `vals` delivered)."""
        eng = self.eng
        n_in = st.n_in + n_add
        gate = received & (n_in >= eng.sync)
        # plain autograd, fire_or_last: the surrogate where it fired, the rest parked
        last = None if st.carrier is None else torch.zeros_like(received)
        v, spikes, v_pre = lif(st.v, current, st.refr, received, gate, eng.theta, eng.alpha,
                               eng.cfg.detach_reset, eng.ops, last)
        carrier = None if st.carrier is None else window_carrier(
            st.v, current, st.carrier, v_pre, st.refr, received, gate, spikes, eng.theta, eng.alpha)
        o = st.o + spikes * eng.source_f
        acc = st.acc + spikes[:, eng.net.output_slice]
        refr = st.refr
        if eng.cfg.refractory:
            fired = spikes > 0
            if eng.p_ref > 0 and eng.plan.sync_free:  # every column's draw: no nonzero
                u = eng.ops.uniform_at(eng.seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, *eng.grid())
                fired = fired & (u >= eng.p_ref)
            elif eng.p_ref > 0:
                # draw only at the neurons that fired: a handful, not [B, N]
                at = fired.nonzero(as_tuple=True)
                u = eng.ops.uniform_at(eng.seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, *at)
                fired = fired.index_put(at, u >= eng.p_ref)
            refr = refr | fired
        return (replace(st, v=v, o=o, acc=acc, refr=refr, n_in=n_in, carrier=carrier),
                StepInfo(vals, spikes, v_pre, received, st.n_in, gate, st.refr))

    def bookkeep(self, ps, st, info: StepInfo) -> None:
        eng = self.eng
        fired = info.spikes > 0
        is_src = eng.tables.is_source
        ps.pending = ps.pending | (fired & is_src)
        if eng.fill:  # the outbox now holds surrogate gradient: synced and not clamped
            ps.fillable = ps.fillable | (info.gate & ~info.refr & eng.tables.is_hidden)
        if eng.cfg.barrier_messages:
            reached = (info.n_before < eng.sync) & (st.n_in >= eng.sync)
            ps.pending = ps.pending | (reached & ~fired & is_src)
        if eng.cfg.policy == "MS":  # the momentum key; RS never reads it
            ps.pre_spike = torch.where(fired, info.v_pre, ps.pre_spike)
        ps.spike_sum = ps.spike_sum + info.spikes
        out_fired = fired[:, eng.net.output_slice].any(1)
        if ps.eager_first:  # the output stop needs the first output step now
            ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(out_fired))
        if eng.histogram_bins and eng.plan.sync_free:  # the same counts, no boolean mask
            counts = st.n_in.clamp(max=eng.histogram_bins - 1).long()
            ps.currents.scatter_add_(0, counts.view(-1), fired.view(-1).long())
        elif eng.histogram_bins:
            # currents integrated before each spike (SPEC 9), hidden and output neurons
            counts = st.n_in[fired].clamp(max=eng.histogram_bins - 1).long()
            ps.currents += torch.bincount(counts, minlength=eng.histogram_bins)

    def record(self, info: StepInfo, stores: RecordStores) -> DenseRecord:
        # the sweep reads neither spikes nor n_before
        return DenseRecord(self, stores.small(info.vals), info.v_pre, info.refr, info.received, info.gate)

    def evaluation_backward(self, rec: DenseRecord, adj: Adjoints) -> torch.Tensor:
        eng = self.eng
        # spikes feed the outboxes of sources and the accumulator of outputs
        g_s = adj.o * eng.source_f
        g_s[:, eng.net.output_slice] += adj.acc
        adj.v, g_current = eng.ops.lif_backward(adj.v, g_s, rec.v_pre, rec.refr, rec.received, rec.gate,
                                                eng.theta, eng.alpha, eng.cfg.detach_reset, adj.armed)
        if adj.armed is not None:  # an evaluation met: the earlier ones are not the last
            adj.armed.logical_and_(~rec.received)
        return g_current
