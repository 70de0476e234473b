"""One listed step of an image (convolutional) network in one launch, and its reverse:
after a step's deliveries (`kernels/image_steps.py`), each received column of the
step's receiver list (`image_steps.receiver_list`: every target of every delivered
entry, repeats included, in shapes fixed by K) is evaluated once -- the LIF update,
the refractory draws, the pass's bookkeeping in the forward or the backward record
(`ReceiverRows`) in a replay -- and the delivery buffers are zeroed there again
(`listed_step_triton`; twin `listed_step_torch`). `listed_backward_triton` (twin
`listed_backward_torch`) reverses the evaluation at the record's received lanes.
Fillers (SPEC 8 fill_slots) are counted apart through `image_steps.FILLER_COUNT`.
Used by `asynctrain.receivers.ListedReceivers`; tests: tests/test_image_steps.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng
from ._triton import check_dtype, check_shape, check_tensors, hash_arg, jit, tl, triton
from .image_steps import (_FLOATS, _REAL_COUNT_MASK, ImageLayers, _lane, receiver_list)
from .lif import _lif_grad, lif_backward_torch, lif_torch, surrogate_constants
from .rng_triton import _uniform_at_from_hash


@dataclass
class ReceiverRows:
    """A listed step's backward record, one row per lane of its receiver list
    (``B x K x list_width``, `receiver_list`'s order), written by `listed_step`: each
    received column at exactly one lane (`received`), every other lane at its sample's
    dump column, not received."""

    idx: torch.Tensor       # int32 [R] flat positions into [B * W] (int64 past 2**31)
    v_pre: torch.Tensor     # [R] pre-spike potential V1
    refr: torch.Tensor      # bool [R] refractory before the step
    gate: torch.Tensor      # bool [R] received and synced
    received: torch.Tensor  # bool [R]

    @staticmethod
    def empty(n: int, dtype: torch.dtype, index_dtype: torch.dtype, alloc) -> "ReceiverRows":
        """Rows for `n` lanes from `alloc(n, dtype)` (an allocator of 1-D tensors)."""
        return ReceiverRows(alloc(n, index_dtype), alloc(n, dtype), alloc(n, torch.bool), alloc(n, torch.bool),
                            alloc(n, torch.bool))


def _claims(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [R]: the first valid lane of each listed column (lane order)."""
    lanes = torch.arange(idx.numel(), device=idx.device)
    key = torch.where(valid, idx, -1 - lanes)  # invalid lanes: distinct keys, below every position
    sorted_key, order = key.sort(stable=True)
    first = torch.ones_like(valid)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return torch.zeros_like(valid).scatter(0, order, first) & valid


def listed_step_torch(cols: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                      current: torch.Tensor, counts: torch.Tensor, st, sync: torch.Tensor, theta: torch.Tensor,
                      source_f: torch.Tensor, is_source: torch.Tensor, is_hidden: torch.Tensor,
                      out_lo: int, out_hi: int, seed: int, t: int, step: int, p_ref: float,
                      book=None, out_fired: torch.Tensor | None = None, record: ReceiverRows | None = None, *,
                      refractory: bool, barrier: bool, policy_ms: bool) -> None:
    """Evaluate one step's receivers in place, after its deliveries (SPEC 5.4; the
    listed conv steps of `receivers.ListedReceivers`).

    Args:
        cols: int64 ``[B, K]`` the step's delivered columns (fillers as their columns,
            dropped entries as the dump): their targets are the receivers.
        source_slot, layers: as in `image_deliver_torch`.
        current, counts: ``[B, W]`` the step's deliveries (`image_deliver_torch`;
            counts int32, fillers' as `FILLER_COUNT`); zeroed at the receivers.
        st: the state (``v``, ``o``, ``acc`` [B, n_out], ``refr`` bool, ``n_in`` int32),
            updated in place at the receivers.
        sync, theta, source_f, is_source, is_hidden: ``[W]`` per-column tables.
        out_lo, out_hi: the output columns.
        seed, t, step, p_ref: refractory dropout (the `rng.STREAM_REFRACTORY_DROPOUT`
            uniform at (sample, column), as the whole-state evaluation draws it).
        book: the pass's bookkeeping (`step_spec.PassTensors`: pending, pre_spike,
            spike_sum, fillable, hist; updated in place), or None (a replay).
        out_fired: bool ``[B]`` (zero), set where an output neuron fired; with `book`.
        record: rows to write the backward record into (`ReceiverRows`), or None.
        refractory, barrier, policy_ms: the knobs.

    Each received column is evaluated once (`_claims`: at the first lane listing it;
    the kernel: at the lane that takes its count). The same operations as the
    whole-state evaluation (`lif_torch`), so the same numbers."""
    w = layers.width
    idx, valid = receiver_list(cols, source_slot, layers)
    claimed = _claims(idx, valid)
    idx = torch.where(claimed, idx, idx - idx % w + w - 1)  # the others: their sample's dump
    col = idx % w
    packed = counts.view(-1)[idx]
    n_add = packed & _REAL_COUNT_MASK
    cur = current.view(-1)[idx]
    current.view(-1).index_fill_(0, idx, 0.0)  # zero again where the step wrote
    counts.view(-1).index_fill_(0, idx, 0)
    v0, o0, n_before, refr = (x.view(-1)[idx] for x in (st.v, st.o, st.n_in, st.refr))
    n_in = torch.where(claimed, n_before + n_add, n_before)
    gate = claimed & (n_in >= sync[col])
    v, spikes, v_pre = lif_torch(v0, cur, refr, claimed, gate, theta[col])
    fired = spikes > 0
    is_out = (col >= out_lo) & (col < out_hi)
    n_acc = st.acc.numel()
    acc = torch.cat([st.acc.reshape(-1), st.acc.new_zeros(1)])  # the last: a scratch slot
    acc_at = torch.where(fired & is_out, (idx // w) * (out_hi - out_lo) + col - out_lo, n_acc)
    acc_new = acc[acc_at] + spikes
    st.v.view(-1)[idx] = v
    st.n_in.view(-1)[idx] = n_in
    st.o.view(-1)[idx] = o0 + spikes * source_f[col]
    acc[acc_at] = acc_new
    st.acc.copy_(acc[:n_acc].view_as(st.acc))
    refr_after = refr
    if refractory:
        now = fired
        if p_ref > 0:
            u = rng.uniform_at(seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, idx // w, col)
            now = now & (u >= p_ref)
        refr_after = refr | now
        st.refr.view(-1)[idx] = refr_after
    if book is not None:
        src = is_source[col]
        new = fired & src
        if barrier:
            new = new | ((n_before < sync[col]) & (n_in >= sync[col]) & src)
        book.pending.view(-1)[idx] = book.pending.view(-1)[idx] | new
        if book.fillable is not None:
            book.fillable.view(-1)[idx] = book.fillable.view(-1)[idx] | (gate & ~refr & is_hidden[col])
        if policy_ms:
            book.pre_spike.view(-1)[idx] = torch.where(fired, v_pre, book.pre_spike.view(-1)[idx])
        book.spike_sum.view(-1)[idx] = book.spike_sum.view(-1)[idx] + spikes
        per_sample = torch.zeros(out_fired.shape, dtype=torch.int32, device=idx.device)
        out_fired |= per_sample.index_add_(0, idx // w, (fired & is_out).to(torch.int32)) > 0
        if book.hist is not None:
            bins = book.hist.numel()
            book.hist.scatter_add_(0, n_in.clamp(max=bins - 1).long(), (fired & claimed).long())
    if record is not None:
        record.idx.copy_(idx)
        record.v_pre.copy_(torch.where(claimed, v_pre, 0.0))
        record.refr.copy_(refr & claimed)
        record.gate.copy_(gate)
        record.received.copy_(claimed)


# Constexprs: the tile and the knobs (fixed per call); no int argument specialised on.
@jit(do_not_specialize=("e", "k", "width", "n_maps", "list_width", "out_lo", "out_hi", "n_bins", "h_refr"))
def _listed_step_kernel(cols_ptr, slot_ptr, table_ptr, cur_ptr, cnt_ptr, v_ptr, o_ptr, nin_ptr, refr_ptr, acc_ptr,
                        sync_ptr, theta_ptr, srcf_ptr, is_src_ptr, hidden_ptr, pend_ptr, fillable_ptr, pre_ptr,
                        ssum_ptr, fired_ptr, hist_ptr, r_idx_ptr, r_vpre_ptr, r_refr_ptr, r_gate_ptr, r_recv_ptr,
                        e, k, width, n_maps, list_width, out_lo, out_hi, n_bins, h_refr, p_ref,
                        BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, REFRACTORY: tl.constexpr,
                        HAS_PREF: tl.constexpr, BARRIER: tl.constexpr, POLICY_MS: tl.constexpr,
                        FILL: tl.constexpr, BOOKKEEP: tl.constexpr, HISTOGRAM: tl.constexpr, RECORD: tl.constexpr):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live_e = es < e
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    j = tl.load(cols_ptr + es, mask=live_e, other=0)
    j = tl.where(live_e, j, width - 1)
    tgt, _widx, ok, _scale = _lane(j, fs, slot_ptr, table_ptr, n_maps)
    lanes = live_e[:, None] & (fs < list_width)[None, :]
    m = ok & lanes
    b = (es // k).to(tl.int64)[:, None]
    at = b * width + tgt
    # the claim: the lane that takes a column's count evaluates it (once per column)
    packed = tl.atomic_xchg(cnt_ptr + at, tl.zeros([BLOCK_E, BLOCK_F], tl.int32), mask=m, sem="relaxed")
    claimed = m & (packed > 0)
    n_add = packed & 0xFFFF
    cur = tl.load(cur_ptr + at, mask=claimed, other=0.0)
    tl.store(cur_ptr + at, tl.zeros_like(cur), mask=claimed)
    v0 = tl.load(v_ptr + at, mask=claimed, other=0.0)
    o0 = tl.load(o_ptr + at, mask=claimed, other=0.0)
    n_before = tl.load(nin_ptr + at, mask=claimed, other=0)
    refr0 = tl.load(refr_ptr + at, mask=claimed, other=0) != 0
    sync = tl.load(sync_ptr + tgt, mask=claimed, other=0)
    theta = tl.load(theta_ptr + tgt, mask=claimed, other=0.0)
    n_in = n_before + n_add
    gate = claimed & (n_in >= sync)
    v_pre = tl.where(refr0, 0.0, v0 + cur)
    s = (gate & (v_pre >= theta)).to(v0.dtype)
    fired = s > 0
    tl.store(v_ptr + at, v_pre - v_pre * s, mask=claimed)
    tl.store(nin_ptr + at, n_in, mask=claimed)
    tl.store(o_ptr + at, o0 + s * tl.load(srcf_ptr + tgt, mask=claimed, other=0.0), mask=claimed)
    is_out = (tgt >= out_lo) & (tgt < out_hi)
    out_at = b * (out_hi - out_lo) + (tgt - out_lo)
    at_out = claimed & fired & is_out
    tl.store(acc_ptr + out_at, tl.load(acc_ptr + out_at, mask=at_out, other=0.0) + s, mask=at_out)
    if REFRACTORY:
        now = fired
        if HAS_PREF:  # the whole-state evaluation's draw at (sample, column)
            u = _uniform_at_from_hash(h_refr.to(tl.uint32), b + tl.zeros_like(tgt), tgt)
            now = now & (u >= p_ref)
        tl.store(refr_ptr + at, (refr0 | now).to(tl.uint8), mask=claimed)
    if BOOKKEEP:
        src = tl.load(is_src_ptr + tgt, mask=claimed, other=0) != 0
        new = fired & src
        if BARRIER:
            new = new | ((n_before < sync) & (n_in >= sync) & src)
        pend = tl.load(pend_ptr + at, mask=claimed, other=0) != 0
        tl.store(pend_ptr + at, (pend | new).to(tl.uint8), mask=claimed)
        if FILL:
            hidden = tl.load(hidden_ptr + tgt, mask=claimed, other=0) != 0
            fillable = tl.load(fillable_ptr + at, mask=claimed, other=0) != 0
            tl.store(fillable_ptr + at, (fillable | (gate & ~refr0 & hidden)).to(tl.uint8), mask=claimed)
        if POLICY_MS:
            pre = tl.load(pre_ptr + at, mask=claimed, other=0.0)
            tl.store(pre_ptr + at, tl.where(fired, v_pre, pre), mask=claimed)
        tl.store(ssum_ptr + at, tl.load(ssum_ptr + at, mask=claimed, other=0.0) + s, mask=claimed)
        tl.store(fired_ptr + b + tl.zeros_like(tgt), tl.full([BLOCK_E, BLOCK_F], 1, tl.uint8), mask=at_out)
        if HISTOGRAM:
            tl.atomic_add(hist_ptr + tl.minimum(n_in, n_bins - 1), tl.full([BLOCK_E, BLOCK_F], 1, tl.int64),
                          mask=claimed & fired, sem="relaxed")
    if RECORD:
        r = es.to(tl.int64)[:, None] * list_width + fs[None, :]
        tl.store(r_idx_ptr + r, tl.where(claimed, at, b * width + width - 1), mask=lanes)
        tl.store(r_vpre_ptr + r, tl.where(claimed, v_pre, 0.0), mask=lanes)
        tl.store(r_refr_ptr + r, (refr0 & claimed).to(tl.uint8), mask=lanes)
        tl.store(r_gate_ptr + r, gate.to(tl.uint8), mask=lanes)
        tl.store(r_recv_ptr + r, claimed.to(tl.uint8), mask=lanes)


_LISTED_BLOCK_E, _LISTED_BLOCK_F = 1, 256


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def listed_step_triton(cols: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                       current: torch.Tensor, counts: torch.Tensor, st, sync: torch.Tensor, theta: torch.Tensor,
                       source_f: torch.Tensor, is_source: torch.Tensor, is_hidden: torch.Tensor,
                       out_lo: int, out_hi: int, seed: int, t: int, step: int, p_ref: float,
                       book=None, out_fired: torch.Tensor | None = None, record: ReceiverRows | None = None, *,
                       refractory: bool, barrier: bool, policy_ms: bool) -> None:
    """`listed_step_torch` in one launch (see the module doc and the twin): programs tile
    (entry, target block) lanes; a lane that reaches a column takes its packed count
    (atomic exchange with 0): the one lane that gets it nonzero evaluates the column,
    the others leave it. Arguments as the twin's."""
    op = "listed_step_triton"
    b, k = cols.shape
    w = layers.width
    tensors = dict(cols=cols, current=current, counts=counts, v=st.v, o=st.o, n_in=st.n_in, refr=st.refr,
                   acc=st.acc, sync=sync, theta=theta, source_f=source_f)
    check_tensors(op, _listed_step_kernel, table=layers.table, **tensors)
    check_shape(op, "cols", cols, (None, None))
    check_dtype(op, "cols", cols, (torch.int64,))
    dtype = st.v.dtype
    check_dtype(op, "v", st.v, _FLOATS)
    for name in ("current", "v", "o", "n_in", "refr"):
        check_shape(op, name, tensors[name], (b, w))
    for name in ("current", "o", "theta", "source_f"):
        check_dtype(op, name, tensors[name], (dtype,))
    check_dtype(op, "counts", counts, (torch.int32,))
    check_dtype(op, "n_in", st.n_in, (torch.int32,))
    check_dtype(op, "sync", sync, (torch.int32,))
    check_shape(op, "acc", st.acc, (b, out_hi - out_lo))
    for name, x in tensors.items():
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} is read and written in place and must be contiguous")
    if book is not None and out_fired is None:
        raise ValueError(f"{op}: the pass's bookkeeping (book) needs out_fired")
    if b * k == 0:
        return
    fill = book is not None and book.fillable is not None
    hist = book.hist if book is not None else None
    any_ = st.refr  # a tensor never read where a flag is off
    bk = (book.pending, book.fillable if fill else any_, book.pre_spike, book.spike_sum) if book is not None \
        else (any_, any_, st.v, st.v)
    rec = (record.idx, record.v_pre, record.refr, record.gate, record.received) if record is not None else None
    grid = (triton.cdiv(b * k, _LISTED_BLOCK_E), triton.cdiv(layers.list_width, _LISTED_BLOCK_F))
    _listed_step_kernel[grid](
        cols.contiguous(), source_slot, layers.table, current, counts, st.v, st.o, st.n_in, _u8(st.refr), st.acc,
        sync, theta, source_f, _u8(is_source), _u8(is_hidden), *map(_u8, bk),
        _u8(out_fired) if out_fired is not None else _u8(any_), hist if hist is not None else st.n_in,
        *(map(_u8, rec) if rec is not None else (any_,) * 5),
        b * k, k, w, layers.n_maps, layers.list_width, out_lo, out_hi, 0 if hist is None else hist.numel(),
        hash_arg(rng.counter_hash(seed, rng.STREAM_REFRACTORY_DROPOUT, t, step)), float(p_ref),
        BLOCK_E=_LISTED_BLOCK_E, BLOCK_F=_LISTED_BLOCK_F, REFRACTORY=bool(refractory), HAS_PREF=p_ref > 0,
        BARRIER=bool(barrier), POLICY_MS=bool(policy_ms), FILL=fill, BOOKKEEP=book is not None,
        HISTOGRAM=hist is not None, RECORD=record is not None, enable_fp_fusion=False)


# --- the reverse of a step ------------------------------------------------------------------


def listed_backward_torch(rows: ReceiverRows, adj_v: torch.Tensor, adj_o: torch.Tensor, adj_acc: torch.Tensor,
                          armed: torch.Tensor | None, g_current: torch.Tensor, theta: torch.Tensor,
                          source_f: torch.Tensor, out_lo: int, out_hi: int, alpha: float, detach_reset: bool) -> None:
    """The reverse of a listed step's evaluation (`listed_step_torch`) at its record's
    received lanes (`ReceiverRows`), in place: the spikes' adjoint (outboxes of sources,
    the output accumulator), the LIF backward (`lif_backward_torch`), the membranes'
    adjoint `adj_v` and the current's gradient written into the zero buffer `g_current`
    (both ``[B, W]``, contiguous) at the receivers, and `armed` (bool ``[B, W]``,
    `SimConfig.surrogate_at="fire_or_last"`, else None) cleared there. The other lanes
    (their sample's dump column) change nothing."""
    w = adj_v.shape[1]
    idx = rows.idx.long()
    col = idx % w
    g_s = adj_o.reshape(-1)[idx] * source_f[col]
    at_out = (col >= out_lo) & (col < out_hi)
    acc_at = (idx // w) * (out_hi - out_lo) + col - out_lo
    g_s = torch.where(at_out, g_s + adj_acc.reshape(-1)[torch.where(at_out, acc_at, 0)], g_s)
    last = None if armed is None else armed.view(-1)[idx]
    gv, gi = lif_backward_torch(adj_v.reshape(-1)[idx], g_s, rows.v_pre, rows.refr, rows.received, rows.gate,
                                theta[col], alpha, detach_reset, last)
    if armed is not None:  # an evaluation met: the earlier ones are not the last
        armed.view(-1)[idx] = last & ~rows.received
    adj_v.view(-1)[idx] = gv
    g_current.view(-1)[idx] = gi


# Constexprs: the tile and the knobs; no int argument specialised on.
@jit(do_not_specialize=("n", "width", "out_lo", "out_hi"))
def _listed_backward_kernel(idx_ptr, recv_ptr, vpre_ptr, refr_ptr, gate_ptr, gv_ptr, go_ptr, gacc_ptr, armed_ptr,
                            gcur_ptr, theta_ptr, srcf_ptr, const_ptr, n, width, out_lo, out_hi,
                            BLOCK: tl.constexpr, DETACH_RESET: tl.constexpr, ARMED: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = r < n
    recv = (tl.load(recv_ptr + r, mask=live, other=0) != 0) & live
    at = tl.load(idx_ptr + r, mask=recv, other=0).to(tl.int64)
    col = at % width
    b = at // width
    gvn = tl.load(gv_ptr + at, mask=recv, other=0.0)
    g_s = tl.load(go_ptr + at, mask=recv, other=0.0) * tl.load(srcf_ptr + col, mask=recv, other=0.0)
    at_out = recv & (col >= out_lo) & (col < out_hi)
    g_s = tl.where(at_out, g_s + tl.load(gacc_ptr + b * (out_hi - out_lo) + col - out_lo, mask=at_out, other=0.0),
                   g_s)
    v_pre = tl.load(vpre_ptr + r, mask=recv, other=0.0)
    refr = tl.load(refr_ptr + r, mask=recv, other=0) != 0
    gate = tl.load(gate_ptr + r, mask=recv, other=0) != 0
    theta = tl.load(theta_ptr + col, mask=recv, other=0.0)
    last = gate  # (not read without ARMED)
    if ARMED:
        last = tl.load(armed_ptr + at, mask=recv, other=0) != 0
    # the twin's (alpha / 2) / den: torch takes 1 / den, then the product (RECIP_FIRST)
    g_pre = _lif_grad(gvn, g_s, v_pre, gate, theta, last, const_ptr, DETACH_RESET, True, ARMED, True)
    g_pre = tl.where(~refr, g_pre, 0.0)  # received lanes only
    if ARMED:
        tl.store(armed_ptr + at, tl.zeros_like(refr).to(tl.uint8), mask=recv)
    tl.store(gv_ptr + at, g_pre, mask=recv)
    tl.store(gcur_ptr + at, g_pre, mask=recv)


_BACKWARD_BLOCK = 1024


def listed_backward_triton(rows: ReceiverRows, adj_v: torch.Tensor, adj_o: torch.Tensor, adj_acc: torch.Tensor,
                           armed: torch.Tensor | None, g_current: torch.Tensor, theta: torch.Tensor,
                           source_f: torch.Tensor, out_lo: int, out_hi: int, alpha: float, detach_reset: bool) -> None:
    """`listed_backward_torch` in one launch over the record's lanes (each received
    column at one lane: no two lanes write one column). The same operations in the
    same order as the twin (the surrogate as torch evaluates it: 1 / den, then the
    product; no FMA contraction), so the same numbers. Arguments as the twin's."""
    op = "listed_backward_triton"
    check_tensors(op, _listed_backward_kernel, idx=rows.idx, adj_v=adj_v, adj_o=adj_o, adj_acc=adj_acc,
                  g_current=g_current, theta=theta)
    b, w = adj_v.shape
    for name, x in (("adj_v", adj_v), ("adj_o", adj_o), ("g_current", g_current)):
        check_shape(op, name, x, (b, w))
        check_dtype(op, name, x, (rows.v_pre.dtype,))
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    check_shape(op, "adj_acc", adj_acc, (b, out_hi - out_lo))
    n = rows.idx.numel()
    if n == 0:
        return
    const = surrogate_constants(alpha, adj_v.dtype, adj_v.device)
    _listed_backward_kernel[(triton.cdiv(n, _BACKWARD_BLOCK),)](
        rows.idx, _u8(rows.received), rows.v_pre, _u8(rows.refr), _u8(rows.gate), adj_v, adj_o,
        adj_acc.contiguous(), _u8(armed) if armed is not None else _u8(rows.refr), g_current, theta, source_f, const,
        n, w, out_lo, out_hi, BLOCK=_BACKWARD_BLOCK, DETACH_RESET=bool(detach_reset), ARMED=armed is not None,
        enable_fp_fusion=False)
