"""Conv steps evaluated at their receivers only, in place (`plan.Plan` modes
"receivers" and "listed"): a VGG-7 step at K = 8 reaches ~4% of the 229,386 columns
per sample, and nobody else changes. The same operations on the gathered receivers
as `steps.WholeState` on every column, so the same numbers.

- `AtReceivers` lists the step's receivers on the host (CPU); a step that reaches
  more than `Plan.receivers_below` of the columns is handed to the whole-state mode.
- `ListedReceivers` (sync-free, CUDA): shapes fixed by K, no host read. The step's
  deliveries add into kept [B, W] buffers, the neurons are evaluated at
  `ImageSynapses.receiver_list` (every target of every delivered entry, repeats
  included) and the buffers are zeroed there again, not over [B, W]. Every repeat of a
  column gathers the same values before anything is written, so it computes and
  writes the same result: the writes are idempotent, and entries that reach nobody
  list their sample's dump column (never a receiver) and write back what they read.

Both keep a `ReceiverRecord` for the backward (10-11 B per receiver instead of the
7 B per column of a whole-state record) and sweep it at the receivers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng
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
class StepInfoListed(StepInfoAt):
    """`StepInfoAt` at a fixed-size list of a step's receivers (`ListedReceivers`):
    `idx` lists every target of every delivered entry, repeats included, and the
    sample's dump column where an entry reaches nobody (`valid` False there: not
    received, nothing changed). Every repeat of a column holds the same values."""

    valid: torch.Tensor     # bool [R]


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
    # receiver lists (`ListedReceivers`): repeats and not-valid dump entries;
    # None: every entry received, once
    received: torch.Tensor | None = None


class _Receivers(PerOpMode):
    """What both receivers' modes share: the record and its backward."""

    def __init__(self, eng):
        super().__init__(eng)
        self._g_current = None  # the backward's zero [B, W] buffer, written at receivers

    def _fired_and_pending(self, info: StepInfoAt, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At a step's receivers (columns `col`): (fired, newly pending: sources that
        fired or, with barrier messages, just reached their sync threshold)."""
        eng = self.eng
        fired = info.spikes > 0
        is_src = eng.tables.is_source[col]
        new = fired & is_src
        if eng.cfg.barrier_messages:
            sync = eng.sync[col]
            new = new | ((info.n_before < sync) & (info.n_in >= sync) & is_src)
        return fired, new

    def _record(self, info: StepInfoAt, stores: RecordStores, received: torch.Tensor | None) -> ReceiverRecord:
        eng = self.eng
        idx = info.idx.to(torch.int32) if eng.batch * eng.width < 2**31 else info.idx
        return ReceiverRecord(self, stores.small(info.vals), stores.flat(idx), stores.flat(info.v_pre),
                              stores.flat(info.refr), stores.flat(info.gate),
                              None if received is None else stores.flat(received))

    def evaluation_backward(self, rec: ReceiverRecord, adj: Adjoints) -> torch.Tensor:
        """At the receivers only (everyone else keeps its membrane adjoint and gets no
        current): updates the contiguous ``adj.v`` in place and writes the receivers'
        current gradient into a zero buffer (`release` zeroes it there again). No
        [B, W] pass."""
        eng = self.eng
        if self._g_current is None:
            self._g_current = torch.zeros_like(adj.v)
        adj.v = adj.v.contiguous()
        idx = rec.idx.long()
        col = idx % eng.width
        g_s = adj.o.reshape(-1)[idx] * eng.source_f[col]
        at_out, acc_at = eng.at_outputs(idx)
        if rec.received is not None:  # a receiver list (sync-free): no host read, no mask
            g_acc_at = adj.acc.reshape(-1)[torch.where(at_out, acc_at, 0)]
            g_s = torch.where(at_out, g_s + g_acc_at, g_s)
        elif bool(at_out.any()):  # the readout accumulator's adjoint at output receivers
            g_s[at_out] += adj.acc.reshape(-1)[acc_at[at_out]]
        received = torch.ones_like(rec.refr) if rec.received is None else rec.received
        last = None if adj.armed is None else adj.armed.view(-1)[idx]
        gv_r, gi_r = lif_backward_torch(adj.v.reshape(-1)[idx], g_s, rec.v_pre, rec.refr, received, rec.gate,
                                        eng.theta[col], eng.alpha, eng.cfg.detach_reset, last)
        if adj.armed is not None:  # repeats of a receiver read and write the same values
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

    def step(self, st, sel, sel_deliv, wt, t, step):
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
        return self._record(info, stores, None)

    def bookkeep(self, ps: Pass, st: State, info: StepInfoAt) -> None:
        """In place on the pass's own tensors (the step's selection has just replaced
        ``ps.pending``)."""
        eng = self.eng
        w = eng.width
        idx, col = info.idx, info.idx % w
        fired, new = self._fired_and_pending(info, col)
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
    """Sync-free conv steps without autograd at a fixed-size list of their receivers."""

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

    def step(self, st, sel, sel_deliv, wt, t, step):
        eng = self.eng
        w, syn, src = eng.width, eng.syn, eng.tables.source_slot
        sel_all = eng.decode(sel)[1]
        d_real, d_all = eng.decode(sel_deliv)
        vals = st.o.gather(1, d_all)
        cur, cnt = self._buffers(0)
        bufs = [(cur, cnt)]
        if eng.fill:  # the fillers' deliveries into a second pair (as `Engine.deliver`)
            filler = sel_deliv < 0
            syn.deliver(vals.masked_fill(filler, 0.0), d_real, wt, src, eng.ops, True, out=(cur, cnt))
            bufs.append(self._buffers(1))
            syn.deliver(vals.masked_fill(~filler, 0.0), d_all.masked_fill(~filler, eng.net.dump), wt,
                        src, eng.ops, True, out=bufs[1])
        else:
            syn.deliver(vals, sel_deliv, wt, src, eng.ops, True, out=(cur, cnt))
        idx, valid = syn.receiver_list(d_all, src)
        current, n_add = cur.view(-1)[idx], cnt.view(-1)[idx]
        if eng.fill:
            current = current + bufs[1][0].view(-1)[idx]
        for c_buf, n_buf in bufs:  # zero again where the step wrote (no host tensor: `release`)
            c_buf.view(-1).index_fill_(0, idx, 0.0)
            n_buf.view(-1).index_fill_(0, idx, 0)
        st.o.scatter_(1, sel_all, 0.0)
        col = idx % w
        v0, o0, n_before, refr = (x.view(-1)[idx] for x in (st.v, st.o, st.n_in, st.refr))
        n_in = torch.where(valid, n_before + n_add, n_before)
        gate = valid & (n_in >= eng.sync[col])
        v, spikes, v_pre = lif_torch(v0, current, refr, valid, gate, eng.theta[col])
        fired = spikes > 0
        is_out, acc_at = eng.at_outputs(idx)
        n_acc = st.acc.numel()
        acc = torch.cat([st.acc.reshape(-1), st.acc.new_zeros(1)])  # the last: a scratch slot
        acc_at = torch.where(fired & is_out, acc_at, n_acc)
        acc_new = acc[acc_at] + spikes
        st.v.view(-1)[idx] = v
        st.n_in.view(-1)[idx] = n_in
        st.o.view(-1)[idx] = o0 + spikes * eng.source_f[col]
        acc[acc_at] = acc_new
        st.acc.copy_(acc[:n_acc].view_as(st.acc))
        if eng.cfg.refractory:
            now = fired
            if eng.p_ref > 0:  # the draws of the whole-state mode, at the listed columns
                u = eng.ops.uniform_at(eng.seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, idx // w, col)
                now = now & (u >= eng.p_ref)
            st.refr.view(-1)[idx] = refr | now
        return st, StepInfoListed(vals, idx, spikes, v_pre, n_before, n_in, gate, refr, valid), self

    def record(self, info: StepInfoListed, stores: RecordStores) -> ReceiverRecord:
        return self._record(info, stores, info.valid)

    def bookkeep(self, ps: Pass, st: State, info: StepInfoListed) -> None:
        """In place on the pass's own tensors and without a host read: every repeat of a
        column gathers the same values first and writes the same result; not-valid
        entries (the dump column) change nothing. The histogram counts each column once
        (the first of its repeats in the sorted list)."""
        eng = self.eng
        w = eng.width
        idx, col = info.idx, info.idx % w
        fired, new = self._fired_and_pending(info, col)
        ps.pending.view(-1)[idx] = ps.pending.view(-1)[idx] | new
        if eng.fill:
            ps.fillable.view(-1)[idx] = ps.fillable.view(-1)[idx] | (info.gate & ~info.refr
                                                                     & eng.tables.is_hidden[col])
        if eng.cfg.policy == "MS":
            ps.pre_spike.view(-1)[idx] = torch.where(fired, info.v_pre, ps.pre_spike.view(-1)[idx])
        ps.spike_sum.view(-1)[idx] = ps.spike_sum.view(-1)[idx] + info.spikes
        at_out = (fired & eng.at_outputs(idx)[0]).to(torch.int32)
        out_fired = torch.zeros(eng.batch, dtype=torch.int32, device=idx.device).index_add_(0, idx // w, at_out) > 0
        if ps.eager_first:
            ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(out_fired))
        if eng.histogram_bins:
            order_idx, order = idx.sort()
            first = torch.ones_like(fired)
            first[1:] = order_idx[1:] != order_idx[:-1]
            counts = info.n_in[order].clamp(max=eng.histogram_bins - 1).long()
            ps.currents.scatter_add_(0, counts, (fired[order] & first).long())
