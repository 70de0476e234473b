"""Conv steps evaluated at their receivers only, in place (`plan.Plan` modes
"receivers" and "listed"): a VGG-7 step at K = 8 reaches ~4% of the 229,386 columns
per sample, and nobody else changes. The same operations on the gathered receivers
as `steps.WholeState` on every column, so the same numbers.

- `AtReceivers` lists the step's receivers on the host (CPU); a step that reaches
  more than `Plan.receivers_below` of the columns is handed to the whole-state mode.
- `ListedReceivers` (sync-free, CUDA): shapes fixed by K, no host read. The step's
  deliveries add into kept [B, W] buffers, the neurons are evaluated at
  `ImageSynapses.receiver_list` (every target of every delivered entry, repeats
  included: each received column once, at one of its lanes) and the buffers are
  zeroed there again, not over [B, W]; one op (`kernels/listed_steps.py`
  listed_step: a Triton kernel or its twin) does it all, the pass's bookkeeping
  included. Lanes that do not evaluate a column list their sample's dump column
  (never a receiver) and change nothing.

Both keep a `ReceiverRecord` for the backward (10-11 B per receiver instead of the
7 B per column of a whole-state record) and sweep it at the receivers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng
from .kernels.image_steps import FILLER_COUNT
from .kernels.listed_steps import ReceiverRows
from .kernels.lif import lif_backward_torch, lif_torch
from .passes import Pass
from .retain import RecordStores
from .state import Adjoints, State
from .steps import PerOpMode, StepRecord, WholeState


@dataclass
class StepInfoAt:
    """What an evaluation at a step's receivers leaves (`AtReceivers`); everyone else
    received nothing and did not change."""

    vals: torch.Tensor      # [B, K]
    idx: torch.Tensor       # int64 [R] receivers, flat in [B * W], ascending
    spikes: torch.Tensor    # [R]
    v_pre: torch.Tensor     # [R]
    n_before: torch.Tensor  # int32 [R]
    n_in: torch.Tensor      # int32 [R] after the step
    gate: torch.Tensor      # bool [R]
    refr: torch.Tensor      # bool [R] refractory before the step


@dataclass
class StepInfoListed:
    """What an evaluation at a step's listed receivers leaves (`ListedReceivers`): the
    rest happened in place (`kernels/listed_steps.py` listed_step)."""

    vals: torch.Tensor                  # [B, K]
    out_fired: torch.Tensor | None      # bool [B] an output neuron fired (the forward's)
    rows: ReceiverRows | None           # the backward record (a replay's)


@dataclass
class ReceiverRecord(StepRecord):
    """A step's backward record at its receivers only: 10 bytes per receiver instead of
    the 7 + 8 bytes per column of the whole-state masks, pre-spike potentials, spikes
    and counts. The backward gathers its adjoints there."""

    vals: torch.Tensor      # [B, K] delivered values
    idx: torch.Tensor       # int32 [R] receivers, flat in [B * W] (int64 past 2**31)
    v_pre: torch.Tensor     # [R]
    refr: torch.Tensor      # bool [R]
    gate: torch.Tensor      # bool [R]
    # receiver lists (`ListedReceivers`): each received column at one lane, the other
    # lanes at their sample's dump column, not received; None: every entry received
    received: torch.Tensor | None = None


class _Receivers(PerOpMode):
    """What both receivers' modes share: the record and its backward."""

    def __init__(self, eng):
        super().__init__(eng)
        self._g_current = None  # the backward's zero [B, W] buffer, written at receivers

    def evaluation_backward(self, rec: ReceiverRecord, adj: Adjoints) -> torch.Tensor:
        """At the receivers only (everyone else keeps its membrane adjoint and gets no
        current): updates the contiguous ``adj.v`` in place and writes the receivers'
        current gradient into a zero buffer (`release` zeroes it there again). No
        [B, W] pass."""
        eng = self.eng
        if self._g_current is None:
            self._g_current = torch.zeros_like(adj.v)
        adj.v = adj.v.contiguous()
        if rec.received is not None:  # a receiver list (sync-free): one op, no host read
            out = eng.net.output_slice
            eng.ops.listed_backward(rec, adj.v, adj.o.contiguous(), adj.acc, adj.armed, self._g_current, eng.theta,
                                    eng.source_f, out.start, out.stop, eng.alpha, eng.cfg.detach_reset)
            return self._g_current
        idx = rec.idx.long()
        col = idx % eng.width
        g_s = adj.o.reshape(-1)[idx] * eng.source_f[col]
        at_out, acc_at = eng.at_outputs(idx)
        if bool(at_out.any()):  # the readout accumulator's adjoint at output receivers
            g_s[at_out] += adj.acc.reshape(-1)[acc_at[at_out]]
        received = torch.ones_like(rec.refr)
        last = None if adj.armed is None else adj.armed.view(-1)[idx]
        gv_r, gi_r = lif_backward_torch(adj.v.reshape(-1)[idx], g_s, rec.v_pre, rec.refr, received, rec.gate,
                                        eng.theta[col], eng.alpha, eng.cfg.detach_reset, last)
        if adj.armed is not None:  # an evaluation met: the earlier ones are not the last
            adj.armed.view(-1)[idx] = last & ~received
        adj.v.view(-1)[idx] = gv_r
        self._g_current.view(-1)[idx] = gi_r
        return self._g_current

    def release(self, rec: ReceiverRecord) -> None:
        # index_fill_ takes the zero as a kernel argument (``x[idx] = 0`` would copy a
        # host tensor to the device, blocking)
        self._g_current.view(-1).index_fill_(0, rec.idx.long(), 0)


class AtReceivers(_Receivers):
    """Conv steps without autograd at their receivers, listed on the host (CPU)."""

    name = "receivers"

    def __init__(self, eng, whole: WholeState):
        super().__init__(eng)
        self.whole = whole  # steps that reach most columns

    def step(self, st, sel, sel_deliv, wt, t, step, ps=None, stores=None):
        eng = self.eng
        w = eng.width
        d = eng.deliver(st, sel_deliv, wt)
        st.o.scatter_(1, eng.decode(sel)[1], 0.0)
        idx = d.received.view(-1).nonzero().squeeze(1)  # fillers' targets receive, uncounted
        if idx.numel() > eng.plan.receivers_below * d.n_add.numel():  # most columns received (large K)
            st, info = self.whole.evaluate(st, d.current, d.n_add, d.received, t, step, d.vals)
            return st, info, self.whole
        col = idx % w
        n_before = st.n_in.view(-1)[idx]
        n_in = n_before + d.n_add.view(-1)[idx]
        gate = n_in >= eng.sync[col]
        refr = st.refr.view(-1)[idx]
        v, spikes, v_pre = lif_torch(st.v.view(-1)[idx], d.current.view(-1)[idx], refr,
                                     torch.ones_like(gate), gate, eng.theta[col])
        st.v.view(-1)[idx] = v
        st.n_in.view(-1)[idx] = n_in
        st.o.view(-1)[idx] = st.o.view(-1)[idx] + spikes * eng.source_f[col]
        fired = spikes > 0
        is_out, acc_at = eng.at_outputs(idx)
        at_out = fired & is_out
        if bool(at_out.any()):
            acc_at = acc_at[at_out]
            st.acc.view(-1)[acc_at] = st.acc.view(-1)[acc_at] + spikes[at_out]
        if eng.cfg.refractory:
            now = idx[fired]
            if eng.p_ref > 0:  # the draws of the whole-state mode, at the neurons that fired
                u = eng.ops.uniform_at(eng.seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, now // w, now % w)
                now = now[u >= eng.p_ref]
            st.refr.view(-1)[now] = True
        return st, StepInfoAt(d.vals, idx, spikes, v_pre, n_before, n_in, gate, refr), self

    def record(self, info: StepInfoAt, stores: RecordStores) -> ReceiverRecord:
        eng = self.eng
        idx = info.idx.to(torch.int32) if eng.batch * eng.width < 2**31 else info.idx
        return ReceiverRecord(self, stores.small(info.vals), stores.flat(idx), stores.flat(info.v_pre),
                              stores.flat(info.refr), stores.flat(info.gate))

    def bookkeep(self, ps: Pass, st: State, info: StepInfoAt) -> None:
        """In place on the pass's own tensors (the step's selection has just replaced
        ``ps.pending``)."""
        eng = self.eng
        w = eng.width
        idx, col = info.idx, info.idx % w
        fired = info.spikes > 0
        is_src = eng.tables.is_source[col]
        new = fired & is_src  # newly pending: sources that fired or just reached their sync threshold
        if eng.cfg.barrier_messages:
            sync = eng.sync[col]
            new = new | ((info.n_before < sync) & (info.n_in >= sync) & is_src)
        ps.pending.view(-1)[idx[new]] = True
        if eng.fill:
            ps.fillable.view(-1)[idx[info.gate & ~info.refr & eng.tables.is_hidden[col]]] = True
        if eng.cfg.policy == "MS":
            ps.pre_spike.view(-1)[idx[fired]] = info.v_pre[fired]
        ps.spike_sum.view(-1)[idx] = ps.spike_sum.view(-1)[idx] + info.spikes
        out_fired = torch.zeros(eng.batch, dtype=torch.bool, device=idx.device)
        out_fired[idx[fired & eng.at_outputs(idx)[0]] // w] = True
        if ps.eager_first:
            ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(out_fired))
        if eng.histogram_bins:
            counts = info.n_in[fired].clamp(max=eng.histogram_bins - 1).long()
            ps.currents += torch.bincount(counts, minlength=eng.histogram_bins)


class ListedReceivers(_Receivers):
    """Sync-free conv steps without autograd at a fixed-size list of their receivers:
    the step's deliveries (`conv.ImageSynapses.deliver` into kept buffers; fillers
    with `FILLER_COUNT`), then one op (`backends.Ops.listed_step`) that evaluates each
    received column once, does the pass's bookkeeping (forward) or writes the
    backward record (replay), and zeroes the buffers where the step wrote."""

    name = "listed"

    def __init__(self, eng):
        super().__init__(eng)
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's i-th pair of zero [B, W] delivery buffers (current, counts)."""
        if i not in self.buffers:
            eng = self.eng
            self.buffers[i] = eng.syn.buffers(eng.batch, eng.dtype, eng.device)
        return self.buffers[i]

    def step(self, st, sel, sel_deliv, wt, t, step, ps=None, stores=None):
        eng = self.eng
        syn, src, tab, cfg = eng.syn, eng.tables.source_slot, eng.tables, eng.cfg
        sel_all = eng.decode(sel)[1]
        d_real, d_all = eng.decode(sel_deliv)
        vals = st.o.gather(1, d_all)
        cur, cnt = self._buffers(0)
        if eng.fill:  # the fillers' deliveries: received, counted apart (as `Engine.deliver`)
            filler = sel_deliv < 0
            syn.deliver(vals.masked_fill(filler, 0.0), d_real, wt, src, eng.ops, True, out=(cur, cnt))
            syn.deliver(vals.masked_fill(~filler, 0.0), d_all.masked_fill(~filler, eng.net.dump), wt, src,
                        eng.ops, True, out=(cur, cnt), unit=FILLER_COUNT)
        else:
            syn.deliver(vals, sel_deliv, wt, src, eng.ops, True, out=(cur, cnt))
        st.o.scatter_(1, sel_all, 0.0)
        book = out_fired = rows = None
        if ps is not None:
            book = ps.tensors(None)
            out_fired = torch.zeros(eng.batch, dtype=torch.bool, device=eng.device)
        if stores is not None:
            index = torch.int32 if eng.batch * eng.width < 2**31 else torch.int64
            rows = ReceiverRows.empty(d_all.numel() * syn.list_width, eng.dtype, index,
                                      lambda n, dtype: stores.flat_empty(n, dtype, eng.device))
        out = eng.net.output_slice
        eng.ops.listed_step(d_all, src, syn.layers(eng.device), cur, cnt, st, eng.sync, eng.theta, eng.source_f,
                            tab.is_source, tab.is_hidden, out.start, out.stop, eng.seed, t, step, eng.p_ref, book,
                            out_fired, rows, refractory=bool(cfg.refractory), barrier=bool(cfg.barrier_messages),
                            policy_ms=cfg.policy == "MS")
        return st, StepInfoListed(vals, out_fired, rows), self

    def record(self, info: StepInfoListed, stores: RecordStores) -> ReceiverRecord:
        r = info.rows  # written by the step (`step(..., stores=...)`)
        return ReceiverRecord(self, stores.small(info.vals), r.idx, r.v_pre, r.refr, r.gate, r.received)

    def bookkeep(self, ps: Pass, st: State, info: StepInfoListed) -> None:
        """What the step's op left for the loop: the output spikes of the step (its
        first output step, with the output stop)."""
        if ps.eager_first:
            ps.first_out = torch.where((ps.first_out < 0) & info.out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(info.out_fired))
