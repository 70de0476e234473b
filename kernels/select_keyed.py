"""Keyed select: one forward step's selection with its keys computed from the state
(SPEC 5.1, 6, 8), no list and no host sync: the engine's sync-free path (CUDA).

`select_keyed_triton` is the radix search of `select.select_triton` with the
keys computed in the kernel from the pending flags, the potentials, the input flags
and counter hashes mixed on the host (`_keys_block`: RS uniforms, MS pre-spike +
noise, inputs at +inf or in their random order above it; fill candidates: V or the
fill uniforms): no [B, W] float keys, int64 order or packed keys per step. Its twin
`select_keyed_torch` computes the keys over every column (`select.selection_keys_torch`)
and selects with `select.select_keys_torch`; the fused steps (kernels/steps_forward.py)
share the kernel's key helpers (`_row_keys`, `_fill_keys`). Tests: tests/test_select_keyed.py.
"""

from __future__ import annotations

import torch

from . import rng
from ._triton import check_dtype, check_shape, check_tensors, hash_arg, jit, tl, triton
from .rng_triton import _bits_at_from_hash, _uniform_at_from_hash
from .select import (_ONE_BLOCK_MAX, _config, _radix_threshold, _sortable, _take, fill_free_slots, select_keys_torch,
                     selection_keys_torch)



def select_keyed_torch(pending: torch.Tensor, values: torch.Tensor, is_input: torch.Tensor, k: int,
                       seed: int, t: int, step: int, *, policy_ms: bool, noise: float = 0.0,
                       input_random: bool = False, sel: torch.Tensor | None = None) -> torch.Tensor:
    """One forward step's selection with its keys computed from the state (the twin
    of `select_keyed_triton`; the engine's sync-free path, no list, no host sync).

    Args:
        pending: bool ``[B, W]``: the pending entries, or (`sel` given) the fill
            candidates; the last column is the dump and is never set.
        values: float ``[B, W]``: pre-spike potentials (MS), or V (`sel` given, MS);
            RS reads none.
        is_input: bool ``[W]``: the input columns (MS: they rank above every neuron).
        k: forward group size K >= 1.
        seed, t, step: the call's seed, the timestep and the forward step (the
            counter hash of `rng`).
        policy_ms, noise, input_random: the keys (`selection_keys_torch`).
        sel: fill mode (SPEC 8 fill_slots): the step's selection int64 ``[B, min(k, W)]``;
            its dump slots take the best candidates (the j-th free slot the j-th best),
            recorded as -1 - column. `noise` and `input_random` are not read.

    Returns:
        int64 ``[B, min(k, W)]``: the selection, highest key first (ties: lower
        index first), the dump ``W - 1`` in unused slots; or (`sel`) `sel` with its
        free slots filled.
    """
    keys, order = selection_keys_torch(values, is_input, seed, t, step, policy_ms=policy_ms, noise=noise,
                                       input_random=input_random, fill=sel is not None)
    if sel is None:
        return select_keys_torch(pending, keys, k, order)
    return fill_free_slots(sel, select_keys_torch(pending, keys, k), pending.shape[1] - 1)


@jit
def _keys_block(b, cols, inside, keep, val_row, is_input_ptr, h_key, h_order, noise,
                FROM_VALUES: tl.constexpr, HAS_NOISE: tl.constexpr, INPUTS_FIRST: tl.constexpr,
                INPUT_RANDOM: tl.constexpr):
    """Selection keys of row `b`'s columns `cols`, computed from the state (SPEC 6, 8),
    mapped as `_mapped_keys` (-1 where not `keep`): FROM_VALUES the row's values as
    float32 (MS: pre-spike potential, fill: V), + HAS_NOISE `noise` x the uniform of
    hash `h_key`; else that uniform (RS, RS fill). INPUTS_FIRST: inputs at +inf, and
    (INPUT_RANDOM) above it at 0x7F800000 + their order key (`rng.input_order_key`
    from hash `h_order`), as the C's `packed_key`. Hashes: uint32, mixed on the host
    (`rng.counter_hash`). Values and input flags are read only where `keep` (which
    implies `inside`): a sparse row costs its flags' bytes and the kept entries', not
    up to 5 bytes a column. The key math of `selection_keys_torch`, and of the fused
    steps (`_row_keys`, `_fill_keys`)."""
    if FROM_VALUES:
        key = tl.load(val_row + cols, mask=keep, other=0.0).to(tl.float32)
        if HAS_NOISE:
            key = key + noise * _uniform_at_from_hash(h_key, b, cols)
    else:
        key = _uniform_at_from_hash(h_key, b, cols)
    if INPUTS_FIRST:
        inp = tl.load(is_input_ptr + cols, mask=keep, other=0) != 0
        key = tl.where(inp, float("inf"), key)
    s = _sortable(key)
    if INPUTS_FIRST:
        if INPUT_RANDOM:
            q = (_bits_at_from_hash(h_order, b, cols) >> 9).to(tl.int32)
            s = tl.where(inp, 0x7F800000 + q, s)
    return tl.where(keep, s.to(tl.int64) + 2147483648, -1)


@jit
def _row_keys(b, W, pend_row, pre_row, is_input_ptr, keys_row, h_key, h_order, noise,
              FROM_VALUES: tl.constexpr, HAS_NOISE: tl.constexpr, INPUTS_FIRST: tl.constexpr,
              INPUT_RANDOM: tl.constexpr, BLOCK: tl.constexpr):
    """Mapped keys (uint32 order held in int64, -1 where not pending) of one row's
    pending entries into `keys_row` (`_keys_block`: RS uniform; FROM_VALUES the values,
    MS pre-spike or fill V, + noise; INPUTS_FIRST inputs at +inf or, INPUT_RANDOM,
    0x7F800000 + their order key); returns the number of
    pending entries. The fused steps' (kernels/steps_forward.py) and the streaming path
    of `_select_keyed_kernel`."""
    n_pending = 0
    for start in range(0, W, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < W
        pend = tl.load(pend_row + cols, mask=inside, other=0) != 0
        u = _keys_block(b, cols, inside, pend, pre_row, is_input_ptr, h_key, h_order, noise,
                        FROM_VALUES, HAS_NOISE, INPUTS_FIRST, INPUT_RANDOM)
        tl.store(keys_row + cols, u, mask=inside)
        n_pending += tl.sum(pend.to(tl.int32))
    return n_pending


@jit
def _fill_keys(b, W, fill_row, pend_row, v_row, keys_row, h_fill, POLICY_MS: tl.constexpr,
               BLOCK: tl.constexpr):
    """fill_slots: mapped keys (as `_row_keys`) of the fill candidates (`fill_row` set,
    `pend_row` not: outbox holds gradient, not pending) into `keys_row`, MS: V as
    float32, RS: the STREAM_FILL uniform of hash `h_fill`; returns the number of
    candidates."""
    n_cand = 0
    for start in range(0, W, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < W
        cand = (tl.load(fill_row + cols, mask=inside, other=0) != 0) & \
            (tl.load(pend_row + cols, mask=inside, other=0) == 0)
        u = _keys_block(b, cols, inside, cand, v_row, fill_row, h_fill, h_fill, 0.0,
                        POLICY_MS, False, False, False)
        tl.store(keys_row + cols, u, mask=inside)
        n_cand += tl.sum(cand.to(tl.int32))
    return n_cand



@jit
def _free_slots(s_row, width, kk, BLOCK: tl.constexpr):
    """fill_slots: the free (dump, ``width - 1``) slots of a row's selection `s_row`
    (kk slots): the group the fillers are chosen for."""
    n = 0
    for start in range(0, kk, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        sl = tl.load(s_row + slot, mask=slot < kk, other=0)
        n += tl.sum(((sl == width - 1) & (slot < kk)).to(tl.int32))
    return n


@jit
def _fill_free(s_row, o_row, f_row, col_row, width, kk, n_sel, BLOCK: tl.constexpr, GATHER: tl.constexpr):
    """fill_slots: the j-th free slot of the selection `s_row` takes the j-th of the
    `n_sel` fillers in `f_row` (ascending column), recorded as -1 - column, into
    `o_row`; other slots copied. GATHER: `f_row` holds positions into the columns
    `col_row` (the staged merge's candidates), else the columns themselves."""
    n_free = 0
    for start in range(0, kk, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        inside = slot < kk
        sl = tl.load(s_row + slot, mask=inside, other=0)
        free = (sl == width - 1) & inside
        rank = n_free + tl.cumsum(free.to(tl.int32), axis=0) - 1
        has = free & (rank < n_sel)
        c = tl.load(f_row + rank, mask=has, other=0)
        if GATHER:
            c = tl.load(col_row + c, mask=has, other=0)
        tl.store(o_row + slot, tl.where(has, -1 - c.to(tl.int64), sl), mask=inside)
        n_free += tl.sum(free.to(tl.int32))


# Constants (fixed for an engine: one compile per row-width class, dtype and K, and
# per key kind, pending or fill): width, k, kk, the strides and the constexprs. Not
# specialised on: the two hashes h_key and h_order (i64, `hash_arg`), which change
# with every timestep and forward step. t and the step are mixed into them on the
# host; the fill mode's per-row group size (the free slots) is computed here. Keys:
# ONE_BLOCK rows compute them once, in registers; wider rows write them once to the
# int64 scratch row `keys_ptr` and every radix round reads them back (8 bytes per
# entry, L2-resident), instead of re-hashing them each of the 32 / DIGIT_BITS + 2
# passes (RS and noise: two fmix32 per entry and pass) and re-reading the flags and
# potentials (2-10 bytes per entry): the same bits either way, the scratch row is
# one allocation per step of the caching allocator.
@jit(do_not_specialize=("h_key", "h_order"))
def _select_keyed_kernel(pending_ptr, values_ptr, is_input_ptr, sel_ptr, out_ptr, keys_ptr, fill_ptr,
                         width, k, kk, stride_p, stride_v, stride_s, stride_o, h_key, h_order, noise,
                         FROM_VALUES: tl.constexpr, HAS_NOISE: tl.constexpr, INPUTS_FIRST: tl.constexpr,
                         INPUT_RANDOM: tl.constexpr, FILL: tl.constexpr, BLOCK: tl.constexpr,
                         ONE_BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row = pending_ptr + row * stride_p
    v_row = values_ptr + row * stride_v
    o_row = out_ptr + row * stride_o
    keys_row = keys_ptr + row * width
    hk = h_key.to(tl.uint32)
    ho = h_order.to(tl.uint32)
    cols = tl.arange(0, BLOCK)
    if FILL:  # the group: the free (dump) slots of the step's selection
        s_row = sel_ptr + row * stride_s
        f_row = fill_ptr + row * kk
        kr = _free_slots(s_row, width, kk, BLOCK)
    else:
        kr = k
    if ONE_BLOCK:
        inside = cols < width
        keep = tl.load(p_row + cols, mask=inside, other=0) != 0
        u = _keys_block(row, cols, inside, keep, v_row, is_input_ptr, hk, ho, noise,
                        FROM_VALUES, HAS_NOISE, INPUTS_FIRST, INPUT_RANDOM)
        n_pending = tl.sum(keep.to(tl.int32))
    else:
        u = tl.zeros((), tl.int64)  # not read: each round streams the scratch row
        n_pending = _row_keys(row, width, p_row, v_row, is_input_ptr, keys_row, hk, ho, noise,
                              FROM_VALUES, HAS_NOISE, INPUTS_FIRST, INPUT_RANDOM, BLOCK)
        tl.debug_barrier()  # the keys are read back by other threads of the program
    prefix = _radix_threshold(keys_row, keys_row, u, width, kr, n_pending, BLOCK, DIGIT_BITS, ONE_BLOCK, True)
    if FILL:
        # the fillers, ascending index, to the fill scratch row; then the j-th free
        # slot of the selection takes the j-th of them (-1 - column)
        n_sel = _take(keys_row, keys_row, u, f_row, width, kr, kk, prefix, BLOCK, ONE_BLOCK, True, False)
        tl.debug_barrier()
        _fill_free(s_row, o_row, f_row, f_row, width, kk, n_sel, BLOCK, False)
    else:
        _take(keys_row, keys_row, u, o_row, width, kr, kk, prefix, BLOCK, ONE_BLOCK, True, True)


# --- staged: chunks of a wide row in parallel, then a merge over their candidates -----
# A row wider than one block is cut into chunks of _CHUNK columns, one program per
# (row, chunk): the chunk's keys are computed once, in registers (the one-block
# search), and its best kk entries (key, column) go to a candidate row, in ascending
# column order, -1 keys after them. The row's best kk are among its chunks' best kk
# (an entry preceded by fewer than kk in the whole row is preceded by fewer than kk
# in its chunk; the order: key descending, then index ascending), so one program per
# row then runs the usual radix search over n_chunks x kk candidates instead of W
# columns, and maps the taken candidates back to their columns. Bytes per call: the
# flags (and values) read once, 12 bytes per candidate written and read: no int64
# [B, W] scratch row, and B x n_chunks programs instead of B.
_CHUNK = _ONE_BLOCK_MAX
_STAGED_MAX_KK = _CHUNK // 4
"""Largest kk of the staged path (below it a row's candidates are at most a quarter of
its columns); larger K streams the row as before."""


def staged_plan(width: int, kk: int) -> dict | None:
    """The staged path's sizes for a row width and group size kk (None: the row is
    searched by one program, in registers or streamed): chunks, candidates per row,
    scratch bytes per row. What tests/test_select_keyed.py holds the path to."""
    if width <= _ONE_BLOCK_MAX or kk > _STAGED_MAX_KK:
        return None
    n_chunks = -(-width // _CHUNK)
    n_cand = n_chunks * kk
    return dict(n_chunks=n_chunks, n_cand=n_cand, scratch_bytes=n_cand * 12 + kk * 8)


@jit(do_not_specialize=("h_key", "h_order"))
def _chunk_top_kernel(pending_ptr, values_ptr, is_input_ptr, ckey_ptr, ccol_ptr, width, kk, n_chunks,
                      stride_p, stride_v, h_key, h_order, noise, FROM_VALUES: tl.constexpr,
                      HAS_NOISE: tl.constexpr, INPUTS_FIRST: tl.constexpr, INPUT_RANDOM: tl.constexpr,
                      CHUNK: tl.constexpr, KPAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    inside = cols < width
    keep = tl.load(pending_ptr + row * stride_p + cols, mask=inside, other=0) != 0
    u = _keys_block(row, cols, inside, keep, values_ptr + row * stride_v, is_input_ptr, h_key.to(tl.uint32),
                    h_order.to(tl.uint32), noise, FROM_VALUES, HAS_NOISE, INPUTS_FIRST, INPUT_RANDOM)
    n_pending = tl.sum(keep.to(tl.int32))
    base = (row * n_chunks + chunk) * kk
    prefix = _radix_threshold(ckey_ptr, ckey_ptr, u, CHUNK, kk, n_pending, CHUNK, 1, True, True)
    # the chunk's best kk (ties to the lower index, as `_take`), ascending column
    m = kk - tl.sum((u > prefix).to(tl.int32))
    tied = (u == prefix).to(tl.int32)
    take = (u > prefix) | ((tied != 0) & (tl.cumsum(tied, axis=0) <= m))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(ckey_ptr + base + pos, u, mask=take)
    tl.store(ccol_ptr + base + pos, cols.to(tl.int32), mask=take)
    slot = tl.arange(0, KPAD)
    n_sel = tl.sum(take.to(tl.int32))
    tl.store(ckey_ptr + base + slot, tl.full([KPAD], -1, tl.int64), mask=(slot >= n_sel) & (slot < kk))


def _merge_config(n_cand: int) -> dict:
    """The merge's launch constants: the candidates in registers (one block of 2048)
    up to 2048 of them, else streamed in blocks of 1024, 4 warps either way: the
    spill-free pairs on sm_90 and sm_80 for both key kinds at kk 8 and 64 (ptxas
    left 8-byte stack frames at one block of 1024 with 4 warps, streaming with 8)."""
    if n_cand <= _ONE_BLOCK_MAX:
        return dict(BLOCK=_ONE_BLOCK_MAX, ONE_BLOCK=True, DIGIT_BITS=1, num_warps=4)
    return dict(BLOCK=1024, ONE_BLOCK=False, DIGIT_BITS=4, num_warps=4)


@jit
def _merge_kernel(ckey_ptr, ccol_ptr, sel_ptr, out_ptr, pos_ptr, width, k, kk, n_cand, stride_s, stride_o,
                  FILL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
                  KBLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c_row = ckey_ptr + row * n_cand
    col_row = ccol_ptr + row * n_cand
    o_row = out_ptr + row * stride_o
    p_row = pos_ptr + row * kk
    s_row = sel_ptr + row * stride_s
    slots = tl.arange(0, KBLOCK)
    kr = _free_slots(s_row, width, kk, KBLOCK) if FILL else k  # fill: the group is the free slots
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        u = tl.load(c_row + cols, mask=cols < n_cand, other=-1)
        n_pending = tl.sum((u >= 0).to(tl.int32))
    else:
        u = tl.zeros((), tl.int64)  # not read: the rounds stream the candidate row
        n_pending = 0
        for start in range(0, n_cand, BLOCK):
            c = start + cols
            n_pending += tl.sum((tl.load(c_row + c, mask=c < n_cand, other=-1) >= 0).to(tl.int32))
    prefix = _radix_threshold(c_row, c_row, u, n_cand, kr, n_pending, BLOCK, DIGIT_BITS, ONE_BLOCK, True)
    # the taken candidates' positions (ascending = ascending column), then their columns
    n_sel = _take(c_row, c_row, u, p_row, n_cand, kr, kk, prefix, BLOCK, ONE_BLOCK, True, False)
    tl.debug_barrier()
    if FILL:
        _fill_free(s_row, o_row, p_row, col_row, width, kk, n_sel, KBLOCK, True)
    else:
        for start in range(0, kk, KBLOCK):
            slot = start + slots
            inside = slot < kk
            has = inside & (slot < n_sel)
            c = tl.load(col_row + tl.load(p_row + slot, mask=has, other=0), mask=has, other=0).to(tl.int64)
            tl.store(o_row + slot, tl.where(has, c, width - 1), mask=inside)


def select_keyed_triton(pending: torch.Tensor, values: torch.Tensor, is_input: torch.Tensor, k: int,
                        seed: int, t: int, step: int, *, policy_ms: bool, noise: float = 0.0,
                        input_random: bool = False, sel: torch.Tensor | None = None) -> torch.Tensor:
    """`select_keyed_torch` on the device, no host sync: the keys computed in the
    kernels from the flags, values and hashes (`_keys_block`), no [B, W] keys or order
    tensor, no topk. Rows up to `_ONE_BLOCK_MAX` wide: one launch, one program per
    sample, keys in registers; wider rows with kk <= `_STAGED_MAX_KK`: two launches,
    the staged search (`staged_plan`: a program per chunk, then a merge); wider rows
    at larger K: one launch streaming an int64 scratch row. The same selected sets as the twin (ties to the lower
    index); the order within a row differs: ascending index (the twin: highest key
    first), and with `sel` the fillers take the free slots in ascending column order.
    Callers must not rely on either order. Arguments and result as the twin's."""
    op = "select_keyed_triton"
    check_tensors(op, _select_keyed_kernel, pending=pending, values=values, is_input=is_input)
    check_shape(op, "pending", pending, (None, None))
    check_dtype(op, "pending", pending, (torch.bool,))
    check_shape(op, "values", values, tuple(pending.shape))
    b, width = pending.shape
    check_shape(op, "is_input", is_input, (width,))
    check_dtype(op, "is_input", is_input, (torch.bool,))
    if not values.is_floating_point():
        raise TypeError(f"{op}: values must be floating point, got {values.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an int >= 1, got {k!r}")
    kk = min(k, width)
    fill = sel is not None
    if fill:
        check_shape(op, "sel", sel, (b, kk))
        check_dtype(op, "sel", sel, (torch.int64,))
    out = torch.empty(b, kk, dtype=torch.int64, device=pending.device)
    if b == 0 or width == 0:
        return out
    dev = pending.device
    plan = staged_plan(width, kk)
    cfg = _merge_config(plan["n_cand"]) if plan else _config(width)
    sel = sel.contiguous() if fill else out  # (not read without fill)
    pending = pending.contiguous().view(torch.uint8)
    values = values.contiguous()
    is_input = is_input.contiguous().view(torch.uint8)
    stream = (rng.STREAM_FILL if not policy_ms else rng.STREAM_MOMENTUM_NOISE) if fill else \
        (rng.STREAM_MOMENTUM_NOISE if policy_ms else rng.STREAM_RS_KEY)
    input_random = bool(policy_ms and input_random and not fill)
    h_order = rng.counter_hash(seed, rng.STREAM_INPUT_ORDER, t, 0) if input_random else 0
    has_noise = bool(policy_ms and noise > 0 and not fill)
    h_key = hash_arg(rng.counter_hash(seed, stream, t, step))
    keys = dict(FROM_VALUES=bool(policy_ms), HAS_NOISE=has_noise, INPUTS_FIRST=bool(policy_ms and not fill),
                INPUT_RANDOM=input_random)
    if plan:
        n_chunks, n_cand = plan["n_chunks"], plan["n_cand"]
        ckey = torch.empty(b, n_cand, dtype=torch.int64, device=dev)
        ccol = torch.empty(b, n_cand, dtype=torch.int32, device=dev)
        pos = torch.empty(b, kk, dtype=torch.int64, device=dev)
        kpad = triton.next_power_of_2(kk)
        _chunk_top_kernel[(b, n_chunks)](
            pending, values, is_input, ckey, ccol, width, kk, n_chunks, pending.stride(0), values.stride(0),
            h_key, hash_arg(h_order), float(noise) if has_noise else 0.0, CHUNK=_CHUNK, KPAD=kpad,
            num_warps=4, enable_fp_fusion=False, **keys)  # no FMA: key + noise * u
        _merge_kernel[(b,)](ckey, ccol, sel, out, pos, width, k, kk, n_cand, sel.stride(0), out.stride(0),
                            FILL=fill, KBLOCK=kpad, **cfg)
        return out
    # rows wider than one block at large K: the scratch row of mapped keys (see the kernel)
    scratch = torch.empty((b, width) if not cfg["ONE_BLOCK"] else (1,), dtype=torch.int64, device=dev)
    fillers = torch.empty((b, kk) if fill else (1,), dtype=torch.int64, device=dev)
    _select_keyed_kernel[(b,)](
        pending, values, is_input, sel, out, scratch, fillers, width, k, kk, pending.stride(0),
        values.stride(0), sel.stride(0), out.stride(0), h_key, hash_arg(h_order),
        float(noise) if has_noise else 0.0, FILL=fill, enable_fp_fusion=False, **keys, **cfg)  # no FMA
    return out
