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

Cost: the window geometry is computed once per entry ([E, 9]); only the gather of
``W[:, c]``, one multiply, one index add and the flat index ([E, C_out, 9]) touch every
target. Targets outside the map keep a valid in-map index with a zero coefficient
instead of a dump redirect, and the received counts are added per spatial position
([B, H' x W']) and broadcast over the output channels (every channel of a position
hears the same sources): 0.4 s -> 0.13 s per forward step of VGG-7 at K = 512,
batch 8, 2 CPU threads, against masking every [E, C_out, 9] element.

The Triton kernel is a later issue; these are the twins it will be checked against.
"""

from __future__ import annotations

import torch


def _window(src: torch.Tensor, in_shape: tuple[int, int, int], pool: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """Window of each entry: (channel c [E], spatial target [E, 9] int64 (0 where
    invalid), valid bool [E, 9], value scale, H' x W' of the conv's map). Tap order
    ky * 3 + kx, as in ``W.view(C_out, C_in, 9)``."""
    _, h, w = in_shape
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
    valid = (ok_y[:, :, None] & ok_x[:, None, :]).view(-1, 9)
    pos = torch.where(valid, (oy[:, :, None] * w + ox[:, None, :]).view(-1, 9), 0)
    return c, pos, valid, (0.25 if pool else 1.0), h * w


def _targets(sample, pos, c_out, hw, out_offset, width):
    """Flat index into a [B, W] buffer viewed 1-D: [E, C_out, 9]."""
    base = (sample * width + out_offset)[:, None] + pos                          # [E, 9]
    chan = torch.arange(c_out, device=pos.device) * hw
    return base[:, None, :] + chan[None, :, None]


def _rows(weight: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``W[:, c]`` per entry: [E, C_out, 9]."""
    c_out, c_in = weight.shape[:2]
    return weight.reshape(c_out, c_in, 9).transpose(0, 1)[c]


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
        current: ``[B, W]`` float, += the currents.
        counts: ``[B, W]`` int32, += number of entries that reached each column.
    """
    c_out = weight.shape[0]
    c, pos, valid, scale, hw = _window(src, in_shape, pool)
    b, width = current.shape
    coef = valid * (vals * scale)[:, None]                                       # [E, 9]
    contrib = _rows(weight, c) * coef[:, None, :]
    current.view(-1).index_add_(0, _targets(sample, pos, c_out, hw, out_offset, width).view(-1),
                                contrib.view(-1))
    spatial = torch.zeros(b * hw, dtype=counts.dtype, device=counts.device)
    spatial.index_add_(0, (sample[:, None] * hw + pos).view(-1), valid.view(-1).to(counts.dtype))
    counts[:, out_offset:out_offset + c_out * hw].view(b, c_out, hw).add_(spatial.view(b, 1, hw))


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
    c_out, c_in = weight.shape[:2]
    c, pos, valid, scale, hw = _window(src, in_shape, pool)
    width = grad_current.shape[1]
    g = grad_current.reshape(-1)[_targets(sample, pos, c_out, hw, out_offset, width)]  # [E, C_out, 9]
    grad_vals = ((g * _rows(weight, c)).sum(1) * valid).sum(1) * scale
    coef = valid * (vals * scale)[:, None]
    grad_t = weight.new_zeros(c_in, c_out, 9)
    grad_t.index_add_(0, c, g * coef[:, None, :])
    return grad_vals, grad_t.transpose(0, 1).reshape(weight.shape)
