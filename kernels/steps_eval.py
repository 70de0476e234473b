"""Device helpers of the fused Triton steps (kernels/steps_triton.py), shared by the
forward kernel (kernels/steps_forward.py) and the replay and backward kernels
(kernels/steps_backward.py): the per-step counter hash, the decoding of recorded
slots (fillers), the slots per source layer, and `_evaluate` (one step's delivery and
evaluation of the receivers, the C's `evaluate`)."""

from __future__ import annotations

from . import step_spec
from ._triton import jit, tl
from .rng_triton import _fmix32, _uniform_at_from_hash

# the replay's record flags, one byte per column (`step_spec.FusedRecord`)
REFR_BEFORE = tl.constexpr(step_spec.REFR_BEFORE) if tl is not None else None
RECEIVED = tl.constexpr(step_spec.RECEIVED) if tl is not None else None
GATE = tl.constexpr(step_spec.GATE) if tl is not None else None


@jit
def _step_hash(h_t, k):
    """`rng.counter_hash` from its value after (seed, stream, timestep) mixed on the
    host: the last round, with the forward step `k`."""
    return _fmix32(h_t.to(tl.uint32) ^ (k.to(tl.uint32) * 0x9E3779B9))


@jit
def _dec(sel):
    """Recorded slots -> columns (fill_slots records a filler as -1 - column)."""
    return tl.where(sel < 0, -1 - sel, sel)


@jit
def _evaluate(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr,
              is_source_ptr, sync_ptr, theta_ptr, wt_ptr, v_row, o_row, acc_row, refr_row, n_in_row,
              pend_row, pre_row, ssum_row, vpre_row, flags_row,
              sd_row, vals_row, cnt, counted, fill_row, h_ref, p_ref,
              REFRACTORY: tl.constexpr, HAS_PREF: tl.constexpr, BARRIER: tl.constexpr,
              POLICY_MS: tl.constexpr, BK: tl.constexpr, RECORD: tl.constexpr, FILL: tl.constexpr,
              BLOCK: tl.constexpr, NS: tl.constexpr):
    """Deliver the K slots (`sd_row`, `vals_row`, already in global memory) and
    evaluate the receivers (the C's `evaluate`): per receiving layer and column
    block, the current is summed in registers over the slots of that layer in slot
    order, then LIF, refractoriness, outboxes, acc, and (BK) pending flags, barrier
    messages, pre-spike potentials, spike sums; (RECORD) the sweep's record (v_pre and the flags);
    (BK and FILL) the fill candidates. `cnt`: delivered slots per source layer (which
    layers receive), `counted`: those that count (fillers do not: n_in).
    Returns 1 if an output neuron fired."""
    ns = tl.arange(0, NS)
    out_any = tl.zeros((), tl.int32)
    for l in range(n_slots):
        nadd = tl.sum(tl.where(ns == l, counted, 0))
        if tl.sum(tl.where(ns == l, cnt, 0)) > 0:
            lo = tl.load(slot_lo_ptr + l).to(tl.int32)  # int32 loop bounds: an int64 trip
            hi = tl.load(slot_hi_ptr + l).to(tl.int32)  # count costs a division call (stack)
            for start in range(lo, hi, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                inside = cols < hi
                cur = tl.zeros([BLOCK], wt_ptr.dtype.element_ty)
                for j in range(K):
                    s = tl.load(sd_row + j).to(tl.int64)
                    s = tl.where(s < 0, -1 - s, s)  # a filler's column
                    if tl.load(source_slot_ptr + s) == l:
                        x = tl.load(vals_row + j)
                        w = tl.load(wt_ptr + s * F + (cols - lo), mask=inside, other=0.0)
                        cur = cur + w * x
                nb = tl.load(n_in_row + cols, mask=inside, other=0)
                ni = nb + nadd
                tl.store(n_in_row + cols, ni, mask=inside)
                sync = tl.load(sync_ptr + cols, mask=inside, other=1)
                g = ni >= sync
                rf = tl.load(refr_row + cols, mask=inside, other=0) != 0
                v = tl.load(v_row + cols, mask=inside, other=0.0)
                vp = tl.where(rf, 0.0, v + cur)
                th = tl.load(theta_ptr + cols, mask=inside, other=0.0)
                fired = g & (vp >= th)
                sf = fired.to(vp.dtype)
                tl.store(v_row + cols, vp - vp * sf, mask=inside)
                src = tl.load(is_source_ptr + cols, mask=inside, other=0) != 0
                o = tl.load(o_row + cols, mask=inside, other=0.0)
                tl.store(o_row + cols, o + sf * src.to(vp.dtype), mask=inside)
                out = inside & (cols >= out_lo) & (cols < out_hi)
                a = tl.load(acc_row + (cols - out_lo), mask=out, other=0.0)
                tl.store(acc_row + (cols - out_lo), a + sf, mask=out)
                if REFRACTORY:
                    stays = fired
                    if HAS_PREF:
                        stays = stays & (_uniform_at_from_hash(h_ref, b, cols) >= p_ref)
                    tl.store(refr_row + cols, tl.full([BLOCK], 1, tl.uint8), mask=inside & stays)
                if RECORD:
                    tl.store(vpre_row + cols, vp, mask=inside)
                    flags = rf.to(tl.uint8) * REFR_BEFORE + RECEIVED + g.to(tl.uint8) * GATE
                    tl.store(flags_row + cols, flags, mask=inside)
                if BK:
                    newp = fired
                    if BARRIER:
                        newp = newp | ((nb < sync) & (ni >= sync))
                    tl.store(pend_row + cols, tl.full([BLOCK], 1, tl.uint8), mask=inside & src & newp)
                    if POLICY_MS:
                        tl.store(pre_row + cols, vp, mask=inside & fired)
                    ss = tl.load(ssum_row + cols, mask=inside, other=0.0)
                    tl.store(ssum_row + cols, ss + sf, mask=inside)
                    if FILL:  # the outbox holds surrogate gradient: synced, not clamped
                        tl.store(fill_row + cols, tl.full([BLOCK], 1, tl.uint8), mask=inside & g & ~rf & src)
                    out_any = tl.maximum(out_any, tl.max((fired & out).to(tl.int32)))
    return out_any


@jit
def _slot_counts(sd, kmask, source_slot_ptr, NS: tl.constexpr):
    """int32 [NS]: slots per source layer (the dump's included) of the columns `sd`
    where `kmask`."""
    slot = tl.load(source_slot_ptr + sd.to(tl.int64), mask=kmask, other=-1)
    ns = tl.arange(0, NS)
    return tl.sum((slot[:, None] == ns[None, :]).to(tl.int32), axis=0)
