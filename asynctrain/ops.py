"""autograd Functions around one backend's per-step ops (`backends.Ops`).

They keep what a forward step saves small: Deliver keeps the [B, K] values and
indices (not the [B, K, F] gathered rows), LIF keeps V1 and three bool masks. They
are used when the engine runs with autograd (``checkpoint_every=0``, and the layered
path); the checkpointed forward calls the ops directly and `loop.py` sweeps by
hand.
"""

from __future__ import annotations

import torch

from .backends import TORCH, Ops


class Deliver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, sel, weight_table, targets, ops):
        # [B, K] values and indices: cheaper to keep than the [B, K, F] rows.
        ctx.save_for_backward(vals, sel, weight_table, targets)
        ctx.ops = ops
        return ops.deliver(vals, sel, weight_table, targets)

    @staticmethod
    def backward(ctx, grad_current):
        vals, sel, weight_table, targets = ctx.saved_tensors
        grad_vals, grad_table = ctx.ops.deliver_backward(grad_current.contiguous(), vals, sel,
                                                         weight_table, targets)
        return grad_vals, None, grad_table, None, None


class LIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, current, refractory, received, gate, theta, alpha, detach_reset, ops):
        v_new, spikes, v_pre = ops.lif(v, current, refractory, received, gate, theta)
        # V1 (one float per neuron) and bool masks; spikes are recomputed from V1.
        ctx.save_for_backward(v_pre, refractory, received, gate, theta)
        ctx.alpha, ctx.detach_reset, ctx.ops = alpha, detach_reset, ops
        ctx.mark_non_differentiable(v_pre)
        return v_new, spikes, v_pre

    @staticmethod
    def backward(ctx, grad_v_new, grad_spikes, _grad_pre):
        v_pre, refractory, received, gate, theta = ctx.saved_tensors
        grad_v, grad_current = ctx.ops.lif_backward(grad_v_new.contiguous(), None if grad_spikes is None else grad_spikes.contiguous(),
                                                    v_pre, refractory, received, gate, theta,
                                                    ctx.alpha, ctx.detach_reset)
        return grad_v, grad_current, None, None, None, None, None, None, None


def deliver(vals, sel, weight_table, targets, ops: Ops = TORCH):
    if torch.is_grad_enabled() and (vals.requires_grad or weight_table.requires_grad):
        return Deliver.apply(vals, sel, weight_table, targets, ops)
    return ops.deliver(vals, sel, weight_table, targets)


def lif(v, current, refractory, received, gate, theta, alpha, detach_reset, ops: Ops = TORCH):
    if torch.is_grad_enabled() and (v.requires_grad or current.requires_grad):
        return LIF.apply(v, current, refractory, received, gate, theta, alpha, detach_reset, ops)
    return ops.lif(v, current, refractory, received, gate, theta)
