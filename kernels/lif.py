"""LIF evaluation of the neurons that received a current in one forward step
(SPEC 5.4), and its backward with the arctan surrogate (SPEC 8).

Forward, per neuron:  V1 = 0 if refractory else V + I;  s = gate * H(V1 - theta);
V' = V1 * (1 - s) for receivers, V for everyone else. `gate` = received this step
and n_in >= sync_threshold. The forward keeps V1 (one float per neuron) and three
bool masks; s is recomputed from V1 in the backward (a compare is cheaper than a
stored float).

The Triton kernels come with the kernels issue; these are the twins.
"""

from __future__ import annotations

import math

import torch


def lif_torch(v: torch.Tensor, current: torch.Tensor, refractory: torch.Tensor,
              received: torch.Tensor, gate: torch.Tensor, theta: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Args: v, current ``[B, W]``; refractory, received, gate bool ``[B, W]``;
    theta ``[W]`` (+inf where a column must never fire).

    Returns: (v_new, spikes, v_pre) all ``[B, W]``; ``v_pre`` is V1, the pre-spike
    potential (the MS priority of a neuron that fired).
    """
    v_pre = torch.where(refractory, 0.0, v + current)
    spikes = (gate & (v_pre >= theta)).to(v.dtype)
    v_new = torch.where(received, v_pre - v_pre * spikes, v)
    return v_new, spikes, v_pre


def arctan_surrogate(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """d spike / dV = (alpha / 2) / (1 + (pi/2 * alpha * x)^2), x = V - theta."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)


def lif_backward_torch(grad_v_new: torch.Tensor, grad_spikes: torch.Tensor | None,
                       v_pre: torch.Tensor, refractory: torch.Tensor, received: torch.Tensor,
                       gate: torch.Tensor, theta: torch.Tensor, alpha: float, detach_reset: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `lif_torch` w.r.t. v and current (the same on receivers)."""
    spikes = (gate & (v_pre >= theta)).to(v_pre.dtype)
    dsdv = torch.where(gate, arctan_surrogate(v_pre - theta, alpha), 0.0)
    g_pre = grad_v_new * (1 - spikes)
    if not detach_reset:
        g_pre = g_pre - grad_v_new * v_pre * dsdv
    if grad_spikes is not None:
        g_pre = g_pre + grad_spikes * dsdv
    g_pre = torch.where(received & ~refractory, g_pre, 0.0)
    grad_v = torch.where(received, g_pre, grad_v_new)
    return grad_v, g_pre
