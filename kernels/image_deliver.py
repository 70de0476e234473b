"""What the two deliveries of convolutional networks share (`kernels/conv_deliver.py`,
`kernels/rows_deliver.py`): the geometry of an image map (where a source lands after
a folded pooling, the 3x3 window of a position) and the launchers' argument checks and
launch sequences.

Geometry (torch, ints or broadcasting int64 tensors): `map_position` and `window` are
the one description of a conv map's targets; the conv twins, `asynctrain/conv.py`
(fan-out, fan-in, the listed receivers of the sync-free steps) and the rows twins read
them. The Triton kernels compute the same per entry (`conv_deliver._source`,
`rows_deliver._feature`), tested against the twins.

Launch (`deliver_launch`, `backward_launch`): both kinds' kernels take the same
arguments in the same order -- entries (vals, sample, src), the weight, the buffers,
the entry count, the weight's two leading sizes (C_out, C_in or M, F), the source
map's H and W, the state width, the target offset, (backward: the number of target
blocks), the pooling flag and the segment -- and tile (entry block x BLOCK_OUT block
of the weight's first dimension), so one launcher body serves both.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._triton import (check_accumulators, check_dtype, check_segment, check_shape, check_tensors, segment_arg,
                      segment_live, triton)

FLOATS = (torch.float32, torch.float64)
INDEX = (torch.int32, torch.int64)


def map_position(src, h, w, pool):
    """Where flat sources ``src = c * h * w + y * w + x`` of an ``h x w`` map reach the
    map their weight layer reads: (channel, y, x, h', w', inside). `pool` (0 / 1, or
    bool): a folded 2x2 average pooling halves positions and sizes, and the last row
    or column of an odd size reaches nobody (inside False; True everywhere else).
    `h`, `w`, `pool` are ints or int64 tensors broadcasting with `src`."""
    pool = pool.long() if isinstance(pool, torch.Tensor) else int(pool)
    hw = h * w
    c, rem = src // hw, src % hw
    y, x = (rem // w) >> pool, (rem % w) >> pool
    hp, wp = h >> pool, w >> pool
    return c, y, x, hp, wp, (y < hp) & (x < wp)


def _last(v):
    return v[..., None] if isinstance(v, torch.Tensor) else v


def window(y: torch.Tensor, x: torch.Tensor, h, w) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 window (stride 1, padding 1) of positions (y, x) of an ``h x w`` map
    (``[...]`` int64; `h`, `w` ints or broadcasting tensors): tap t = ky * 3 + kx (the
    order of ``W.view(C_out, C_in, 9)``) reaches (y + 1 - ky, x + 1 - kx), as
    ``torch.nn.functional.conv2d`` correlates. Returns (spatial target ``[..., 9]``,
    0 where outside; inside bool ``[..., 9]``)."""
    t = torch.arange(9, device=y.device)
    oy = y[..., None] + 1 - t // 3
    ox = x[..., None] + 1 - t % 3
    h, w = _last(h), _last(w)
    ok = (oy >= 0) & (oy < h) & (ox >= 0) & (ox < w)
    return torch.where(ok, oy * w + ox, 0), ok


def check_entries(op: str, kernel, vals, sample, src, weight, weight_shape: tuple, **buffers):
    """The checks both kinds' launchers share: devices, the entry arrays ``[E]`` (vals
    float, sample / src int32 or int64), a weight of the vals' dtype and `weight_shape`
    (`check_shape`).
    Returns (vals, sample, src, weight) contiguous."""
    check_tensors(op, kernel, vals=vals, sample=sample, src=src, weight=weight, **buffers)
    check_dtype(op, "vals", vals, FLOATS)
    check_shape(op, "vals", vals, (None,))
    e = vals.shape[0]
    check_shape(op, "sample", sample, (e,))
    check_shape(op, "src", src, (e,))
    check_dtype(op, "sample", sample, INDEX)
    check_dtype(op, "src", src, INDEX)
    check_dtype(op, "weight", weight, (vals.dtype,))
    check_shape(op, "weight", weight, weight_shape)
    return vals.contiguous(), sample.contiguous(), src.contiguous(), weight.contiguous()


def deliver_launch(kernel, tile: tuple[int, int], entries: tuple, hw: tuple[int, int], pool: bool,
                   out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                   segment: torch.Tensor | None) -> None:
    """Launch a checked forward delivery over (entry blocks, BLOCK_OUT blocks of the
    weight's first dimension), adding into `current` and `counts` in place."""
    vals, sample, src, weight = entries
    e, n_out = vals.shape[0], weight.shape[0]
    if e == 0 or n_out == 0:
        return
    block_e, block_out = tile
    grid = (triton.cdiv(e, block_e), triton.cdiv(n_out, block_out))
    kernel[grid](vals, sample, src, weight, current, counts, e, n_out, weight.shape[1], *hw, current.shape[1],
                 out_offset, int(bool(pool)), segment_arg(segment, sample), BLOCK_E=block_e, BLOCK_OUT=block_out,
                 SEGMENT=segment is not None)


def check_forward(op: str, kernel, vals, sample, src, weight, current, counts, segment, weight_shape: tuple):
    """`check_entries` and the forward's buffers: ``[B, W]`` contiguous current of the
    vals' dtype, int32 counts, the segment. Returns the contiguous entries."""
    check_shape(op, "current", current, (None, None))
    entries = check_entries(op, kernel, vals, sample, src, weight, weight_shape, current=current, counts=counts)
    check_accumulators(op, current, counts, entries[0].dtype)
    check_segment(op, segment, entries[0].device)
    return entries


def check_backward(op: str, kernel, grad_current, vals, sample, src, weight, segment, weight_shape: tuple):
    """`check_entries` and the backward's `grad_current` ``[B, W]`` of the vals' dtype.
    Returns (grad_current contiguous, the contiguous entries)."""
    check_shape(op, "grad_current", grad_current, (None, None))
    entries = check_entries(op, kernel, vals, sample, src, weight, weight_shape, grad_current=grad_current)
    check_dtype(op, "grad_current", grad_current, (entries[0].dtype,))
    check_segment(op, segment, entries[0].device)
    return grad_current.contiguous(), entries


def backward_launch(kernel, tile: tuple[int, int], grad_current: torch.Tensor, entries: tuple,
                    hw: tuple[int, int], pool: bool, out_offset: int, segment: torch.Tensor | None,
                    deterministic: bool, groups: Callable[[torch.Tensor], tuple[torch.Tensor, int]],
                    weight_grad: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a checked backward: grad_vals from per-block partials summed in a fixed
    order, grad_weight by float atomics or (`deterministic`) by `weight_grad`.

    `groups(src)` -> (the weight-gradient group of each entry (conv: its input
    channel, rows: its input feature), int64 ``[E]``; the number of groups G), with G
    for entries that reach nobody. `weight_grad(rows, order, seg_end, grad_w)`
    launches the deterministic kernel over the group-sorted entries."""
    vals, sample, src, weight = entries
    e, n_out = vals.shape[0], weight.shape[0]
    grad_w = torch.zeros_like(weight)
    if e == 0 or n_out == 0:
        return torch.zeros_like(vals), grad_w
    block_e, block_out = tile
    n_blocks = triton.cdiv(n_out, block_out)
    # segmented: the kernel writes the segment's rows only, the rest stays 0
    part = (torch.empty if segment is None else torch.zeros)(e, n_blocks, dtype=vals.dtype, device=vals.device)
    kernel[(triton.cdiv(e, block_e), n_blocks)](
        grad_current, vals, sample, src, weight, part, grad_w, e, n_out, weight.shape[1], *hw,
        grad_current.shape[1], out_offset, n_blocks, int(bool(pool)), segment_arg(segment, sample),
        BLOCK_E=block_e, BLOCK_OUT=block_out, ATOMIC_WEIGHT=not deterministic, SEGMENT=segment is not None)
    grad_vals = part.sum(1) if n_blocks > 1 else part.view(e)
    if deterministic:
        # zero-valued entries, entries that reach nobody and those outside the segment
        # add nothing: they take the group past the last, one run that no program sums
        group, n_groups = groups(src.to(torch.int64))
        summed = vals != 0
        if segment is not None:
            summed = summed & segment_live(segment, e, vals.device)
        rows, order = torch.sort(torch.where(summed, group, n_groups), stable=True)
        weight_grad(rows, order, torch.searchsorted(rows, rows, right=True), grad_w)
    return grad_vals, grad_w
