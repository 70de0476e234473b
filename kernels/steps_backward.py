"""The persistent replay and backward kernels of the fused Triton steps
(kernels/steps_triton.py): a run of n consecutive recorded steps per launch.

`_replay_kernel` runs steps step0 .. step0 + n - 1 again on the bound state from
their recorded selections (one program per sample, the steps in a loop), writing
each step's record: the delivered values [n, B, K], the pre-spike potentials
[n, B, W] and one flag byte per column [n, B, W] (refractory before, received, gate:
`step_spec.FusedRecord`). `_backward_kernel` runs the n steps' reverse, last first,
on the adjoints in place (`_backward_step`; the weight-table gradient by float
atomics across samples). A checkpoint segment's run of event steps thus costs two
launches, where it cost two per step (a replay and a backward kernel per step, each
with its host call).
"""

from __future__ import annotations

from ._triton import jit, tl
from .steps_eval import GATE, RECEIVED, REFR_BEFORE, _dec, _evaluate, _slot_counts, _step_hash


# Specialised on: W, K, F, n_slots, out_lo, out_hi (fixed for an engine). Not
# specialised on: B, the run's first step and length, the timestep's hash (i64,
# `hash_arg`) and the alignment of the selections sel / sd (a single step's rows of a
# [n, B, K] int32 record: 16-byte aligned or not by step when B x K is not a
# multiple of 4).
@jit(do_not_specialize=("B", "step0", "n", "h_ref_t", "sel_ptr", "sd_ptr"))
def _replay_kernel(source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr, sync_ptr, theta_ptr, wt_ptr,
                   v_ptr, o_ptr, acc_ptr, refr_ptr, n_in_ptr, sel_ptr, sd_ptr, vals_ptr, vpre_ptr, flags_ptr,
                   B, W, K, F, n_slots, out_lo, out_hi, step0, n, h_ref_t, p_ref,
                   REFRACTORY: tl.constexpr, HAS_PREF: tl.constexpr, BLOCK: tl.constexpr,
                   KB: tl.constexpr, NS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    jj = tl.arange(0, KB)
    kmask = jj < K
    row = b * W
    for i in range(n):
        at = (i * B + b) * K
        rec = (i * B + b) * W
        sel = tl.load(sel_ptr + at + jj, mask=kmask, other=0)
        sd = tl.load(sd_ptr + at + jj, mask=kmask, other=0)
        vals = tl.load(o_ptr + row + _dec(sd), mask=kmask, other=0.0)
        tl.store(vals_ptr + at + jj, vals, mask=kmask)
        cnt = _slot_counts(_dec(sd), kmask, source_slot_ptr, NS)
        counted = _slot_counts(sd, kmask & (sd >= 0), source_slot_ptr, NS)
        for start in range(0, W, BLOCK):  # the flags are defined everywhere: 0 off the receivers
            cols = start + tl.arange(0, BLOCK)
            tl.store(flags_ptr + rec + cols, tl.zeros([BLOCK], tl.uint8), mask=cols < W)
        tl.debug_barrier()
        tl.store(o_ptr + row + _dec(sel), tl.zeros([KB], vals.dtype), mask=kmask)
        tl.debug_barrier()
        _evaluate(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr,
                  is_source_ptr, sync_ptr, theta_ptr, wt_ptr, v_ptr + row, o_ptr + row,
                  acc_ptr + b * (out_hi - out_lo), refr_ptr + row, n_in_ptr + row,
                  refr_ptr, vpre_ptr, vpre_ptr,  # no bookkeeping
                  vpre_ptr + rec, flags_ptr + rec,
                  sd_ptr + at, vals_ptr + at, cnt, counted, flags_ptr, _step_hash(h_ref_t, step0 + i), p_ref,
                  REFRACTORY, HAS_PREF, False, False, False, True, False, BLOCK, NS)
        tl.debug_barrier()  # the next step reads this one's potentials and outboxes


@jit
def _backward_step(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr,
                   theta_ptr, wt_ptr, half_alpha, scale, sel_row, sd_row, vals_row, vpre_row, flags_row, gv_row,
                   go_row, gacc_row, gwt_ptr, armed_row, DETACH_RESET: tl.constexpr, BLOCK: tl.constexpr,
                   KB: tl.constexpr, NS: tl.constexpr, ARMED: tl.constexpr):
    """The reverse of one step of sample `b` (the C's `at_backward_step`), its rows
    of the record, the selections and the adjoints given."""
    jj = tl.arange(0, KB)
    kmask = jj < K
    # fillers (-1 - column) as their columns; sel and sd are read again at the end
    cnt = _slot_counts(_dec(tl.load(sd_row + jj, mask=kmask, other=0)), kmask, source_slot_ptr, NS)
    ns = tl.arange(0, NS)
    gvals = tl.zeros([KB], half_alpha.dtype)
    for l in range(n_slots):
        if tl.sum(tl.where(ns == l, cnt, 0)) > 0:
            lo = tl.load(slot_lo_ptr + l).to(tl.int32)  # int32 loop bounds: an int64 trip
            hi = tl.load(slot_hi_ptr + l).to(tl.int32)  # count costs a division call (stack)
            for start in range(lo, hi, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                fl = tl.load(flags_row + cols, mask=cols < hi, other=0)
                rc = ((fl & RECEIVED) != 0) & (cols < hi)
                src = tl.load(is_source_ptr + cols, mask=rc, other=0) != 0
                gs = tl.load(go_row + cols, mask=rc, other=0.0) * src.to(half_alpha.dtype)
                out = rc & (cols >= out_lo) & (cols < out_hi)
                gs = tl.where(out, gs + tl.load(gacc_row + (cols - out_lo), mask=out, other=0.0), gs)
                vp = tl.load(vpre_row + cols, mask=rc, other=0.0)
                th = tl.load(theta_ptr + cols, mask=rc, other=0.0)
                gt = ((fl & GATE) != 0) & rc
                s = (gt & (vp >= th)).to(vp.dtype)
                y = scale * (vp - th)
                den = 1 + y * y
                # fp32 `/` is div.full on the GPU (<= 2 ulp from the C's IEEE division):
                # div_rn's slow path is a call whose saved registers need a stack frame
                dsdv = tl.where(gt, (1 / den) * half_alpha, 0.0)
                if ARMED:  # surrogate_at="fire_or_last": fired, or its window's last evaluation
                    last = tl.load(armed_row + cols, mask=rc, other=0).to(vp.dtype)
                    dsdv = dsdv * tl.maximum(s, last)  # exact: x * 1 or x * 0
                    tl.store(armed_row + cols, tl.zeros([BLOCK], tl.uint8), mask=rc)
                gvn = tl.load(gv_row + cols, mask=rc, other=0.0)
                gp = gvn * (1 - s)
                if not DETACH_RESET:
                    gp = gp - gvn * vp * dsdv
                gp = gp + gs * dsdv
                rf = ((fl & REFR_BEFORE) != 0) & rc
                gp = tl.where(rf | ~rc, 0.0, gp)
                tl.store(gv_row + cols, gp, mask=rc)
                for j in range(K):
                    s_j = _dec(tl.load(sd_row + j).to(tl.int64))
                    if tl.load(source_slot_ptr + s_j) == l:
                        w = tl.load(wt_ptr + s_j * F + (cols - lo), mask=cols < hi, other=0.0)
                        gvals += tl.where(jj == j, tl.sum(gp * w), 0.0)
                        x = tl.load(vals_row + j)
                        tl.atomic_add(gwt_ptr + s_j * F + (cols - lo), gp * x, mask=cols < hi, sem="relaxed")
    tl.debug_barrier()
    sel = _dec(tl.load(sel_row + jj, mask=kmask, other=0))
    tl.store(go_row + sel, tl.zeros([KB], gvals.dtype), mask=kmask)
    tl.debug_barrier()
    sd = _dec(tl.load(sd_row + jj, mask=kmask, other=0))
    g = tl.load(go_row + sd, mask=kmask, other=0.0)
    tl.store(go_row + sd, g + gvals, mask=kmask)
    if ARMED:  # the emptied outboxes' windows end at this step
        tl.store(armed_row + sel, tl.full([KB], 1, tl.uint8), mask=kmask)


# Every int argument but B and n (W, K, F, n_slots, out_lo, out_hi) is fixed for an
# engine: one compile per dtype, K and network. Not specialised on: B, n and the
# alignment of the selections sel / sd (as in `_replay_kernel`).
@jit(do_not_specialize=("B", "n", "sel_ptr", "sd_ptr"))
def _backward_kernel(source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr, theta_ptr, wt_ptr,
                     const_ptr, sel_ptr, sd_ptr, vals_ptr, vpre_ptr, flags_ptr,
                     gv_ptr, go_ptr, gacc_ptr, gwt_ptr, armed_ptr,
                     B, W, K, F, n_slots, out_lo, out_hi, n,
                     DETACH_RESET: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
                     NS: tl.constexpr, ARMED: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = b * W
    half_alpha = tl.load(const_ptr)
    scale = tl.load(const_ptr + 1)
    for r in range(n):
        i = n - 1 - r  # last step first
        at = (i * B + b) * K
        rec = (i * B + b) * W
        _backward_step(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr,
                       is_source_ptr, theta_ptr, wt_ptr, half_alpha, scale, sel_ptr + at, sd_ptr + at,
                       vals_ptr + at, vpre_ptr + rec, flags_ptr + rec, gv_ptr + row, go_ptr + row,
                       gacc_ptr + b * (out_hi - out_lo), gwt_ptr, armed_ptr + row, DETACH_RESET, BLOCK, KB, NS,
                       ARMED)
        tl.debug_barrier()  # the next (earlier) step reads this one's adjoints
