"""Conv deliver: the currents one forward step sends through a 3x3 convolution
(stride 1, padding 1), optionally behind a folded 2x2 average pooling (SPEC 1), and
the backward of that.

A convolutional source's fan-out cannot be tabulated in the flat index space (VGG-7:
65536 sources x 576 targets), so targets are computed from the source's position.
Source ``(c, y, x)`` of a ``[C_in, H, W]`` layer (pooled: the input position
``(c, y // 2, x // 2)`` of a ``[C_in, H // 2, W // 2]`` map, value / 4; rows and columns
dropped by the floor of an odd size reach nobody) reaches target ``(o, y + 1 - ky,
x + 1 - kx)`` with weight ``W[o, c, ky, kx]`` for every ``o, ky, kx`` whose target lies
inside the map (cross-correlation, as ``torch.nn.functional.conv2d``). So one
delivery gathers the ``W[:, c]`` slice (``[C_out, 3, 3]``) and adds it into the window;
targets outside the map are sent to the dump column with a zero value and are not
counted.

The inputs are lists of E delivered entries ``(sample, source, value)`` of one source
layer (the engine splits a step's [B, K] selection per layer). The forward writes into
the caller's [B, W] buffers in place (a Triton kernel does the same with atomics) and
keeps nothing; the backward recomputes the windows (E x C_out x 9 index arithmetic is
cheaper than keeping a float and an int64 per target per step).

The Triton kernel is a later issue; these are the twins it will be checked against.
"""

from __future__ import annotations

import torch


def _window(src: torch.Tensor, in_shape: tuple[int, int, int], pool: bool, c_out: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Targets of entries: (channel c [E], local target [E, C_out, 3, 3] int64 (-1 outside
    the map), valid bool [E, 1, 3, 3], value scale)."""
    c_in, h, w = in_shape
    c, rem = src // (h * w), src % (h * w)
    y, x = rem // w, rem % w
    if pool:
        y, x, h, w = y // 2, x // 2, h // 2, w // 2
    inside = (y < h) & (x < w)                                  # pooled odd sizes drop the last row/col
    taps = torch.arange(2, -1, -1, device=src.device)          # 1 - ky + 1 for ky = 0, 1, 2
    oy = y[:, None] + taps - 1                                  # [E, 3]: row reached by ky
    ox = x[:, None] + taps - 1
    ok_y = (oy >= 0) & (oy < h) & inside[:, None]
    ok_x = (ox >= 0) & (ox < w)
    valid = (ok_y[:, :, None] & ok_x[:, None, :])[:, None]     # [E, 1, 3, 3]
    pos = (oy[:, :, None] * w + ox[:, None, :])[:, None]       # [E, 1, 3, 3]
    chan = torch.arange(c_out, device=src.device).view(1, c_out, 1, 1) * (h * w)
    target = torch.where(valid, pos + chan, -1)
    return c, target, valid, (0.25 if pool else 1.0)


def conv_deliver_torch(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                       weight: torch.Tensor, in_shape: tuple[int, int, int], pool: bool,
                       out_offset: int, current: torch.Tensor, counts: torch.Tensor) -> None:
    """Add the currents and received counts of E delivered entries (in place).

    Args:
        vals: ``[E]`` delivered outbox values (a zero value still counts as received).
        sample: int64 ``[E]`` batch row of each entry.
        src: int64 ``[E]`` source index inside its layer, ``c * H * W + y * W + x``.
        weight: ``[C_out, C_in, 3, 3]`` conv weight.
        in_shape: ``(C_in, H, W)`` of the source layer (before pooling).
        pool: a 2x2 average pooling sits between the source layer and the conv.
        out_offset: flat index of the target layer's first neuron.
        current: ``[B, W]`` float, += the currents (last column: the dump).
        counts: ``[B, W]`` int32, += number of entries that reached each column.
    """
    c_out = weight.shape[0]
    c, target, valid, scale = _window(src, in_shape, pool, c_out)
    width = current.shape[1]
    flat = torch.where(valid, target + out_offset, width - 1) + (sample * width).view(-1, 1, 1, 1)
    rows = weight.transpose(0, 1)[c]                           # [E, C_out, 3, 3]: W[:, c]
    contrib = torch.where(valid, rows * (vals * scale).view(-1, 1, 1, 1), 0.0)
    current.view(-1).index_add_(0, flat.view(-1), contrib.view(-1))
    ones = valid.expand_as(flat).to(counts.dtype)
    counts.view(-1).index_add_(0, flat.view(-1), ones.reshape(-1))


def conv_deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor,
                                sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                in_shape: tuple[int, int, int], pool: bool, out_offset: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `conv_deliver_torch`'s current w.r.t. the values and the weight.

    Args: grad_current ``[B, W]``; the rest as in `conv_deliver_torch`.

    Returns:
        grad_vals ``[E]``; grad_weight ``[C_out, C_in, 3, 3]`` (entries of one input
        channel accumulate, across samples too).
    """
    c_out = weight.shape[0]
    c, target, valid, scale = _window(src, in_shape, pool, c_out)
    width = grad_current.shape[1]
    flat = torch.where(valid, target + out_offset, width - 1) + (sample * width).view(-1, 1, 1, 1)
    g = torch.where(valid, grad_current.reshape(-1)[flat], 0.0)   # [E, C_out, 3, 3]
    rows = weight.transpose(0, 1)[c]
    grad_vals = (g * rows).sum((1, 2, 3)) * scale
    grad_t = weight.new_zeros(weight.shape[1], c_out, 3, 3)
    grad_t.index_add_(0, c, g * (vals * scale).view(-1, 1, 1, 1))
    return grad_vals, grad_t.transpose(0, 1)
