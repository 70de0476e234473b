"""Deliver: gather the fan-out rows of the selected outboxes and add their currents
into the receivers (SPEC 5.3), and the backward of that.

Work per step is K x F_max (F_max = widest fan-out), never N x N. The forward keeps
nothing but the [B, K] values and indices: the backward re-gathers rows and targets
(a K x F gather is cheaper than keeping a [B, K, F] float and int64 tensor per step,
which was 12 x B x K x F bytes per step in the first version).

The Triton kernels come with the kernels issue; these are the twins.
"""

from __future__ import annotations

import torch


def deliver_torch(vals: torch.Tensor, sel: torch.Tensor, weight_table: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """Currents of one forward step.

    Args:
        vals: ``[B, K]`` delivered outbox values (0 for empty slots and dropped ones).
        sel: int64 ``[B, K]`` flat source indices (dump index for empty/dropped slots).
        weight_table: ``[W, F]`` outgoing weights per flat source (zeros for padding).
        targets: int64 ``[W, F]`` flat receiver per fan-out entry (dump for padding).

    Returns:
        ``[B, W]`` summed currents (the dump column collects padding).
    """
    b, width = vals.shape[0], weight_table.shape[0]
    contrib = (weight_table[sel] * vals[..., None]).view(b, -1)
    return vals.new_zeros(b, width).scatter_add_(1, targets[sel].view(b, -1), contrib)


def deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                           weight_table: torch.Tensor, targets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `deliver_torch`'s current w.r.t. the values and the weight table.

    Returns:
        grad_vals ``[B, K]``; grad_weight_table ``[W, F]`` (rows of the K sources of
        each sample accumulated; duplicates across samples add up).
    """
    b, k = sel.shape
    f = weight_table.shape[1]
    g_at_targets = grad_current.gather(1, targets[sel].view(b, -1)).view(b, k, f)
    grad_vals = (g_at_targets * weight_table[sel]).sum(-1)
    grad_table = torch.zeros_like(weight_table).index_put_(
        (sel.reshape(-1),), (g_at_targets * vals[..., None]).reshape(-1, f), accumulate=True)
    return grad_vals, grad_table
