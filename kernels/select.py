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

The keyed select (the keys computed in the kernel from the state, the engine's
sync-free path) is kernels/select_keyed.py; it shares this module's radix
search (`_radix_threshold`, `_take`) and key mapping (`_sortable`).
"""

from __future__ import annotations

import math

import torch

from . import rng
from ._triton import check_dtype, check_shape, check_tensors, jit, tl, triton

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
