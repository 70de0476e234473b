"""autograd Functions around the per-step twins in `kernels/`.

They exist to keep what a forward step saves small: Deliver keeps the [B, K] values
and indices (not the [B, K, F] gathered rows), LIF keeps V1 and three bool masks.
Both are used only when the engine replays a segment with autograd (or when
checkpointing is off); the no-grad forward calls the twins directly.
"""

from __future__ import annotations

import torch

from .kernels.deliver import deliver_backward_torch, deliver_torch
from .kernels.lif import lif_backward_torch, lif_torch


class Deliver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, sel, weight_table, targets):
        # [B, K] values and indices: cheaper to keep than the [B, K, F] rows.
        ctx.save_for_backward(vals, sel, weight_table, targets)
        return deliver_torch(vals, sel, weight_table, targets)

    @staticmethod
    def backward(ctx, grad_current):
        vals, sel, weight_table, targets = ctx.saved_tensors
        grad_vals, grad_table = deliver_backward_torch(grad_current, vals, sel, weight_table, targets)
        return grad_vals, None, grad_table, None


class LIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, current, refractory, received, gate, theta, alpha, detach_reset):
        v_new, spikes, v_pre = lif_torch(v, current, refractory, received, gate, theta)
        # V1 (one float per neuron) and bool masks; spikes are recomputed from V1.
        ctx.save_for_backward(v_pre, refractory, received, gate, theta)
        ctx.alpha, ctx.detach_reset = alpha, detach_reset
        ctx.mark_non_differentiable(v_pre)
        return v_new, spikes, v_pre

    @staticmethod
    def backward(ctx, grad_v_new, grad_spikes, _grad_pre):
        v_pre, refractory, received, gate, theta = ctx.saved_tensors
        grad_v, grad_current = lif_backward_torch(grad_v_new, grad_spikes, v_pre, refractory, received,
                                                  gate, theta, ctx.alpha, ctx.detach_reset)
        return grad_v, grad_current, None, None, None, None, None, None


def deliver(vals, sel, weight_table, targets):
    if torch.is_grad_enabled() and (vals.requires_grad or weight_table.requires_grad):
        return Deliver.apply(vals, sel, weight_table, targets)
    return deliver_torch(vals, sel, weight_table, targets)


def lif(v, current, refractory, received, gate, theta, alpha, detach_reset):
    if torch.is_grad_enabled() and (v.requires_grad or current.requires_grad):
        return LIF.apply(v, current, refractory, received, gate, theta, alpha, detach_reset)
    return lif_torch(v, current, refractory, received, gate, theta)
