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

Entries, buffers and what is kept are as in `kernels/conv_deliver.py`.
"""

from __future__ import annotations

import torch


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
                       out_offset: int, current: torch.Tensor, counts: torch.Tensor) -> None:
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
    """
    m = weight.shape[0]
    f, valid, scale = _features(src, in_shape, pool)
    rows = weight.t()[f] * torch.where(valid, vals * scale, 0.0)[:, None]      # [E, M]
    current[:, out_offset:out_offset + m].index_add_(0, sample, rows)
    per_sample = torch.zeros(current.shape[0], dtype=counts.dtype, device=counts.device)
    per_sample.index_add_(0, sample, valid.to(counts.dtype))
    counts[:, out_offset:out_offset + m] += per_sample[:, None]


def rows_deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor,
                                sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                in_shape: tuple[int, ...], pool: bool, out_offset: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rows_deliver_torch`'s current w.r.t. the values and the weight.

    Returns: grad_vals ``[E]``; grad_weight ``[M, F]``.
    """
    m = weight.shape[0]
    f, valid, scale = _features(src, in_shape, pool)
    g = grad_current[sample, out_offset:out_offset + m]                     # [E, M]
    grad_vals = torch.where(valid, (g * weight.t()[f]).sum(1) * scale, 0.0)
    grad_t = weight.new_zeros(weight.shape[1], m)
    grad_t.index_add_(0, f, g * torch.where(valid, vals * scale, 0.0)[:, None])
    return grad_vals, grad_t.t()
