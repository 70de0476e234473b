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
from .kernels.lif import arctan_surrogate


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
    def forward(ctx, v, current, refractory, received, gate, theta, alpha, detach_reset, ops, last=None):
        v_new, spikes, v_pre = ops.lif(v, current, refractory, received, gate, theta)
        # V1 (one float per neuron) and bool masks; spikes are recomputed from V1.
        ctx.save_for_backward(v_pre, refractory, received, gate, theta, last)
        ctx.alpha, ctx.detach_reset, ctx.ops = alpha, detach_reset, ops
        ctx.mark_non_differentiable(v_pre)
        return v_new, spikes, v_pre

    @staticmethod
    def backward(ctx, grad_v_new, grad_spikes, _grad_pre):
        v_pre, refractory, received, gate, theta, last = ctx.saved_tensors
        grad_s = None if grad_spikes is None else grad_spikes.contiguous()
        grad_v, grad_current = ctx.ops.lif_backward(grad_v_new.contiguous(), grad_s,
                                                    v_pre, refractory, received, gate, theta,
                                                    ctx.alpha, ctx.detach_reset, last)
        return grad_v, grad_current, None, None, None, None, None, None, None, None


class WindowCarrier(torch.autograd.Function):
    """`SimConfig.surrogate_at="fire_or_last"` under plain autograd: a neuron's latest
    evaluation that did not fire may turn out to be the last of its outbox window, so
    its surrogate derivative is parked here until the window ends (`Engine.end_windows`
    adds the carrier to the emptied outbox and resets V by it). Value: always 0.
    Gradient: the surrogate at the receivers that did not fire (gated, not refractory:
    V1 = V + I there), the previous carrier's elsewhere."""

    @staticmethod
    def forward(ctx, v, current, carrier, v_pre, refractory, received, gate, spikes, theta, alpha):
        counts = received & gate & ~refractory & (spikes == 0)
        ctx.save_for_backward(v_pre, counts, received, theta)
        ctx.alpha = alpha
        return torch.zeros_like(carrier)

    @staticmethod
    def backward(ctx, grad):
        v_pre, counts, received, theta = ctx.saved_tensors
        g = torch.where(counts, grad * arctan_surrogate(v_pre - theta, ctx.alpha), 0.0)
        return g, g, torch.where(received, 0.0, grad), None, None, None, None, None, None, None


def window_carrier(v, current, carrier, v_pre, refractory, received, gate, spikes, theta, alpha):
    """The carrier after an evaluation (`WindowCarrier`)."""
    return WindowCarrier.apply(v, current, carrier, v_pre, refractory, received, gate, spikes, theta, alpha)


def deliver(vals, sel, weight_table, targets, ops: Ops = TORCH):
    if torch.is_grad_enabled() and (vals.requires_grad or weight_table.requires_grad):
        return Deliver.apply(vals, sel, weight_table, targets, ops)
    return ops.deliver(vals, sel, weight_table, targets)


def lif(v, current, refractory, received, gate, theta, alpha, detach_reset, ops: Ops = TORCH, last=None):
    if torch.is_grad_enabled() and (v.requires_grad or current.requires_grad):
        return LIF.apply(v, current, refractory, received, gate, theta, alpha, detach_reset, ops, last)
    return ops.lif(v, current, refractory, received, gate, theta)
