"""The replay and backward kernels of the fused Triton steps (kernels/steps_triton.py):
`_replay_kernel` runs a recorded step again on the bound state and writes the
record its reverse needs; `_backward_kernel` runs that reverse on the adjoints in
place (the weight-table gradient by float atomics across samples)."""

from __future__ import annotations

from ._triton import jit, tl
from .steps_eval import _dec, _evaluate, _slot_counts


# Specialised on: W, K, F, n_slots, out_lo, out_hi (fixed for an engine). Not
# specialised on: the per-step hash h_ref (i64, `hash_arg`) and the alignment of the
# step's selection rows sel / sd (rows of a [n, B, K] int32 record: 16-byte aligned
# or not by step when B x K is not a multiple of 4).
@jit(do_not_specialize=("h_ref", "sel_ptr", "sd_ptr"))
def _replay_kernel(source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr, sync_ptr, theta_ptr, wt_ptr,
                   v_ptr, o_ptr, acc_ptr, refr_ptr, n_in_ptr, sel_ptr, sd_ptr, vals_ptr,
                   vpre_ptr, refrb_ptr, recv_ptr, gate_ptr,
                   W, K, F, n_slots, out_lo, out_hi, h_ref, p_ref,
                   REFRACTORY: tl.constexpr, HAS_PREF: tl.constexpr, BLOCK: tl.constexpr,
                   KB: tl.constexpr, NS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, KB)
    kmask = jj < K
    row = b * W
    sel = tl.load(sel_ptr + b * K + jj, mask=kmask, other=0)
    sd = tl.load(sd_ptr + b * K + jj, mask=kmask, other=0)
    vals = tl.load(o_ptr + row + _dec(sd), mask=kmask, other=0.0)
    tl.store(vals_ptr + b * K + jj, vals, mask=kmask)
    cnt = _slot_counts(_dec(sd), kmask, source_slot_ptr, NS)
    counted = _slot_counts(sd, kmask & (sd >= 0), source_slot_ptr, NS)
    for start in range(0, W, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(recv_ptr + row + cols, tl.zeros([BLOCK], tl.uint8), mask=cols < W)
        tl.store(gate_ptr + row + cols, tl.zeros([BLOCK], tl.uint8), mask=cols < W)
    tl.debug_barrier()
    tl.store(o_ptr + row + _dec(sel), tl.zeros([KB], vals.dtype), mask=kmask)
    tl.debug_barrier()
    _evaluate(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr,
              is_source_ptr, sync_ptr, theta_ptr, wt_ptr, v_ptr + row, o_ptr + row,
              acc_ptr + b * (out_hi - out_lo), refr_ptr + row, n_in_ptr + row,
              refr_ptr, vpre_ptr, vpre_ptr,  # no bookkeeping
              vpre_ptr + row, refrb_ptr + row, recv_ptr + row, gate_ptr + row,
              sd_ptr + b * K, vals_ptr + b * K, cnt, counted, refrb_ptr, h_ref.to(tl.uint32), p_ref,
              REFRACTORY, HAS_PREF, False, False, False, True, False, BLOCK, NS)


# Every int argument (W, K, F, n_slots, out_lo, out_hi) is fixed for an engine: one
# compile per dtype, K and network. Not specialised on: the alignment of the step's
# selection rows sel / sd (as in `_replay_kernel`).
@jit(do_not_specialize=("sel_ptr", "sd_ptr"))
def _backward_kernel(source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr, theta_ptr, wt_ptr,
                     const_ptr, sel_ptr, sd_ptr, vals_ptr, vpre_ptr, refrb_ptr, recv_ptr, gate_ptr,
                     gv_ptr, go_ptr, gacc_ptr, gwt_ptr, armed_ptr,
                     W, K, F, n_slots, out_lo, out_hi,
                     DETACH_RESET: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
                     NS: tl.constexpr, ARMED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, KB)
    kmask = jj < K
    row = b * W
    n_out = out_hi - out_lo
    # fillers (-1 - column) as their columns; sel and sd are read again at the end
    cnt = _slot_counts(_dec(tl.load(sd_ptr + b * K + jj, mask=kmask, other=0)), kmask, source_slot_ptr, NS)
    ns = tl.arange(0, NS)
    half_alpha = tl.load(const_ptr)
    scale = tl.load(const_ptr + 1)
    gvals = tl.zeros([KB], half_alpha.dtype)
    for l in range(n_slots):
        if tl.sum(tl.where(ns == l, cnt, 0)) > 0:
            lo = tl.load(slot_lo_ptr + l).to(tl.int32)  # int32 loop bounds: an int64 trip
            hi = tl.load(slot_hi_ptr + l).to(tl.int32)  # count costs a division call (stack)
            for start in range(lo, hi, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                rc = (tl.load(recv_ptr + row + cols, mask=cols < hi, other=0) != 0) & (cols < hi)
                src = tl.load(is_source_ptr + cols, mask=rc, other=0) != 0
                gs = tl.load(go_ptr + row + cols, mask=rc, other=0.0) * src.to(half_alpha.dtype)
                out = rc & (cols >= out_lo) & (cols < out_hi)
                gs = tl.where(out, gs + tl.load(gacc_ptr + b * n_out + (cols - out_lo), mask=out, other=0.0),
                              gs)
                vp = tl.load(vpre_ptr + row + cols, mask=rc, other=0.0)
                th = tl.load(theta_ptr + cols, mask=rc, other=0.0)
                gt = tl.load(gate_ptr + row + cols, mask=rc, other=0) != 0
                s = (gt & (vp >= th)).to(vp.dtype)
                y = scale * (vp - th)
                den = 1 + y * y
                # fp32 `/` is div.full on the GPU (<= 2 ulp from the C's IEEE division):
                # div_rn's slow path is a call whose saved registers need a stack frame
                dsdv = tl.where(gt, (1 / den) * half_alpha, 0.0)
                if ARMED:  # surrogate_at="fire_or_last": fired, or its window's last evaluation
                    last = tl.load(armed_ptr + row + cols, mask=rc, other=0).to(vp.dtype)
                    dsdv = dsdv * tl.maximum(s, last)  # exact: x * 1 or x * 0
                    tl.store(armed_ptr + row + cols, tl.zeros([BLOCK], tl.uint8), mask=rc)
                gvn = tl.load(gv_ptr + row + cols, mask=rc, other=0.0)
                gp = gvn * (1 - s)
                if not DETACH_RESET:
                    gp = gp - gvn * vp * dsdv
                gp = gp + gs * dsdv
                rf = tl.load(refrb_ptr + row + cols, mask=rc, other=0) != 0
                gp = tl.where(rf | ~rc, 0.0, gp)
                tl.store(gv_ptr + row + cols, gp, mask=rc)
                for j in range(K):
                    s_j = _dec(tl.load(sd_ptr + b * K + j).to(tl.int64))
                    if tl.load(source_slot_ptr + s_j) == l:
                        w = tl.load(wt_ptr + s_j * F + (cols - lo), mask=cols < hi, other=0.0)
                        gvals += tl.where(jj == j, tl.sum(gp * w), 0.0)
                        x = tl.load(vals_ptr + b * K + j)
                        tl.atomic_add(gwt_ptr + s_j * F + (cols - lo), gp * x, mask=cols < hi, sem="relaxed")
    tl.debug_barrier()
    sel = _dec(tl.load(sel_ptr + b * K + jj, mask=kmask, other=0))
    tl.store(go_ptr + row + sel, tl.zeros([KB], gvals.dtype), mask=kmask)
    tl.debug_barrier()
    sd = _dec(tl.load(sd_ptr + b * K + jj, mask=kmask, other=0))
    g = tl.load(go_ptr + row + sd, mask=kmask, other=0.0)
    tl.store(go_ptr + row + sd, g + gvals, mask=kmask)
    if ARMED:  # the emptied outboxes' windows end at this step
        tl.store(armed_ptr + row + sel, tl.full([KB], 1, tl.uint8), mask=kmask)
