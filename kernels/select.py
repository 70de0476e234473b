"""Select: per sample, the K pending outboxes with the highest key (SPEC 5.1, 6).

Ties go to the lower flat index (SPEC 6: MS with zero noise is deterministic).
`torch.topk` does not break ties by index, so the key is packed into one int64:
the float32 key mapped to an order-preserving int32 in the high half, the reversed
column index in the low half. One topk over [B, N + 1] per step: O(N) per sample,
never a sort of the whole network.

`select_triton` (one program per sample, no sort) finds the threshold T = the k-th
largest mapped key among the pending entries by a radix search over its 32 bits
(`DIGIT_BITS` bits per round: each round counts, for all 2**DIGIT_BITS candidate
digits at once, how many entries are >= the candidate, and keeps the largest digit
whose count is still >= k), then one pass counts the entries above T and one pass
writes the entries above T plus the lowest-index entries equal to T (ties to the
lower index) in ascending index order, padding with the dump. A row whose whole
width fits one block of 2048 (`ONE_BLOCK`) is loaded once and searched in registers one bit
per round; wider rows re-read the row 32 / 4 + 3 times (L2-resident: 5 bytes per
entry). A row with at most k pending entries skips the search. Work per sample is
O(W) whatever k is; k rounds of an argmax would be O(k W) and lose from k ~ 10.
Unlike `select_torch` the output order is defined (ascending index); callers must
not rely on either. Tested under the interpreter against the twin (tests/
test_kernels_triton.py); GPU timings: benchmarks/kernels.py.

`select_keyed_triton` (the engine's sync-free path, CUDA) is the same search with the
keys computed in the kernel from the pending flags, the potentials, the input flags
and counter hashes mixed on the host (`_keys_block`: RS uniforms, MS pre-spike +
noise, inputs at +inf or in their random order above it; fill candidates: V or the
fill uniforms): no [B, W] float keys, int64 order or packed keys per step. Its twin
`select_keyed_torch` computes the keys over every column (`selection_keys_torch`)
and selects with `select_keys_torch`; the fused steps (kernels/steps_triton.py) share
the kernel's key helpers (`_row_keys`, `_fill_keys`). Tests: tests/test_select_keyed.py.
"""

from __future__ import annotations

import math

import torch

from . import rng
from ._triton import check_dtype, check_shape, check_tensors, hash_arg, jit, tl, triton
from .rng_triton import _bits_at_from_hash, _uniform_at_from_hash

_INT64_MIN = torch.iinfo(torch.int64).min


def sortable_key(keys: torch.Tensor) -> torch.Tensor:
    """float32 keys -> int64 with the same order (negative floats flip their bits;
    -0.0 is first made +0.0, the two compare equal and must tie-break by index)."""
    bits = (keys.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def select_torch(pending: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of up to `k` pending entries per row, highest key first in rank.

    Args:
        pending: bool ``[B, W]``; the last column is the dump and is never pending.
        keys: float32 ``[B, W]`` priorities (no NaN; ``inf`` allowed).
        k: forward group size K >= 1.

    Returns:
        int64 ``[B, min(k, W)]`` flat indices; slots beyond the number of pending
        entries hold the dump index ``W - 1``. Order within a row is unspecified.
    """
    width = keys.shape[1]
    cols = torch.arange(width, device=keys.device, dtype=torch.int64)
    packed = (sortable_key(keys) << 32) | (width - 1 - cols)
    packed = packed.masked_fill(~pending, _INT64_MIN)
    top, idx = packed.topk(min(k, width), dim=1, sorted=False)
    return torch.where(top != _INT64_MIN, idx, width - 1)


def select_pending_torch(rows: torch.Tensor, cols: torch.Tensor, keys: torch.Tensor, batch: int,
                         width: int, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """`select_torch` from the pending entries alone: the same selected sets, with work
    O(pending) instead of O(B x W) (the engine's torch path, where the pending entries
    are listed anyway for their random keys; a VGG-7 state is 229,387 columns wide and
    a few percent of them pend at small K).

    Args:
        rows, cols: int64 ``[P]`` the pending entries, sorted by row (as
            ``pending.nonzero(as_tuple=True)`` lists them).
        keys: float32 ``[P]`` their priorities (no NaN; ``inf`` allowed).
        batch, width: B and W of the state.
        k: forward group size K >= 1.
        order: optional int64 ``[P]``: entries with ``order >= 0`` (< 2**23) rank
            above every float key, by decreasing order (ties: lower index); their
            `keys` are ignored (MS input entries in random order, SPEC 6: the packed
            key's high half is 0x7F800000 + order, above +inf's 0x7F800000, as in
            the fused steps).

    Returns:
        int64 ``[B, min(k, W)]`` as `select_torch`, but in a defined order: highest
        key first (ties: lower index first), as the fused CPU steps deliver them.
    """
    kk = min(k, width)
    counts = torch.bincount(rows, minlength=batch)
    n_max = max(int(counts.max()) if rows.numel() else 0, kk)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - start[rows]
    packed = torch.full((batch, n_max), _INT64_MIN, dtype=torch.int64, device=keys.device)
    high = sortable_key(keys)
    if order is not None:
        high = torch.where(order >= 0, 0x7F800000 + order, high)
    packed[rows, pos] = (high << 32) | (width - 1 - cols)
    top, _ = packed.topk(kk, dim=1, sorted=True)
    return torch.where(top != _INT64_MIN, width - 1 - (top & 0xFFFFFFFF), width - 1)



def select_keys_torch(pending: torch.Tensor, keys: torch.Tensor, k: int,
                      order: torch.Tensor | None = None) -> torch.Tensor:
    """`select_pending_torch` from keys over the whole state: the same packed keys and
    one sorted topk per row, so the same selection in the same order (highest key
    first, ties to the lower index, the dump in unused slots), with shapes that do not
    depend on the data. `order` as in `select_pending_torch` (entries with
    ``order >= 0``)."""
    b, w = keys.shape
    cols = torch.arange(w, device=keys.device, dtype=torch.int64)
    high = sortable_key(keys)
    if order is not None:
        high = torch.where(order >= 0, 0x7F800000 + order, high)
    packed = ((high << 32) | (w - 1 - cols)).masked_fill(~pending, _INT64_MIN)
    top, _ = packed.topk(min(k, w), dim=1, sorted=True)
    return torch.where(top != _INT64_MIN, w - 1 - (top & 0xFFFFFFFF), w - 1)


def selection_keys(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None,
                   is_input: torch.Tensor, seed: int, t: int, step: int, *, policy_ms: bool,
                   noise: float = 0.0, input_random: bool = False, fill: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selection keys (SPEC 6, 8) of the entries at (`rows`, `cols`), int64 index
    tensors that broadcast: a list of pending entries (the engine's CPU path), or every
    column as ``[B, 1]`` x ``[1, W]`` (`selection_keys_torch`). The key math in one place.
    `values`: the entries' pre-spike potentials (MS), or their membranes (`fill`, MS);
    RS reads none (None). Pending entries: RS the `STREAM_RS_KEY` uniform; MS the
    potential as float32 (+ ``noise`` x the `STREAM_MOMENTUM_NOISE` uniform), inputs at
    +inf and, with `input_random`, their order keys (`rng.input_order_key`, -1 at
    neurons). `fill` (fill candidates, SPEC 8): MS V as float32, RS the `STREAM_FILL`
    uniform. Returns (keys float32, order int64 | None), shaped as the broadcast."""
    if fill:
        if policy_ms:
            return values.to(torch.float32), None
        return rng.uniform_at(seed, rng.STREAM_FILL, t, step, rows, cols), None
    if not policy_ms:
        return rng.uniform_at(seed, rng.STREAM_RS_KEY, t, step, rows, cols), None
    keys = values.to(torch.float32)
    if noise > 0:
        keys = keys + noise * rng.uniform_at(seed, rng.STREAM_MOMENTUM_NOISE, t, step, rows, cols)
    keys = keys.masked_fill(is_input[cols], math.inf)
    order = None
    if input_random:  # SPEC 6: inputs above every neuron, in the pass's order
        order = torch.where(is_input[cols], rng.input_order_key(seed, t, rows, cols), -1)
    return keys, order


def selection_keys_torch(values: torch.Tensor, is_input: torch.Tensor, seed: int, t: int, step: int, *,
                         policy_ms: bool, noise: float = 0.0, input_random: bool = False, fill: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`selection_keys` of every column: the key math of `select_keyed_torch` (and of
    the engine's sync-free path). `values`: [B, W] pre-spike potentials (MS) or, with
    `fill`, membranes. Returns (keys float32 [B, W], order int64 [B, W] | None)."""
    b, w = values.shape
    rows = torch.arange(b, device=values.device)[:, None]
    cols = torch.arange(w, device=values.device)[None, :]
    return selection_keys(rows, cols, values, is_input, seed, t, step, policy_ms=policy_ms, noise=noise,
                          input_random=input_random, fill=fill)


def fill_free_slots(sel: torch.Tensor, best: torch.Tensor, dump: int) -> torch.Tensor:
    """SPEC 8 fill_slots: the dump slots of a selection `sel` ``[B, K]`` take the fill
    candidates `best` ``[B, K]`` (best first, the dump after the last), the j-th free slot
    the j-th best, recorded as -1 - column."""
    free = sel == dump
    rank = (free.cumsum(1) - 1).clamp(min=0)  # the j-th free slot takes the j-th best
    filler = best.gather(1, rank)
    return torch.where(free & (filler != dump), -1 - filler, sel)


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


# --- Triton ---------------------------------------------------------------------------
# Rows up to this width are searched in registers by one program (16 int64 per thread
# at 4 warps); wider rows stream through blocks of _STREAM_BLOCK.
_ONE_BLOCK_MAX = 2048
_STREAM_BLOCK = 1024


def _config(width: int) -> dict:
    """Launch constants for a row width (also what tests/test_triton_compile.py builds).
    ptxas (CUDA 13) spills 8 bytes erratically for some (BLOCK, warps) pairs; these are
    the spill-free ones on sm_90 and sm_80 (registers sm_90/sm_80): one block of 2048
    at 4 warps 128/168, streaming at 8 warps 56/76; 8 warps at 2048 and 4 warps when
    streaming spilled, one block of 4096 needed 254 registers on sm_80."""
    if width <= _ONE_BLOCK_MAX:
        return dict(BLOCK=triton.next_power_of_2(width), ONE_BLOCK=True, DIGIT_BITS=1, num_warps=4)
    return dict(BLOCK=_STREAM_BLOCK, ONE_BLOCK=False, DIGIT_BITS=4, num_warps=8)


@jit
def _sortable(key):
    """float32 -> int32 with the same order (`sortable_key`): -0.0 becomes +0.0, then
    negative floats flip their low 31 bits. -0.0 is mapped on the bits: an `x + 0.0`
    could be folded away."""
    bits = key.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@jit
def _mapped_keys(p_row, k_row, offs, width):
    """uint32-ordered keys held in int64 [0, 2**32) for pending entries, -1 elsewhere
    (the order of `sortable_key`), from the pending flags `p_row` and float keys `k_row`."""
    inside = offs < width
    pend = tl.load(p_row + offs, mask=inside, other=0) != 0
    s = _sortable(tl.load(k_row + offs, mask=inside, other=0.0))
    return tl.where(pend, s.to(tl.int64) + 2147483648, -1)


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
    (`rng.counter_hash`). The key math of `selection_keys_torch`, and of the fused
    steps (`_row_keys`, `_fill_keys`)."""
    if FROM_VALUES:
        key = tl.load(val_row + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_NOISE:
            key = key + noise * _uniform_at_from_hash(h_key, b, cols)
    else:
        key = _uniform_at_from_hash(h_key, b, cols)
    if INPUTS_FIRST:
        inp = tl.load(is_input_ptr + cols, mask=inside, other=0) != 0
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
    pending entries. The fused steps' (kernels/steps_triton.py) and the streaming path
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
def _block_keys(a_row, b_row, offs, width, MAPPED: tl.constexpr):
    """Mapped keys of columns `offs` (-1 past `width` and where not pending): MAPPED,
    read from a row of mapped keys `a_row` (a scratch row); else mapped on the fly
    from the pending flags `a_row` and float keys `b_row`."""
    if MAPPED:
        return tl.load(a_row + offs, mask=offs < width, other=-1)
    else:
        return _mapped_keys(a_row, b_row, offs, width)


@jit
def _radix_threshold(a_row, b_row, u, width, k, n_pending, BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr,
                     ONE_BLOCK: tl.constexpr, MAPPED: tl.constexpr):
    """The radix search of every selection (this module's kernels and the fused
    steps' `_select_row` in kernels/steps_triton.py): the largest T with
    count(key >= T) >= k over the row's mapped keys, 0 (every pending entry) when at
    most k are pending. DIGIT_BITS bits per round; ONE_BLOCK: the keys are `u`, held
    in registers; else each round streams the row in blocks of BLOCK (`_block_keys`).
    Invariant: count(key >= prefix) >= k."""
    cols = tl.arange(0, BLOCK)
    digits = tl.arange(0, 1 << DIGIT_BITS).to(tl.int64)
    prefix = tl.zeros((), tl.int64)
    if n_pending > k:
        for r in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (r + 1)
            cand = prefix | (digits << shift)
            if ONE_BLOCK:
                counts = tl.sum((u[:, None] >= cand[None, :]).to(tl.int32), axis=0)
            else:
                counts = tl.zeros([1 << DIGIT_BITS], tl.int32)
                for start in range(0, width, BLOCK):
                    uu = _block_keys(a_row, b_row, start + cols, width, MAPPED)
                    counts += tl.sum((uu[:, None] >= cand[None, :]).to(tl.int32), axis=0)
            prefix = prefix | (tl.max(tl.where(counts >= k, digits, 0), axis=0) << shift)
    return prefix


@jit
def _take(a_row, b_row, u, o_row, width, k, kk, prefix, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
          MAPPED: tl.constexpr, PAD: tl.constexpr):
    """Write the selection of threshold `prefix` (`_radix_threshold`) to `o_row` in
    ascending index order: every entry above T, and of those equal to T the k -
    count(above) lowest-index ones (ties to the lower index); PAD: the dump W - 1 in
    slots [n_sel, kk). Keys as in `_radix_threshold`. Returns n_sel."""
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        n_above = tl.sum((u > prefix).to(tl.int32))
    else:
        n_above = 0
        for start in range(0, width, BLOCK):
            n_above += tl.sum((_block_keys(a_row, b_row, start + cols, width, MAPPED) > prefix).to(tl.int32))
    m = k - n_above
    n_sel = 0
    n_tied = 0
    for start in range(0, width, BLOCK):
        if ONE_BLOCK:
            uu = u
        else:
            uu = _block_keys(a_row, b_row, start + cols, width, MAPPED)
        tied = (uu == prefix).to(tl.int32)
        take = (uu > prefix) | ((tied != 0) & (n_tied + tl.cumsum(tied, axis=0) <= m))
        pos = n_sel + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(o_row + pos, (start + cols).to(tl.int64), mask=take)
        n_sel += tl.sum(take.to(tl.int32))
        n_tied += tl.sum(tied)
    if PAD:
        for start in range(0, kk, BLOCK):
            slot = start + cols
            tl.store(o_row + slot, tl.full([BLOCK], 0, tl.int64) + (width - 1),
                     mask=(slot >= n_sel) & (slot < kk))
    return n_sel


# Every int argument (width, k, kk, strides) is fixed for an engine's state: one
# compile per row-width class (`_config`).
@jit
def _select_kernel(pending_ptr, keys_ptr, out_ptr, width, k, kk, stride_p, stride_k, stride_o,
                   BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, DIGIT_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p_row = pending_ptr + row * stride_p
    k_row = keys_ptr + row * stride_k
    o_row = out_ptr + row * stride_o
    cols = tl.arange(0, BLOCK)

    # Threshold T: the largest value with count(u >= T) >= k (0 = every pending entry
    # when at most k are pending).
    if ONE_BLOCK:
        u = _mapped_keys(p_row, k_row, cols, width)
        n_pending = tl.sum((u >= 0).to(tl.int32))
    else:
        u = tl.zeros((), tl.int64)  # not read: each round streams the row
        n_pending = 0
        for start in range(0, width, BLOCK):
            n_pending += tl.sum((_mapped_keys(p_row, k_row, start + cols, width) >= 0).to(tl.int32))
    prefix = _radix_threshold(p_row, k_row, u, width, k, n_pending, BLOCK, DIGIT_BITS, ONE_BLOCK, False)
    _take(p_row, k_row, u, o_row, width, k, kk, prefix, BLOCK, ONE_BLOCK, False, True)


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
        kr = 0
        for start in range(0, kk, BLOCK):
            slot = start + cols
            sl = tl.load(s_row + slot, mask=slot < kk, other=0)
            kr += tl.sum(((sl == width - 1) & (slot < kk)).to(tl.int32))
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
        n_free = 0
        for start in range(0, kk, BLOCK):
            slot = start + cols
            inside = slot < kk
            sl = tl.load(s_row + slot, mask=inside, other=0)
            free = (sl == width - 1) & inside
            rank = n_free + tl.cumsum(free.to(tl.int32), axis=0) - 1
            has = free & (rank < n_sel)
            f = tl.load(f_row + rank, mask=has, other=0)
            tl.store(o_row + slot, tl.where(has, -1 - f, sl), mask=inside)
            n_free += tl.sum(free.to(tl.int32))
    else:
        _take(keys_row, keys_row, u, o_row, width, kr, kk, prefix, BLOCK, ONE_BLOCK, True, True)


def select_triton(pending: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of up to `k` pending entries per row, highest key first in rank.

    Args:
        pending: bool ``[B, W]``; the last column is the dump and is never pending.
        keys: float32 ``[B, W]`` priorities (no NaN; ``inf`` allowed).
        k: forward group size K >= 1.

    Returns:
        int64 ``[B, min(k, W)]`` flat indices; slots beyond the number of pending
        entries hold the dump index ``W - 1``. Order within a row is unspecified.
    """
    op = "select_triton"
    check_tensors(op, _select_kernel, pending=pending, keys=keys)
    check_shape(op, "keys", keys, (None, None))
    check_shape(op, "pending", pending, tuple(keys.shape))
    check_dtype(op, "pending", pending, (torch.bool,))
    if not keys.is_floating_point():
        raise TypeError(f"{op}: keys must be floating point, got {keys.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{op}: k must be an int >= 1, got {k!r}")
    b, width = keys.shape
    kk = min(k, width)
    out = torch.empty(b, kk, dtype=torch.int64, device=keys.device)
    if b == 0 or width == 0:
        return out
    keys = keys.to(torch.float32).contiguous()  # the twin ranks float32 keys too
    pending = pending.contiguous().view(torch.uint8)
    _select_kernel[(b,)](pending, keys, out, width, k, kk, pending.stride(0), keys.stride(0),
                         out.stride(0), **_config(width))
    return out


def select_keyed_triton(pending: torch.Tensor, values: torch.Tensor, is_input: torch.Tensor, k: int,
                        seed: int, t: int, step: int, *, policy_ms: bool, noise: float = 0.0,
                        input_random: bool = False, sel: torch.Tensor | None = None) -> torch.Tensor:
    """`select_keyed_torch` in one launch (one program per sample): the keys computed
    in the kernel from the flags, values and hashes (`_keys_block`), no [B, W] keys
    or order tensor, no topk. The same selected sets as the twin (ties to the lower
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
    cfg = _config(width)
    dev = pending.device
    # rows wider than one block: the scratch row of mapped keys (see the kernel)
    scratch = torch.empty((b, width) if not cfg["ONE_BLOCK"] else (1,), dtype=torch.int64, device=dev)
    fillers = torch.empty((b, kk) if fill else (1,), dtype=torch.int64, device=dev)
    sel = sel.contiguous() if fill else out  # (not read without fill)
    pending = pending.contiguous().view(torch.uint8)
    values = values.contiguous()
    is_input = is_input.contiguous().view(torch.uint8)
    stream = (rng.STREAM_FILL if not policy_ms else rng.STREAM_MOMENTUM_NOISE) if fill else \
        (rng.STREAM_MOMENTUM_NOISE if policy_ms else rng.STREAM_RS_KEY)
    input_random = bool(policy_ms and input_random and not fill)
    h_order = rng.counter_hash(seed, rng.STREAM_INPUT_ORDER, t, 0) if input_random else 0
    has_noise = bool(policy_ms and noise > 0 and not fill)
    _select_keyed_kernel[(b,)](
        pending, values, is_input, sel, out, scratch, fillers, width, k, kk, pending.stride(0),
        values.stride(0), sel.stride(0), out.stride(0), hash_arg(rng.counter_hash(seed, stream, t, step)),
        hash_arg(h_order), float(noise) if has_noise else 0.0,
        FROM_VALUES=bool(policy_ms), HAS_NOISE=has_noise, INPUTS_FIRST=bool(policy_ms and not fill),
        INPUT_RANDOM=input_random, FILL=fill, enable_fp_fusion=False, **cfg)  # no FMA: key + noise * u
    return out
