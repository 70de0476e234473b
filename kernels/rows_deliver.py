"""Rows deliver: the currents one forward step sends through a fully connected layer
of a convolutional network (``nn.Flatten`` -> ``nn.Linear``, possibly behind a folded
2x2 average pooling, SPEC 1), and the backward of that.

Source ``j`` of the previous layer reads input feature ``f(j)`` of the linear layer:
``f(j) = j`` without pooling (``nn.Flatten`` keeps the channel-major order of the flat
index), ``c * (H//2) * (W//2) + (y//2) * (W//2) + x//2`` with pooling, value / 4 (rows
and columns dropped by the floor of an odd size reach nobody). It reaches every
neuron of the next layer with weight ``W[:, f(j)]``. Unlike `kernels/deliver.py`, no
``[N + 1, F]`` table is built: the rows are gathered from ``W`` itself, so the pooling
never multiplies the table by 4.

Entries, buffers, what is kept and the optional ``segment`` (start, count) of the
sync-free mode are as in `kernels/conv_deliver.py`.

Triton (`rows_deliver_triton`, `rows_deliver_backward_triton`, same signatures as the
twins): programs tile (entry block, target block); a tile gathers ``W[m, f(j)]`` (a
column of the row-major weight: strided, but copying ``W.t()`` per step would move
all M x F weights to read E x M of them) and scatters into the entry's sample row.
Ordering and determinism as in `kernels/conv_deliver.py`: float atomics forward
(order nondeterministic, counts exact), grad_vals from per-block partials summed in a
fixed order, grad_weight by float atomics or, with ``deterministic=True``, by one
program per (feature, target block) summing its entries in order. Supported dtypes
and the unchecked index ranges are those of `kernels/conv_deliver.py`.
"""

from __future__ import annotations

import math

import torch

from ._triton import (check_accumulators, check_dtype, check_segment, check_shape, check_tensors, entry_block,
                      jit, segment_arg, segment_live, segment_mask, tl, triton)


def _features(src: torch.Tensor, in_shape: tuple[int, ...], pool: bool
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(feature index [E] (0 where invalid), valid bool [E], value scale)."""
    if not pool:
        return src, torch.ones_like(src, dtype=torch.bool), 1.0
    _, h, w = in_shape
    c, rem = src // (h * w), src % (h * w)
    y, x, hp, wp = rem // w // 2, rem % w // 2, h // 2, w // 2
    valid = (y < hp) & (x < wp)
    return torch.where(valid, c * hp * wp + y * wp + x, 0), valid, 0.25


def rows_deliver_torch(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                       weight: torch.Tensor, in_shape: tuple[int, ...], pool: bool,
                       out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                       segment: torch.Tensor | None = None) -> None:
    """Add the currents and received counts of E delivered entries (in place).

    Args:
        vals: ``[E]`` delivered outbox values (a zero value still counts as received).
        sample: int64 ``[E]`` batch row of each entry.
        src: int64 ``[E]`` source index inside its layer (channel-major for images).
        weight: ``[M, F]`` linear weight.
        in_shape: shape of the source layer, ``(n,)`` or ``(C, H, W)``.
        pool: a 2x2 average pooling sits between the source layer and the linear layer.
        out_offset: flat index of the target layer's first neuron.
        current: ``[B, W]`` float, += the currents.
        counts: ``[B, W]`` int32, += number of entries that reached each column.
        segment: int64 ``[2]`` (start, count) on the entries' device, or None (all):
            only entries [start, start + count) deliver; the others add nothing.
    """
    m = weight.shape[0]
    vals, sample, src, live = segment_mask(segment, vals, sample, src)
    f, valid, scale = _features(src, in_shape, pool)
    if live is not None:
        valid = valid & live
    rows = weight.t()[f] * torch.where(valid, vals * scale, 0.0)[:, None]      # [E, M]
    current[:, out_offset:out_offset + m].index_add_(0, sample, rows)
    per_sample = torch.zeros(current.shape[0], dtype=counts.dtype, device=counts.device)
    per_sample.index_add_(0, sample, valid.to(counts.dtype))
    counts[:, out_offset:out_offset + m] += per_sample[:, None]


def rows_deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor,
                                sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                in_shape: tuple[int, ...], pool: bool, out_offset: int,
                                segment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rows_deliver_torch`'s current w.r.t. the values and the weight.

    Returns: grad_vals ``[E]`` (0 outside the segment); grad_weight ``[M, F]``.
    """
    m = weight.shape[0]
    vals, sample, src, live = segment_mask(segment, vals, sample, src)
    f, valid, scale = _features(src, in_shape, pool)
    if live is not None:
        valid = valid & live
    g = grad_current[sample, out_offset:out_offset + m]                     # [E, M]
    grad_vals = torch.where(valid, (g * weight.t()[f]).sum(1) * scale, 0.0)
    grad_t = weight.new_zeros(weight.shape[1], m)
    grad_t.index_add_(0, f, g * torch.where(valid, vals * scale, 0.0)[:, None])
    return grad_vals, grad_t.t()


# --- Triton ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
# (BLOCK_E, BLOCK_M) per program, 4 warps; the two classes of `_blocks`: layers of at
# most 32 neurons, and all wider ones. sm_90 cubins of the forward (fp32; runtime
# pool): 4 x 256 takes 48 registers, 16 x 32 55, 32 x 32 77 (a thread then holds eight
# entries' int64 state); 8 x 256 took 100.
_NARROW = (16, 32)
_WIDE = (4, 256)


@jit
def _feature(src, h, w, pool):
    """(input feature of the linear layer, reaches anybody) of flat sources. `pool` is 0
    or 1; halving a non-negative coordinate or size is a shift by it. Unpooled, the
    launcher passes h = w = 1, so the feature is `src` itself (and reaches everybody)."""
    hw = h * w
    c = src // hw
    rem = (src - c * hw).to(tl.int32)
    row = rem // w
    y = row >> pool
    x = (rem - row * w) >> pool
    hp = h >> pool
    wp = w >> pool
    ok = (y < hp) & (x < wp)
    return tl.where(ok, c * (hp * wp) + y * wp + x, 0), ok


# Compiled variants: one per dtype (floats, indices) and target tile, whatever the layer.
# No int argument is specialised on: e changes every step, the layer sizes (m, f, h, w,
# out_offset; n_mb) and the pooling flag `pool` (0 / 1) from layer to layer; as in
# kernels/conv_deliver.py, `pool` is used branch-free (shifts, and values scaled by
# 1 - 0.75 * pool: 1.0 or 0.25, exact). Constexprs: the tile only, (BLOCK_E, BLOCK_M)
# in two classes by M (`_blocks`; never by e), so a network needs at most 2 variants of
# each kernel per dtype (VGG-7, one 10-way linear layer: 1).
_NOT_SPECIALISED = ("e", "m", "f", "h", "w", "width", "out_offset", "pool")


@jit(do_not_specialize=_NOT_SPECIALISED)
def _rows_deliver_kernel(vals_ptr, sample_ptr, src_ptr, w_ptr, cur_ptr, cnt_ptr, e, m, f, h, w, width,
                         out_offset, pool, seg_ptr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                         SEGMENT: tl.constexpr):
    es, live_e, _ = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 1)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0) * (1.0 - 0.75 * pool)
    s = tl.load(sample_ptr + es, mask=live_e, other=0).to(tl.int64)
    feat, ok = _feature(tl.load(src_ptr + es, mask=live_e, other=0).to(tl.int64), h, w, pool)
    mask = (ok & live_e)[:, None] & (ms < m)[None, :]
    live = mask & (v != 0)[:, None]
    tgt = (s * width + out_offset)[:, None] + ms[None, :]
    wt = tl.load(w_ptr + ms.to(tl.int64)[None, :] * f + feat[:, None], mask=live, other=0.0)
    tl.atomic_add(cur_ptr + tgt, wt * v[:, None], mask=live, sem="relaxed")
    tl.atomic_add(cnt_ptr + tgt, tl.full([BLOCK_E, BLOCK_M], 1, tl.int32), mask=mask, sem="relaxed")


# As `_rows_deliver_kernel`, and n_mb (target blocks) by layer.
@jit(do_not_specialize=_NOT_SPECIALISED + ("n_mb",))
def _rows_deliver_backward_kernel(grad_ptr, vals_ptr, sample_ptr, src_ptr, w_ptr, part_ptr, gw_ptr, e, m, f,
                                  h, w, width, out_offset, n_mb, pool, seg_ptr, BLOCK_E: tl.constexpr,
                                  BLOCK_M: tl.constexpr, ATOMIC_WEIGHT: tl.constexpr, SEGMENT: tl.constexpr):
    pid_m = tl.program_id(1)
    es, live_e, _ = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0) * (1.0 - 0.75 * pool)
    s = tl.load(sample_ptr + es, mask=live_e, other=0).to(tl.int64)
    feat, ok = _feature(tl.load(src_ptr + es, mask=live_e, other=0).to(tl.int64), h, w, pool)
    mask = (ok & live_e)[:, None] & (ms < m)[None, :]
    at = ms.to(tl.int64)[None, :] * f + feat[:, None]
    g = tl.load(grad_ptr + (s * width + out_offset)[:, None] + ms[None, :], mask=mask, other=0.0)
    # zero-valued entries still get d/dvals (barrier messages and silent neurons do)
    part = tl.sum(g * tl.load(w_ptr + at, mask=mask, other=0.0), axis=1)
    tl.store(part_ptr + es * n_mb + pid_m, part * (1.0 - 0.75 * pool), mask=live_e)
    if ATOMIC_WEIGHT:
        tl.atomic_add(gw_ptr + at, g * v[:, None], mask=mask & (v != 0)[:, None], sem="relaxed")


# The layer sizes and `pool` are not specialised on (one variant per layer otherwise);
# the segments come in tensors. Constexpr: BLOCK_M, as in the kernels above.
@jit(do_not_specialize=("m", "f", "width", "out_offset", "pool"))
def _rows_weight_grad_kernel(grad_ptr, vals_ptr, sample_ptr, rows_ptr, order_ptr, seg_end_ptr, gw_ptr, m, f,
                             width, out_offset, pool, BLOCK_M: tl.constexpr):
    """Deterministic grad_weight: program i owns the segment of feature-sorted entries
    that starts at i (if one does) and sums it in order into ``W[m-block, feature]``."""
    i = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.load(rows_ptr + i)
    prev = tl.load(rows_ptr + i - 1, mask=i > 0, other=-1)
    if (row != prev) & (row < f):
        end = tl.load(seg_end_ptr + i)
        acc = tl.zeros([BLOCK_M], dtype=gw_ptr.dtype.element_ty)
        for j in range(i, end):
            ent = tl.load(order_ptr + j)
            v = tl.load(vals_ptr + ent) * (1.0 - 0.75 * pool)
            s = tl.load(sample_ptr + ent).to(tl.int64)
            acc += tl.load(grad_ptr + s * width + out_offset + ms, mask=ms < m, other=0.0) * v
        tl.store(gw_ptr + ms.to(tl.int64) * f + row, acc, mask=ms < m)


def _blocks(e: int, m: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_M) for a layer: `_NARROW` (16 x 32) for M <= 32 (output layers: 10
    or 20 classes), else `_WIDE` (4 x 256). Two classes, not one per power of two of M
    (each class is a compiled variant); not a function of the entry count `e` (as in
    kernels/conv_deliver.py)."""
    return _NARROW if m <= _NARROW[1] else _WIDE


def _check(op, kernel, vals, sample, src, weight, in_shape, pool, out_offset, width, **buffers):
    """Validate the arguments shared by both launchers; returns (vals, sample, src,
    weight) contiguous and (H, W) (1, 1 for flat sources)."""
    check_tensors(op, kernel, vals=vals, sample=sample, src=src, weight=weight, **buffers)
    check_dtype(op, "vals", vals, _FLOATS)
    check_shape(op, "vals", vals, (None,))
    e = vals.shape[0]
    check_shape(op, "sample", sample, (e,))
    check_shape(op, "src", src, (e,))
    check_dtype(op, "sample", sample, _INDEX)
    check_dtype(op, "src", src, _INDEX)
    check_dtype(op, "weight", weight, (vals.dtype,))
    check_shape(op, "weight", weight, (None, None))
    m, f = weight.shape
    in_shape = tuple(int(n) for n in in_shape)
    if pool:
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"{op}: pool=True needs in_shape (C, H, W), got {in_shape}")
        c, h, w = in_shape
        n_feat = c * (h // 2) * (w // 2)
    else:
        h = w = 1
        n_feat = math.prod(in_shape)
    if n_feat != f:
        raise ValueError(f"{op}: weight has {f} input features but in_shape {in_shape} (pool={pool}) "
                         f"gives {n_feat}")
    if not 0 <= out_offset <= width - m:
        raise ValueError(f"{op}: out_offset {out_offset} + {m} targets do not fit in a buffer of width {width}")
    return (vals.contiguous(), sample.contiguous(), src.contiguous(), weight.contiguous()), (h, w)


def rows_deliver_triton(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                        weight: torch.Tensor, in_shape: tuple[int, ...], pool: bool,
                        out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                        segment: torch.Tensor | None = None) -> None:
    """Add the currents and received counts of E delivered entries (in place).

    Args:
        vals: ``[E]`` delivered outbox values (a zero value still counts as received).
        sample: int64 ``[E]`` batch row of each entry.
        src: int64 ``[E]`` source index inside its layer (channel-major for images).
        weight: ``[M, F]`` linear weight.
        in_shape: shape of the source layer, ``(n,)`` or ``(C, H, W)``.
        pool: a 2x2 average pooling sits between the source layer and the linear layer.
        out_offset: flat index of the target layer's first neuron.
        current: ``[B, W]`` float, += the currents.
        counts: ``[B, W]`` int32, += number of entries that reached each column.
        segment: int64 ``[2]`` (start, count) on the entries' device, or None (all):
            only entries [start, start + count) deliver; the others add nothing.
    """
    op = "rows_deliver_triton"
    check_shape(op, "current", current, (None, None))
    b, width = current.shape
    (vals, sample, src, weight), (h, w) = _check(op, _rows_deliver_kernel, vals, sample, src, weight,
                                                 in_shape, pool, out_offset, width, current=current,
                                                 counts=counts)
    check_accumulators(op, current, counts, vals.dtype)
    check_segment(op, segment, vals.device)
    e, (m, f) = vals.shape[0], weight.shape
    if e == 0 or m == 0:
        return
    block_e, block_m = _blocks(e, m)
    grid = (triton.cdiv(e, block_e), triton.cdiv(m, block_m))
    _rows_deliver_kernel[grid](vals, sample, src, weight, current, counts, e, m, f, h, w, width, out_offset,
                               int(bool(pool)), segment_arg(segment, sample), BLOCK_E=block_e, BLOCK_M=block_m,
                               SEGMENT=segment is not None)


def rows_deliver_backward_triton(grad_current: torch.Tensor, vals: torch.Tensor,
                                 sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                 in_shape: tuple[int, ...], pool: bool, out_offset: int,
                                 segment: torch.Tensor | None = None, *,
                                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rows_deliver_torch`'s current w.r.t. the values and the weight.

    Args: grad_current ``[B, W]``; the rest as in `rows_deliver_torch`.
        deterministic: sum each input feature's weight gradient in a fixed order
            (bitwise reproducible) instead of with float atomics (see module doc).

    Returns: grad_vals ``[E]`` (0 outside the segment); grad_weight ``[M, F]``.
    """
    op = "rows_deliver_backward_triton"
    check_shape(op, "grad_current", grad_current, (None, None))
    width = grad_current.shape[1]
    (vals, sample, src, weight), (h, w) = _check(op, _rows_deliver_backward_kernel, vals, sample, src,
                                                 weight, in_shape, pool, out_offset, width,
                                                 grad_current=grad_current)
    check_dtype(op, "grad_current", grad_current, (vals.dtype,))
    check_segment(op, segment, vals.device)
    grad_current = grad_current.contiguous()
    e, (m, f) = vals.shape[0], weight.shape
    grad_w = torch.zeros_like(weight)
    if e == 0 or m == 0:
        return torch.zeros_like(vals), grad_w
    block_e, block_m = _blocks(e, m)
    n_mb = triton.cdiv(m, block_m)
    # segmented: the kernel writes the segment's rows only, the rest stays 0
    part = (torch.empty if segment is None else torch.zeros)(e, n_mb, dtype=vals.dtype, device=vals.device)
    _rows_deliver_backward_kernel[(triton.cdiv(e, block_e), n_mb)](
        grad_current, vals, sample, src, weight, part, grad_w, e, m, f, h, w, width, out_offset, n_mb,
        int(bool(pool)), segment_arg(segment, sample), BLOCK_E=block_e, BLOCK_M=block_m,
        ATOMIC_WEIGHT=not deterministic, SEGMENT=segment is not None)
    grad_vals = part.sum(1) if n_mb > 1 else part.view(e)
    if deterministic:
        # zero-valued entries, pooled sources that reach nobody (and entries outside
        # the segment) add nothing: give them a feature past the last so they form one
        # segment that no program sums
        feat, valid, _ = _features(src.to(torch.int64), in_shape, pool)
        summed = (vals != 0) & valid
        if segment is not None:
            summed = summed & segment_live(segment, e, vals.device)
        rows = torch.where(summed, feat, f)
        rows, order = torch.sort(rows, stable=True)
        seg_end = torch.searchsorted(rows, rows, right=True)
        _rows_weight_grad_kernel[(e, n_mb)](grad_current, vals, sample, rows, order, seg_end, grad_w, m, f,
                                            width, out_offset, int(bool(pool)), BLOCK_M=block_m)
    return grad_vals, grad_w
