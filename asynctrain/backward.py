"""Unlayered backpropagation with checkpoints: the forward keeps a state every C ops
and the [B, K] selection of every step; the backward recomputes one segment at a
time from its checkpoint (no autograd) and sweeps it in reverse by hand. Conv
networks nest this once (`Engine.sub_segment`): a long segment is first recomputed
keeping only inner states, then swept one part at a time.

The sweep is SPEC 8 written out. Per forward step, going backwards, with adjoints
(gV, gO, gacc) of membrane, outboxes and the pass's output accumulator:

    gs   = gO * is_source + gacc (at output columns)        # O += s, acc += s
    gV, gI = LIF backward (arctan surrogate, reset, refractory clamp)
    gvals, gW += deliver backward (rows of the K sources)    # I = sum vals * W rows
    gO   = gO with the taken slots zeroed, + gvals at the delivered slots

so a pending outbox that was not selected keeps its adjoint until the step that
filled it, exactly as "its gradient flows straight from the step that delivered it
to the evaluations that filled it". A hand sweep instead of autograd over the
recomputed segment: no graph is built and no per-op gradient buffers accumulate
(0.6x the backward time of the autograd replay it replaced, shd-like, K=8, CPU);
`checkpoint_every=0` (plain autograd) is the reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .engine import Engine
from .state import PackedState, State, StepInfo, StepInfoAt, StepInfoListed
from .kernels.cpu_step import FusedRecord
from .kernels.lif import lif_backward_torch
from .retain import ChunkStore, FlatStore


@dataclass
class CompactInfo:
    """A step's backward record at its receivers only (convolutional networks, where a
    step reaches ~K x 576..2304 of 229,386 columns per sample at small K): 10 bytes per
    receiver instead of the 7 + 8 bytes per column of the full `StepInfo` masks,
    pre-spike potentials, spikes and counts. The backward gathers its adjoints there."""

    vals: torch.Tensor     # [B, K] delivered values
    idx: torch.Tensor      # int32 [R] receivers, flat in [B * W] (int64 past 2**31)
    v_pre: torch.Tensor    # [R]
    refr: torch.Tensor     # bool [R]
    gate: torch.Tensor     # bool [R]
    # sync-free receiver lists (`StepInfoListed`): repeats and not-valid dump entries;
    # None: every entry received, once
    received: torch.Tensor | None = None


# A conv step's record is compact when at most this fraction of the [B, W] columns
# received (10 B per receiver against 7 B per column for the full record).
COMPACT_BELOW = 0.5


def _record(engine: Engine, info: StepInfo | StepInfoAt, small: ChunkStore, flat: FlatStore
            ) -> StepInfo | CompactInfo:
    """Compact a conv step's record when at most half of the columns received (10 B
    per receiver against 7 B per column for the full record; at K = 512 on VGG-7 most
    steps reach more). Kept copies go to the segment's stores (retain.py)."""
    if engine.syn is None:
        return info
    vals = small.keep(info.vals)
    if isinstance(info, StepInfoListed):  # the step's fixed-size receiver list
        small_idx = info.idx.to(torch.int32) if engine.batch * engine.width < 2**31 else info.idx
        return CompactInfo(vals, flat.keep(small_idx), flat.keep(info.v_pre), flat.keep(info.refr),
                           flat.keep(info.gate), flat.keep(info.valid))
    if engine.sync_free:  # no receiver list (a host read): the full record (`StepInfo`)
        return replace(info, vals=vals, spikes=None, n_before=None)
    shape = (engine.batch, engine.width)
    at = isinstance(info, StepInfoAt)  # the receivers' values already
    idx = info.idx if at else info.received.reshape(-1).nonzero().squeeze(1)
    if idx.numel() > COMPACT_BELOW * shape[0] * shape[1]:  # the sweep reads neither spikes nor n_before
        return replace(info.dense(shape) if at else info, vals=vals, spikes=None, n_before=None)
    if at:
        v_pre, refr, gate = info.v_pre, info.refr, info.gate
    else:
        v_pre, refr, gate = (x.reshape(-1)[idx] for x in (info.v_pre, info.refr, info.gate))
    small_idx = idx.to(torch.int32) if shape[0] * shape[1] < 2**31 else idx
    return CompactInfo(vals, flat.keep(small_idx), flat.keep(v_pre), flat.keep(refr), flat.keep(gate))


def _recompute(engine: Engine, ops: list[tuple], st: State, frames: torch.Tensor, wt: torch.Tensor,
               states_every: int | None = None) -> list | dict[int, PackedState]:
    """Re-run a segment's ops without grad; keep what each evaluation's backward needs.
    Conv networks keep no [B, K] index copies (the sweep re-reads them from `ops`).
    With `states_every` = c: keep no records, only the state before every c-th op
    ({op index in the segment: state}) -- the inner checkpoints of a nested segment."""
    records, states = [], {}
    keep = states_every is None
    small, flat = ChunkStore(), FlatStore()
    fused, owned = engine.fused, False
    for i, op in enumerate(ops):
        if not keep and i % states_every == 0:
            states[i] = st.pack(engine.sync_free)  # a copy: the fused steps go on in place
        kind, t = op[0], op[1]
        if kind == "step" and fused is not None:  # in place on a state of its own
            if not owned:
                st, owned = st.clone(), True
                fused.bind_state(st)
            sel_deliv = op[3] if op[4] is None else op[4]
            rec = fused.replay_step(t, op[2], op[3], sel_deliv)
            if keep:
                records.append((op[3], sel_deliv, rec))
            continue
        owned = False
        rec = None
        if kind == "start":
            st = engine.op_start(st)
        elif kind == "input":
            st, rec = engine.op_input(st, frames[t], wt, t)
        elif kind == "step":
            sel = op[3].long()
            sel_deliv = sel if op[4] is None else op[4].long()
            st, info = engine.op_step(st, sel, sel_deliv, wt, t, op[2])
            if not keep:
                continue
            if engine.syn is None:
                rec = (sel, sel_deliv, info)
            else:
                rec = (None, None, _record(engine, info, small, flat))
        if keep:
            records.append(rec)
    return records if keep else states


def sweep_segment(engine: Engine, ops: list[tuple], st0: State, frames: torch.Tensor,
                  wt: torch.Tensor, adj: tuple, grad_out: torch.Tensor, grad_wt: torch.Tensor,
                  grad_frames: torch.Tensor | None = None) -> tuple:
    """Adjoints (gV, gO, gacc) at the segment's start from those at its end; adds the
    segment's weight-table gradient into `grad_wt` (and, when given, the frames'
    gradient into `grad_frames [T, B, n_inputs]`) in place. A long segment of a nested
    engine is recomputed once to keep inner states, then swept one part at a time."""
    every = engine.sub_segment(len(ops))
    if every is None:
        return _sweep(engine, ops, st0, frames, wt, adj, grad_out, grad_wt, grad_frames)
    states = _recompute(engine, ops, st0, frames, wt, states_every=every)
    for i0 in sorted(states, reverse=True):
        adj = _sweep(engine, ops[i0:i0 + every], states.pop(i0).unpack(), frames, wt, adj, grad_out, grad_wt,
                     grad_frames)
    return adj


def _sweep(engine: Engine, ops: list[tuple], st0: State, frames: torch.Tensor, wt: torch.Tensor,
           adj: tuple, grad_out: torch.Tensor, grad_wt: torch.Tensor,
           grad_frames: torch.Tensor | None) -> tuple:
    """`sweep_segment` with every op's record kept at once."""
    records = _recompute(engine, ops, st0, frames, wt)
    g_v, g_o, g_acc = adj  # the sweep's own tensors: updated in place where it pays
    fused = engine.fused
    net, cfg = engine.net, engine.cfg
    out = net.output_slice
    width = engine.width
    g_current_buf = None  # compact records: a zero [B, W] buffer, written at receivers
    for op, rec in zip(reversed(ops), reversed(records)):
        kind, t = op[0], op[1]
        if kind == "end":
            if cfg.readout == "potential":
                g_v = g_v.clone()
                g_v[:, out] += grad_out[t]
            else:
                g_acc = g_acc + grad_out[t]
        elif kind == "start":
            g_v = g_v * engine.decay
            if not cfg.carry_pending:
                g_o = torch.zeros_like(g_o)
            g_acc = torch.zeros_like(g_acc)
        elif kind == "input":
            if rec is None:  # frame queued into the outboxes: O += x
                if grad_frames is not None:
                    grad_frames[t] += g_o[:, :net.n_inputs]
                continue
            g_v, g_current = _evaluation_backward(engine, rec, g_v, g_o, g_acc, out)
            if engine.syn is not None:
                g_w, g_x = engine.syn.input_backward(rec.vals, g_current, wt, grad_frames is not None)
                grad_wt += g_w
                if grad_frames is not None:
                    grad_frames[t] += g_x
                continue
            lo, n1 = net.offsets[1], net.layer_sizes[1]
            g_layer1 = g_current[:, lo:lo + n1]
            grad_wt[:net.n_inputs, :n1] += rec.vals.t() @ g_layer1
            if grad_frames is not None:
                grad_frames[t] += g_layer1 @ wt[:net.n_inputs, :n1].t()
        else:
            sel, sel_deliv, info = rec
            if isinstance(info, FusedRecord):  # in place on adjoints of its own
                if not (g_v.is_contiguous() and g_o.is_contiguous()):
                    g_v, g_o = g_v.contiguous(), g_o.contiguous()
                fused.backward_step(info, sel, sel_deliv, g_v, g_o, g_acc.contiguous(), grad_wt)
                continue
            if sel is None:  # conv networks: not kept through the segment
                sel = op[3].long()
                sel_deliv = sel if op[4] is None else op[4].long()
            # fillers (fill_slots) as their columns: delivered like any outbox
            sel, sel_deliv = engine.decode(sel)[1], engine.decode(sel_deliv)[1]
            if isinstance(info, CompactInfo):
                if g_current_buf is None:
                    g_current_buf = torch.zeros_like(g_v)
                g_v = g_v.contiguous()
                idx = _compact_backward(engine, info, g_v, g_o, g_acc, out, width, g_current_buf)
                g_current = g_current_buf
            else:
                idx = None
                g_v, g_current = _evaluation_backward(engine, info, g_v, g_o, g_acc, out)
            if engine.syn is not None:  # adds its weight gradient into grad_wt itself
                g_vals, _ = engine.syn.deliver_backward(g_current, info.vals, sel_deliv, wt,
                                                        engine.tables.source_slot, grad_wt, engine.ops,
                                                        engine.sync_free)
            else:
                g_vals, g_table = engine.ops.deliver_backward(g_current, info.vals, sel_deliv, wt,
                                                              engine.tables.targets)
                grad_wt += g_table
            if idx is not None:
                g_current_buf.view(-1)[idx] = 0
            g_o.scatter_(1, sel, 0.0).scatter_add_(1, sel_deliv, g_vals)
    return g_v, g_o, g_acc


def _evaluation_backward(engine: Engine, info, g_v, g_o, g_acc, out: slice):
    # spikes feed the outboxes of sources and the accumulator of outputs
    g_s = g_o * engine.source_f
    g_s[:, out] += g_acc
    return engine.ops.lif_backward(g_v, g_s, info.v_pre, info.refr, info.received, info.gate,
                                   engine.theta, engine.alpha, engine.cfg.detach_reset)


def _compact_backward(engine: Engine, info: CompactInfo, g_v, g_o, g_acc, out: slice, width: int,
                      g_current: torch.Tensor) -> torch.Tensor:
    """`_evaluation_backward` at a compact record's receivers only (everyone else keeps
    g_v and gets no current): updates the contiguous `g_v` in place, writes the
    receivers' current gradient into the zero buffer `g_current` and returns the flat
    receiver indices (the caller zeroes the buffer there again). No [B, W] pass: a
    VGG-7 step at small K reaches ~4% of the columns."""
    idx = info.idx.long()
    col = idx % width
    g_s = g_o.reshape(-1)[idx] * engine.source_f[col]
    at_out, acc_at = engine.at_outputs(idx)
    if info.received is not None:  # a receiver list (sync-free): no host read, no mask
        g_acc_at = g_acc.reshape(-1)[torch.where(at_out, acc_at, 0)]
        g_s = torch.where(at_out, g_s + g_acc_at, g_s)
    elif bool(at_out.any()):  # the readout accumulator's adjoint at output receivers
        g_s[at_out] += g_acc.reshape(-1)[acc_at[at_out]]
    received = torch.ones_like(info.refr) if info.received is None else info.received
    gv_r, gi_r = lif_backward_torch(g_v.reshape(-1)[idx], g_s, info.v_pre, info.refr,
                                    received, info.gate, engine.theta[col],
                                    engine.alpha, engine.cfg.detach_reset)
    g_v.view(-1)[idx] = gv_r
    g_current.view(-1)[idx] = gi_r
    return idx


class EventFunction(torch.autograd.Function):
    """Forward without autograd, keeping checkpoints and per-step indices; backward
    recomputes segments from their checkpoints and sweeps them in reverse."""

    @staticmethod
    def forward(ctx, engine: Engine, frames: torch.Tensor, wt: torch.Tensor):
        out, stats, ops, ckpts = engine.run(frames, wt, keep_checkpoints=True)
        engine.stats = stats
        ctx.engine, ctx.ops, ctx.ckpts = engine, ops, ckpts
        # frames: the input recompute needs them; wt: the [N + 1, F] table the
        # deliveries read. Both exist anyway (the caller's frames, wt feeds autograd).
        ctx.save_for_backward(frames, wt)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        frames, wt = ctx.saved_tensors
        engine, ops, ckpts = ctx.engine, ctx.ops, ctx.ckpts
        grad_out = grad_out.contiguous()
        st_end = ckpts[max(ckpts)]
        adj = (torch.zeros_like(st_end.v), torch.zeros_like(st_end.v), torch.zeros_like(st_end.acc))
        grad_wt = torch.zeros_like(wt)
        # analog inputs (e.g. an encoder in front) get a gradient like under plain autograd
        grad_frames = torch.zeros_like(frames) if ctx.needs_input_grad[1] else None
        starts = sorted(ckpts)
        ends = starts[1:] + [len(ops)]
        if engine.fused is not None:
            engine.fused.bind_weights(wt)
        with torch.no_grad():
            for i0, i1 in reversed(list(zip(starts, ends))):
                adj = sweep_segment(engine, ops[i0:i1], ckpts.pop(i0).unpack(), frames, wt, adj, grad_out, grad_wt,
                                    grad_frames)
        ctx.ops = ctx.ckpts = None  # free the record once used
        return None, grad_frames, grad_wt
