"""The persistent forward kernel of the fused Triton steps (kernels/steps_triton.py):
up to n_max forward steps of one sample per program and launch (select, network
dropout, deliver, LIF, refractoriness, bookkeeping, stop condition), and its row
selection (`_select_row`: a radix search for the K-th key over the scratch row of
mapped keys written by `select_keyed._row_keys` / `_fill_keys`, then a sort of the
K taken)."""

from __future__ import annotations

from ._triton import jit, tl
from .rng_triton import _uniform_at_from_hash
from .select import _radix_threshold
from .select_keyed import _fill_keys, _row_keys
from .steps_eval import _dec, _evaluate, _slot_counts, _step_hash


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
                                v_row, refr_row,  # no record
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
