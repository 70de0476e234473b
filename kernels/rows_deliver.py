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

from ._triton import entry_block, jit, segment_mask, tl, triton
from .image_deliver import backward_launch, check_backward, check_forward, deliver_launch, map_position


def _features(src: torch.Tensor, in_shape: tuple[int, ...], pool: bool
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(feature index [E] (0 where invalid), valid bool [E], value scale)
    (`image_deliver.map_position`)."""
    if not pool:
        return src, torch.ones_like(src, dtype=torch.bool), 1.0
    _, h, w = in_shape
    c, y, x, hp, wp, valid = map_position(src, h, w, True)
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
# (BLOCK_E, BLOCK_OUT) per program, 4 warps; the two classes of `_blocks`: layers of at
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
# 1 - 0.75 * pool: 1.0 or 0.25, exact). Constexprs: the tile only, (BLOCK_E, BLOCK_OUT)
# in two classes by M (`_blocks`; never by e), so a network needs at most 2 variants of
# each kernel per dtype (VGG-7, one 10-way linear layer: 1).
_NOT_SPECIALISED = ("e", "m", "f", "h", "w", "width", "out_offset", "pool")


@jit(do_not_specialize=_NOT_SPECIALISED)
def _rows_deliver_kernel(vals_ptr, sample_ptr, src_ptr, w_ptr, cur_ptr, cnt_ptr, e, m, f, h, w, width,
                         out_offset, pool, seg_ptr, BLOCK_E: tl.constexpr, BLOCK_OUT: tl.constexpr,
                         SEGMENT: tl.constexpr):
    es, live_e, _ = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 1)
    ms = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0) * (1.0 - 0.75 * pool)
    s = tl.load(sample_ptr + es, mask=live_e, other=0).to(tl.int64)
    feat, ok = _feature(tl.load(src_ptr + es, mask=live_e, other=0).to(tl.int64), h, w, pool)
    mask = (ok & live_e)[:, None] & (ms < m)[None, :]
    live = mask & (v != 0)[:, None]
    tgt = (s * width + out_offset)[:, None] + ms[None, :]
    wt = tl.load(w_ptr + ms.to(tl.int64)[None, :] * f + feat[:, None], mask=live, other=0.0)
    tl.atomic_add(cur_ptr + tgt, wt * v[:, None], mask=live, sem="relaxed")
    tl.atomic_add(cnt_ptr + tgt, tl.full([BLOCK_E, BLOCK_OUT], 1, tl.int32), mask=mask, sem="relaxed")


# As `_rows_deliver_kernel`, and n_mb (target blocks) by layer.
@jit(do_not_specialize=_NOT_SPECIALISED + ("n_mb",))
def _rows_deliver_backward_kernel(grad_ptr, vals_ptr, sample_ptr, src_ptr, w_ptr, part_ptr, gw_ptr, e, m, f,
                                  h, w, width, out_offset, n_mb, pool, seg_ptr, BLOCK_E: tl.constexpr,
                                  BLOCK_OUT: tl.constexpr, ATOMIC_WEIGHT: tl.constexpr, SEGMENT: tl.constexpr):
    pid_m = tl.program_id(1)
    es, live_e, _ = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 1)
    ms = pid_m * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
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
# the segments come in tensors. Constexpr: BLOCK_OUT, as in the kernels above.
@jit(do_not_specialize=("m", "f", "width", "out_offset", "pool"))
def _rows_weight_grad_kernel(grad_ptr, vals_ptr, sample_ptr, rows_ptr, order_ptr, seg_end_ptr, gw_ptr, m, f,
                             width, out_offset, pool, BLOCK_OUT: tl.constexpr):
    """Deterministic grad_weight: program i owns the segment of feature-sorted entries
    that starts at i (if one does) and sums it in order into ``W[m-block, feature]``."""
    i = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row = tl.load(rows_ptr + i)
    prev = tl.load(rows_ptr + i - 1, mask=i > 0, other=-1)
    if (row != prev) & (row < f):
        end = tl.load(seg_end_ptr + i)
        acc = tl.zeros([BLOCK_OUT], dtype=gw_ptr.dtype.element_ty)
        for j in range(i, end):
            ent = tl.load(order_ptr + j)
            v = tl.load(vals_ptr + ent) * (1.0 - 0.75 * pool)
            s = tl.load(sample_ptr + ent).to(tl.int64)
            acc += tl.load(grad_ptr + s * width + out_offset + ms, mask=ms < m, other=0.0) * v
        tl.store(gw_ptr + ms.to(tl.int64) * f + row, acc, mask=ms < m)


def _blocks(e: int, m: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_OUT) for a layer: `_NARROW` (16 x 32) for M <= 32 (output layers: 10
    or 20 classes), else `_WIDE` (4 x 256). Two classes, not one per power of two of M
    (each class is a compiled variant); not a function of the entry count `e` (as in
    kernels/conv_deliver.py)."""
    return _NARROW if m <= _NARROW[1] else _WIDE


def _geometry(op: str, weight: torch.Tensor, in_shape, pool: bool, out_offset: int, width: int
              ) -> tuple[int, int]:
    """(H, W) of the source map (1, 1 for flat sources: the feature is the source),
    checked against the weight and the state width."""
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
    return h, w


def rows_deliver_triton(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                        weight: torch.Tensor, in_shape: tuple[int, ...], pool: bool,
                        out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                        segment: torch.Tensor | None = None) -> None:
    """`rows_deliver_torch` in one launch: the same arguments and effect (the currents'
    float atomics add in a run-dependent order: see the module docstring)."""
    op = "rows_deliver_triton"
    entries = check_forward(op, _rows_deliver_kernel, vals, sample, src, weight, current, counts, segment,
                            (None, None))
    hw = _geometry(op, weight, in_shape, pool, out_offset, current.shape[1])
    deliver_launch(_rows_deliver_kernel, _blocks(0, weight.shape[0]), entries, hw, pool, out_offset, current, counts,
                   segment)


def rows_deliver_backward_triton(grad_current: torch.Tensor, vals: torch.Tensor,
                                 sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                 in_shape: tuple[int, ...], pool: bool, out_offset: int,
                                 segment: torch.Tensor | None = None, *,
                                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows_deliver_backward_torch` with Triton: the same arguments and results, and
    `deterministic`: sum each input feature's weight gradient in a fixed order (bitwise
    reproducible) instead of with float atomics (see the module docstring)."""
    op = "rows_deliver_backward_triton"
    grad_current, entries = check_backward(op, _rows_deliver_backward_kernel, grad_current, vals, sample, src,
                                           weight, segment, (None, None))
    hw, (m, f) = _geometry(op, weight, in_shape, pool, out_offset, grad_current.shape[1]), weight.shape
    block_out = _blocks(0, m)[1]

    def groups(src):  # the input feature; pooled sources that reach nobody: past the last
        feat, valid, _ = _features(src, in_shape, pool)
        return torch.where(valid, feat, f), f

    def weight_grad(rows, order, seg_end, grad_w):
        _rows_weight_grad_kernel[(rows.shape[0], triton.cdiv(m, block_out))](
            grad_current, entries[0], entries[1], rows, order, seg_end, grad_w, m, f, grad_current.shape[1],
            out_offset, int(bool(pool)), BLOCK_OUT=block_out)

    return backward_launch(_rows_deliver_backward_kernel, _blocks(0, m), grad_current, entries, hw, pool, out_offset,
                           segment, deterministic, groups, weight_grad)
