"""Fused forward steps on the GPU (fully connected networks): the `fused` steps of
the `triton` backend, the Triton twin of `cpu_step.CpuSteps`.

Same interface as `CpuSteps` (`step_spec.FusedSteps`: `bind_weights`, `bind_state`,
`bind_pass`, `forward_batch`, `replay_step`, `backward_step`; records are
`step_spec.FusedRecord`; also `forward_step`, `forward_steps`) and the same
semantics as the C functions of `cpu_step.c`: the same counter hash, packed keys (SPEC 6: ties to the lower index),
slot order (highest key first) and float operations in the same order (launched
with ``enable_fp_fusion=False``: no FMA contraction, as the C is built with
``-ffp-contract=off``). Selections, spikes and potentials are therefore those of
the C steps, bit for bit in the interpreter (the backward's fp32 surrogate divides
with the GPU's ``div.full``, within 2 ulp of IEEE: gradients match to tolerance).

Design: one program per sample (grid ``(B,)``), state in global memory.
- `_forward_kernel` is persistent: it runs up to `n_max` forward steps of its own
  sample in one launch (select, network dropout, deliver, LIF, refractoriness,
  bookkeeping, stop condition), writing step i's rows of the [n_max, B, K]
  selection buffers; a sample that is done writes dump rows. The host reads one
  number per launch (the most steps any sample took), so a pass of S steps costs
  about S / n_max launches instead of ~10 kernels per step.
- Selection never sorts the row: the mapped keys of the pending entries go to a
  scratch row (`select._row_keys`, `select._fill_keys`: the key math of the per-op
  select kernel too), a radix search over their 32 bits finds the K-th largest (as
  kernels/select.py), one pass takes the entries above it plus the lowest-index
  ties, and only those K are sorted (`tl.sort`, K rounded up to a power of two).
- No atomics in the forward: a sample's currents reach only its own row, and the
  program owning the row adds the K fan-out rows one after the other (vectorised
  over the receiving columns, current kept in registers per column block), so the
  sums are in the C order and reproducible.
- The backward's weight-table gradient is shared by all samples: `atomic_add`,
  so the order of the additions across samples (hence the last bits of grad_wt)
  can change from run to run, as in kernels/deliver.py; within a sample the
  dot products are block reductions (another order than the C's sequential sums:
  gradients match to fp tolerance, not bitwise).

Phases of a step exchange data through global memory between threads of one
program (a selection written, then read as scalars; outboxes zeroed in the K
layout, then read in the row layout), separated by `tl.debug_barrier()`. The
interpreter runs a program sequentially, so it checks the arithmetic and the
control flow, not the barriers, the atomics' races or register pressure (the
compile-only test checks that sm_90 / sm_80 builds do not spill). Limits: K up to
`_K_MAX` (the sort holds next_pow2(K) keys in registers); float32 and float64.
Tests: tests/test_steps_triton.py.
"""

from __future__ import annotations

import torch

from . import rng
from ._triton import check_tensors, hash_arg, jit, tl, triton
from .cpu_step import _int32
from .lif import surrogate_constants
from .rng_triton import _fmix32, _uniform_at_from_hash
from .select import _fill_keys, _radix_threshold, _row_keys
from . import host
from .step_spec import FusedRecord, PassTensors, StepSpec, as_spec

_SUFFIX = (torch.float32, torch.float64)
_K_MAX = 4096
_SENTINEL = -(2**63 - 1)  # below every packed key: unused candidate slots


def _config(width: int, dtype: torch.dtype = torch.float32, forward: bool = True) -> dict:
    """Row block, radix digit and warps. Rows are streamed in blocks (the state of a
    whole network does not fit registers); the radix count compares a block with all
    2**DIGIT_BITS digits at once, kept at <= 8192 values: 512 x 16, or 32 x 256 for
    narrow rows (4 rounds instead of 8). Warps: the spill-free choices of ptxas
    (CUDA 13, sm_90 / sm_80; it puts 8-48 byte stack frames erratically elsewhere):
    forward 4 warps in fp32 (<= 168 registers), 8 in fp64; replay and backward 8."""
    block = min(512, max(32, triton.next_power_of_2(width)))
    warps = 4 if forward and dtype == torch.float32 else 8
    cfg = dict(BLOCK=block, num_warps=warps)
    if forward:
        cfg["DIGIT_BITS"] = 8 if block <= 32 else 4
    return cfg


# --- device helpers -----------------------------------------------------------------------
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
def _select_row(W, K, keys_row, cand_row, n_pending, BLOCK: tl.constexpr, KB: tl.constexpr,
                DIGIT_BITS: tl.constexpr):
    """int32 [KB]: the top-K columns by packed key, highest first, the dump after the
    last pending entry (at_forward_step's selection). Threshold T by radix search
    (count(u >= T) >= K), then the entries above T and the lowest-index ones equal
    to T go to `cand_row` as packed keys, and those K are sorted."""
    cols0 = tl.arange(0, BLOCK)
    prefix = _radix_threshold(keys_row, keys_row, tl.zeros((), tl.int64), W, K, n_pending, BLOCK, DIGIT_BITS,
                              False, True)
    n_above = 0
    for start in range(0, W, BLOCK):
        cols = start + cols0
        u = tl.load(keys_row + cols, mask=cols < W, other=-1)
        n_above += tl.sum((u > prefix).to(tl.int32))
    m = K - n_above
    n_sel = 0
    n_tied = 0
    for start in range(0, W, BLOCK):
        cols = start + cols0
        u = tl.load(keys_row + cols, mask=cols < W, other=-1)
        tied = (u == prefix).to(tl.int32)
        take = (u > prefix) | ((tied != 0) & (n_tied + tl.cumsum(tied, axis=0) <= m))
        pos = n_sel + tl.cumsum(take.to(tl.int32), axis=0) - 1
        packed = ((u - 2147483648) << 32) | (W - 1 - cols).to(tl.int64)
        tl.store(cand_row + pos, packed, mask=take)
        n_sel += tl.sum(take.to(tl.int32))
        n_tied += tl.sum(tied)
    jj = tl.arange(0, KB)
    tl.store(cand_row + jj, tl.full([KB], -9223372036854775807, tl.int64), mask=jj >= n_sel)
    tl.debug_barrier()
    packed = tl.sort(tl.load(cand_row + jj), descending=True)
    low = packed - ((packed >> 32) << 32)  # the reversed column (no 32-bit mask literal)
    return tl.where(packed == -9223372036854775807, W - 1, (W - 1 - low).to(tl.int32)).to(tl.int32)


@jit
def _evaluate(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr, slot_hi_ptr,
              is_source_ptr, sync_ptr, theta_ptr, wt_ptr, v_row, o_row, acc_row, refr_row, n_in_row,
              pend_row, pre_row, ssum_row, vpre_row, refrb_row, recv_row, gate_row,
              sd_row, vals_row, cnt, counted, fill_row, h_ref, p_ref,
              REFRACTORY: tl.constexpr, HAS_PREF: tl.constexpr, BARRIER: tl.constexpr,
              POLICY_MS: tl.constexpr, BK: tl.constexpr, RECORD: tl.constexpr, FILL: tl.constexpr,
              BLOCK: tl.constexpr, NS: tl.constexpr):
    """Deliver the K slots (`sd_row`, `vals_row`, already in global memory) and
    evaluate the receivers (the C's `evaluate`): per receiving layer and column
    block, the current is summed in registers over the slots of that layer in slot
    order, then LIF, refractoriness, outboxes, acc, and (BK) pending flags, barrier
    messages, pre-spike potentials, spike sums; (RECORD) the sweep's record;
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
                    tl.store(refrb_row + cols, rf.to(tl.uint8), mask=inside)
                    tl.store(recv_row + cols, tl.full([BLOCK], 1, tl.uint8), mask=inside)
                    tl.store(gate_row + cols, g.to(tl.uint8), mask=inside)
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


# --- kernels ------------------------------------------------------------------------------
# Specialised on (fixed for an engine: one compile per dtype, K and network): W, K, F,
# n_slots, out_lo, out_hi and the constexprs. Not specialised on (they change between
# launches or calls and add nothing to the code): the batch B, the first step k0, the
# step budget n_max, the five per-timestep hashes (i64, `hash_arg`), max_steps and
# steps_after_output.
@jit(do_not_specialize=("B", "k0", "n_max", "h_key_t", "h_drop_t", "h_ref_t", "h_order", "h_fill_t", "max_steps",
                        "steps_after_output"))
def _forward_kernel(source_slot_ptr, slot_lo_ptr, slot_hi_ptr, is_source_ptr, is_input_ptr, sync_ptr,
                    theta_ptr, wt_ptr,
                    v_ptr, o_ptr, acc_ptr, refr_ptr, n_in_ptr,
                    pend_ptr, pre_ptr, ssum_ptr, steps_ptr, first_ptr, done_ptr,
                    sel_ptr, sd_ptr, vals_ptr, fired_ptr, taken_ptr, keys_ptr, cand_ptr, fill_ptr,
                    B, W, K, F, n_slots, out_lo, out_hi, k0, n_max, h_key_t, h_drop_t, h_ref_t,
                    h_order, h_fill_t, noise, p_ref, p_net, max_steps, steps_after_output,
                    POLICY_MS: tl.constexpr, HAS_NOISE: tl.constexpr, INPUT_RANDOM: tl.constexpr,
                    FILL: tl.constexpr, HAS_PNET: tl.constexpr,
                    REFRACTORY: tl.constexpr, HAS_PREF: tl.constexpr, BARRIER: tl.constexpr,
                    STOP_OUTPUT: tl.constexpr, BLOCK: tl.constexpr, KB: tl.constexpr,
                    NS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n_out = out_hi - out_lo
    v_row, o_row, refr_row, n_in_row = v_ptr + b * W, o_ptr + b * W, refr_ptr + b * W, n_in_ptr + b * W
    acc_row = acc_ptr + b * n_out
    pend_row, pre_row, ssum_row = pend_ptr + b * W, pre_ptr + b * W, ssum_ptr + b * W
    keys_row, cand_row, fill_row = keys_ptr + b * W, cand_ptr + b * KB, fill_ptr + b * W
    jj = tl.arange(0, KB)
    kmask = jj < K
    dump = W - 1
    done = tl.load(done_ptr + b).to(tl.int32)
    steps = tl.load(steps_ptr + b)
    first = tl.load(first_ptr + b)
    taken = tl.zeros((), tl.int32)
    for i in range(n_max):
        at = (i * B + b) * K
        if done != 0:
            tl.store(sel_ptr + at + jj, tl.full([KB], 0, tl.int32) + dump, mask=kmask)
            tl.store(sd_ptr + at + jj, tl.full([KB], 0, tl.int32) + dump, mask=kmask)
            o_dump = tl.load(o_row + dump)
            tl.store(vals_ptr + at + jj, tl.zeros([KB], o_dump.dtype) + o_dump, mask=kmask)
            tl.store(fired_ptr + i * B + b, 0)
        else:
            k = k0 + i
            h_key = _step_hash(h_key_t, k)
            n_pending = _row_keys(b, W, pend_row, pre_row, is_input_ptr, keys_row, h_key,
                                  h_order.to(tl.uint32), noise, POLICY_MS, HAS_NOISE, POLICY_MS, INPUT_RANDOM,
                                  BLOCK)
            tl.debug_barrier()
            sel = _select_row(W, K, keys_row, cand_row, n_pending, BLOCK, KB, DIGIT_BITS)
            if FILL:  # the free slots (after the n_real entries) take the best fillers
                n_real = tl.sum(((sel != dump) & kmask).to(tl.int32))
                # parked in the record while the filler search needs the registers
                tl.store(sel_ptr + at + jj, sel, mask=kmask)
                if n_real < K:
                    tl.debug_barrier()
                    n_cand = _fill_keys(b, W, fill_row, pend_row, v_row, keys_row, _step_hash(h_fill_t, k),
                                        POLICY_MS, BLOCK)
                    tl.debug_barrier()
                    fsel = _select_row(W, K - n_real, keys_row, cand_row, n_cand, BLOCK, KB, DIGIT_BITS)
                    tl.debug_barrier()
                    tl.store(cand_row + jj, fsel.to(tl.int64))
                    tl.debug_barrier()
                    free = (jj >= n_real) & kmask
                    f = tl.load(cand_row + (jj - n_real), mask=free, other=0).to(tl.int32)
                    tl.store(sel_ptr + at + jj, -1 - f, mask=free & (f != dump))
                tl.debug_barrier()
                sel = tl.load(sel_ptr + at + jj, mask=kmask, other=0)
            # fillers decoded only when there can be any (the registers of fp64 at 8 warps)
            col = _dec(sel) if FILL else sel
            sd = sel
            if HAS_PNET:
                drop = _uniform_at_from_hash(_step_hash(h_drop_t, k), b, col) < p_net
                sd = tl.where(drop, dump, sel).to(tl.int32)
            vals = tl.load(o_row + (_dec(sd) if FILL else sd), mask=kmask, other=0.0)
            tl.store(sel_ptr + at + jj, sel, mask=kmask)
            tl.store(sd_ptr + at + jj, sd, mask=kmask)
            tl.store(vals_ptr + at + jj, vals, mask=kmask)
            if FILL:
                cnt = _slot_counts(_dec(sd), kmask, source_slot_ptr, NS)
                counted = _slot_counts(sd, kmask & (sd >= 0), source_slot_ptr, NS)
            else:
                cnt = _slot_counts(sd, kmask, source_slot_ptr, NS)
                counted = cnt
            tl.debug_barrier()
            if FILL:
                tl.store(pend_row + sel, tl.zeros([KB], tl.uint8), mask=kmask & (sel >= 0))
                tl.store(fill_row + col, tl.zeros([KB], tl.uint8), mask=kmask)
            else:
                tl.store(pend_row + sel, tl.zeros([KB], tl.uint8), mask=kmask)
            tl.store(o_row + col, tl.zeros([KB], vals.dtype), mask=kmask)
            tl.debug_barrier()
            out_any = _evaluate(b, W, F, K, n_slots, out_lo, out_hi, source_slot_ptr, slot_lo_ptr,
                                slot_hi_ptr, is_source_ptr, sync_ptr, theta_ptr, wt_ptr, v_row, o_row,
                                acc_row, refr_row, n_in_row, pend_row, pre_row, ssum_row,
                                v_row, refr_row, refr_row, refr_row,  # no record
                                sd_ptr + at, vals_ptr + at, cnt, counted, fill_row, _step_hash(h_ref_t, k),
                                p_ref, REFRACTORY, HAS_PREF, BARRIER, POLICY_MS, True, False, FILL, BLOCK, NS)
            steps += 1
            taken += 1
            if STOP_OUTPUT:
                if (first < 0) & (out_any != 0):
                    first = steps
            tl.store(fired_ptr + i * B + b, out_any)
            tl.debug_barrier()
            any_pending = 0
            for start in range(0, W, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                p = tl.load(pend_row + cols, mask=cols < W, other=0).to(tl.int32)
                any_pending = tl.maximum(any_pending, tl.max(p))
            d = (any_pending == 0) | (steps >= max_steps)
            if STOP_OUTPUT:
                d = d | ((first >= 0) & (steps >= first + steps_after_output))
            done = d.to(tl.int32)
    tl.store(steps_ptr + b, steps)
    tl.store(first_ptr + b, first)
    tl.store(done_ptr + b, done)
    tl.store(taken_ptr + b, taken)


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


# --- host ---------------------------------------------------------------------------------
def _partial_hash(seed: int, stream: int, t: int) -> int:
    """`rng.counter_hash` before its last round (the forward step, mixed in-kernel)."""
    h = rng._fmix32_int(seed ^ rng._GOLDEN)
    for c in (stream, t):
        h = rng._fmix32_int(h ^ ((c * rng._GOLDEN) & rng._MASK32))
    return h


def _armed_u8(armed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """`armed` (bool [B, W], updated in place) as the kernel reads and writes it."""
    if armed.dtype != torch.bool or tuple(armed.shape) != shape or not armed.is_contiguous():
        raise ValueError(f"armed must be a contiguous bool tensor {list(shape)}, got {armed.dtype} "
                         f"{tuple(armed.shape)}")
    return armed.view(torch.uint8)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


class TritonSteps:
    """The fused steps of one engine call on the engine's device (CUDA, or CPU
    tensors under TRITON_INTERPRET=1). State tensors are bound as in `CpuSteps` and
    updated in place; scratch rows ([B, W] keys, [B, next_pow2(K)] candidates) are
    this object's."""

    fills_slots = True  # fill_slots: bind_pass takes the pass's fill candidates
    records_histogram = False  # record_currents=True runs the per-op kernels

    @staticmethod
    def unsupported(spec: StepSpec) -> str | None:
        """Why these steps cannot run `spec` (None: they can)."""
        if spec.dtype not in _SUFFIX:
            return f"the fused Triton steps take float32 and float64, not {spec.dtype}"
        if spec.k > _K_MAX:
            return f"the fused Triton steps take K <= {_K_MAX}, not {spec.k}"
        return None

    def __init__(self, spec) -> None:
        """`spec`: a `step_spec.StepSpec` (or an engine, through its ``step_spec()``)."""
        spec = as_spec(spec)
        if spec.dtype not in _SUFFIX:
            raise TypeError(f"backend='triton' fused steps support float32 and float64, got {spec.dtype}")
        if spec.k > _K_MAX:
            raise ValueError(f"backend='triton' fused steps support K <= {_K_MAX}, got {spec.k}")
        dev = self.device = spec.device
        self.B, self.W, self.K, self.dtype = spec.batch, spec.width, spec.k, spec.dtype
        self.F = spec.fan_out
        u8 = lambda x: x.to(device=dev, dtype=torch.uint8).contiguous()  # noqa: E731
        i64 = lambda x: x.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
        self._tables = dict(source_slot=i64(spec.source_slot), slot_lo=i64(spec.slot_lo),
                            slot_hi=i64(spec.slot_hi), is_source=u8(spec.is_source), is_input=u8(spec.is_input),
                            sync=spec.sync.to(device=dev, dtype=torch.int32).contiguous(),
                            theta=spec.theta.to(dev).contiguous())
        self.n_slots = spec.n_slots
        self.out_lo, self.out_hi = spec.out_lo, spec.out_hi
        self.policy_ms = spec.policy_ms
        self.input_random = spec.input_random
        self.fill = spec.fill
        self.refractory, self.barrier = spec.refractory, spec.barrier
        self.stop_output = spec.stop_output
        self.detach_reset = spec.detach_reset
        self.noise, self.p_ref, self.p_net = spec.noise, spec.p_ref, spec.p_net
        self.max_steps, self.steps_after_output = spec.max_steps, spec.steps_after_output
        self.seed = spec.seed
        self.KB = max(2, triton.next_power_of_2(self.K))
        self.NS = max(2, triton.next_power_of_2(self.n_slots))
        self._fwd_cfg = _config(self.W, self.dtype, forward=True)
        self._step_cfg = _config(self.W, self.dtype, forward=False)
        self._const = surrogate_constants(spec.alpha, self.dtype, dev)  # no host tensor (a sync on CUDA)
        self._keys = torch.empty(self.B, self.W, dtype=torch.int64, device=dev)
        self._cand = torch.empty(self.B, self.KB, dtype=torch.int64, device=dev)
        self._bound: dict = {}

    def _launch_opts(self, forward: bool = False) -> dict:
        return dict(self._fwd_cfg if forward else self._step_cfg, enable_fp_fusion=False)

    def bind_weights(self, wt: torch.Tensor) -> None:
        if wt.shape != (self.W, self.F) or wt.dtype != self.dtype or not wt.is_contiguous():
            raise ValueError(f"weight table must be contiguous {self.dtype} [{self.W}, {self.F}], "
                             f"got {wt.dtype} {tuple(wt.shape)}")
        check_tensors("TritonSteps", _forward_kernel, wt=wt, theta=self._tables["theta"])
        self._bound["wt"] = wt

    def bind_state(self, st) -> None:
        """Point at `st` (a `state.State` whose tensors this object may modify)."""
        for name in ("v", "o", "acc", "refr", "n_in"):
            t = getattr(st, name)
            assert t.is_contiguous(), name
            self._bound[name] = _u8(t)

    def bind_pass(self, p: PassTensors) -> None:
        """Point at a pass's bookkeeping: flags, counters and done flags. No
        currents-to-spike histogram here (`records_histogram` is False)."""
        if p.hist is not None:
            raise NotImplementedError("the fused Triton steps do not record the currents-to-spike "
                                      "histogram; the engine runs the per-op kernels for it")
        for name in ("pending", "pre_spike", "spike_sum", "steps", "first_out", "done"):
            t = getattr(p, name)
            assert t.is_contiguous(), name
            self._bound[name] = _u8(t)
        if self.fill:
            assert p.fillable is not None and p.fillable.is_contiguous(), "fillable"
            self._bound["fillable"] = _u8(p.fillable)

    def forward_step(self, t: int, k: int):
        """One forward step of the bound state and pass. Returns (sel, sel_deliv int32
        [B, K], vals [B, K], out_fired bool [B], all_done)."""
        sel, sd, vals, fired, all_done = self.forward_batch(t, k, 1)
        return sel[0], sd[0], vals[0], fired[0], all_done

    def forward_steps(self, t: int, k0: int, n_max: int):
        """Up to `n_max` forward steps (k0, k0 + 1, ...) in one launch, stopping after
        the step that leaves every sample done (the caller checks that one is not
        done first). Returns (sel, sel_deliv int32 [n, B, K], vals [n, B, K],
        out_fired bool [n, B])."""
        return self.forward_batch(t, k0, n_max)[:4]

    def forward_batch(self, t: int, k0: int, n_max: int):
        """`forward_steps` and whether every sample is done after them: one host read
        per launch (`host.read`: the steps taken and the done flags together)."""
        B, K, dev, s = self.B, self.K, self.device, self._bound
        sel = torch.empty(n_max, B, K, dtype=torch.int32, device=dev)
        sd = torch.empty(n_max, B, K, dtype=torch.int32, device=dev)
        vals = torch.empty(n_max, B, K, dtype=self.dtype, device=dev)
        fired = torch.empty(n_max, B, dtype=torch.bool, device=dev)
        taken = torch.zeros(B, dtype=torch.int32, device=dev)
        tb = self._tables
        h = [_partial_hash(self.seed, stream, t) for stream in
             (rng.STREAM_MOMENTUM_NOISE if self.policy_ms else rng.STREAM_RS_KEY,
              rng.STREAM_NETWORK_DROPOUT, rng.STREAM_REFRACTORY_DROPOUT)]
        _forward_kernel[(B,)](
            tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["is_input"], tb["sync"],
            tb["theta"], s["wt"], s["v"], s["o"], s["acc"], s["refr"], s["n_in"],
            s["pending"], s["pre_spike"], s["spike_sum"], s["steps"], s["first_out"], s["done"],
            sel, sd, vals, fired.view(torch.uint8), taken, self._keys, self._cand,
            s["fillable"] if self.fill else s["pending"],  # the latter never read (FILL off)
            B, self.W, K, self.F, self.n_slots, self.out_lo, self.out_hi, k0, n_max, *map(hash_arg, h),
            hash_arg(rng.counter_hash(self.seed, rng.STREAM_INPUT_ORDER, t, 0)),
            hash_arg(_partial_hash(self.seed, rng.STREAM_FILL, t)),
            float(self.noise), float(self.p_ref), float(self.p_net), self.max_steps, self.steps_after_output,
            POLICY_MS=self.policy_ms, HAS_NOISE=self.noise > 0, INPUT_RANDOM=self.input_random,
            FILL=self.fill, HAS_PNET=self.p_net > 0,
            REFRACTORY=self.refractory, HAS_PREF=self.p_ref > 0, BARRIER=self.barrier,
            STOP_OUTPUT=self.stop_output, KB=self.KB, NS=self.NS, **self._launch_opts(forward=True))
        n, all_done = host.read(torch.stack([taken.max().to(torch.int64),
                                             self._bound["done"].view(torch.bool).all().to(torch.int64)]))
        n = max(1, n)
        if 2 * n <= n_max:  # do not keep the unused tail alive through the views
            return sel[:n].clone(), sd[:n].clone(), vals[:n].clone(), fired[:n].clone(), bool(all_done)
        return sel[:n], sd[:n], vals[:n], fired[:n], bool(all_done)

    def replay_step(self, t: int, k: int, sel: torch.Tensor, sel_deliv: torch.Tensor):
        """Replay a recorded step on the bound state. Returns the sweep's record
        (vals [B, K], v_pre [B, W], refr_before, received, gate bool [B, W]; v_pre and
        refr_before are defined at the receivers only)."""
        B, W, K, dev, s, tb = self.B, self.W, self.K, self.device, self._bound, self._tables
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        vals = torch.empty(B, K, dtype=self.dtype, device=dev)
        v_pre = torch.empty(B, W, dtype=self.dtype, device=dev)
        masks = torch.empty(3, B, W, dtype=torch.bool, device=dev)
        m = masks.view(torch.uint8)
        _replay_kernel[(B,)](
            tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["sync"], tb["theta"], s["wt"],
            s["v"], s["o"], s["acc"], s["refr"], s["n_in"], sel, sel_deliv, vals, v_pre, m[0], m[1], m[2],
            W, K, self.F, self.n_slots, self.out_lo, self.out_hi,
            hash_arg(rng.counter_hash(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t, k)), float(self.p_ref),
            REFRACTORY=self.refractory, HAS_PREF=self.p_ref > 0, KB=self.KB, NS=self.NS,
            **self._launch_opts())
        return FusedRecord(vals, v_pre, masks)

    def backward_step(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor,
                      g_v: torch.Tensor, g_o: torch.Tensor, g_acc: torch.Tensor,
                      grad_wt: torch.Tensor, armed: torch.Tensor | None = None) -> None:
        """The step's reverse: updates g_v, g_o (and `armed`, bool [B, W], with
        surrogate_at="fire_or_last": the sweep of loop.py) and adds into grad_wt (float
        atomics across samples), in place."""
        for name, t in (("g_v", g_v), ("g_o", g_o), ("g_acc", g_acc), ("grad_wt", grad_wt)):
            if not t.is_contiguous() or t.dtype != self.dtype:
                raise ValueError(f"{name} must be contiguous {self.dtype}, got {t.dtype}")
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        tb, m = self._tables, rec.masks.view(torch.uint8)
        _backward_kernel[(self.B,)](
            tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["theta"], self._bound["wt"],
            self._const, sel, sel_deliv, rec.vals, rec.v_pre, m[0], m[1], m[2], g_v, g_o, g_acc, grad_wt,
            m[0] if armed is None else _armed_u8(armed, (self.B, self.W)),  # never written without ARMED
            self.W, self.K, self.F, self.n_slots, self.out_lo, self.out_hi,
            DETACH_RESET=self.detach_reset, KB=self.KB, NS=self.NS, ARMED=armed is not None,
            **self._launch_opts())
