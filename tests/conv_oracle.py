"""Dense equivalents of convolutional networks for the dense oracle (tests only).

A conv network's synaptic map from layer l to layer l + 1 (pooling and flattening
folded in, SPEC 1) is linear in the source layer's outboxes, so it is the matrix
obtained by running the torch layers between two weight layers on the identity
basis. `dense_equivalent` builds those matrices straight from the ``nn.Module``s with
``torch.nn.functional`` (not from `asynctrain.conv`, which they check), so they are
differentiable in the conv weights and the dense oracle's gradients w.r.t. them are
the reference. Only for tiny sizes: one matrix is ``[n_{l+1}, n_l]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dense_oracle import dense_simulate


def dense_equivalent(net, input_shape: tuple[int, ...], dtype=None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights ``[n_{l+1}, n_l]`` per weight layer (differentiable), adjacency 0/1
    ``[n_l, n_{l+1}]`` (j feeds i))."""
    shape = tuple(input_shape)
    dtype = dtype or next(m.weight.dtype for m in net if hasattr(m, "weight"))
    basis = torch.eye(math.prod(shape), dtype=dtype).view(-1, *shape)
    ones_basis = basis
    mats, adjs = [], []
    for m in net:
        if isinstance(m, nn.AvgPool2d):
            basis, ones_basis = F.avg_pool2d(basis, 2), F.avg_pool2d(ones_basis, 2)
        elif isinstance(m, nn.Flatten):
            basis, ones_basis = basis.flatten(1), ones_basis.flatten(1)
        else:
            if isinstance(m, nn.Conv2d):
                out = F.conv2d(basis, m.weight, padding=1)
                reach = F.conv2d(ones_basis, torch.ones_like(m.weight), padding=1)
            else:
                out = basis @ m.weight.t()
                reach = ones_basis @ torch.ones_like(m.weight).t()
            n_in = out.shape[0]
            mats.append(out.reshape(n_in, -1).t())
            adjs.append((reach.reshape(n_in, -1) > 0).to(torch.int64))
            basis = torch.eye(out[0].numel(), dtype=dtype).view(-1, *out.shape[1:])
            ones_basis = basis
    return mats, adjs


def conv_weights(net: nn.Sequential) -> list[torch.Tensor]:
    return [m.weight for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_conv_oracle(net, cfg, frames, input_shape, *, seed=3, training=False, cotangent=None):
    """The dense oracle on `net`'s dense equivalent. frames ``[T, B, C, H, W]`` or flat.
    Returns (out detached, stats with final_v, grads w.r.t. the layers' weights)."""
    clone = [w.detach().clone().requires_grad_() for w in conv_weights(net)]
    twin = _with_weights(net, clone)
    mats, adjs = dense_equivalent(twin, input_shape)
    flat = frames.reshape(frames.shape[0], frames.shape[1], -1)
    out, stats = dense_simulate(mats, flat, cfg, seed=seed, training=training, adjacency=adjs)
    stats = dict(stats, final_v=stats["V"][-1])
    grads = None
    if cotangent is not None:
        if out.requires_grad:
            gs = torch.autograd.grad((out * cotangent).sum(), clone, allow_unused=True)
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(clone, gs)]
        else:
            grads = [torch.zeros_like(w) for w in clone]
    return out.detach(), stats, grads


def _with_weights(net, weights):
    """The layers of `net` as a list, with `weights` (plain tensors) in place of theirs."""
    it = iter(weights)
    out = []
    for m in net:
        if isinstance(m, nn.Conv2d):
            h = nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1, bias=False)
            del h.weight
            h.weight = next(it)
            out.append(h)
        elif isinstance(m, nn.Linear):
            h = nn.Linear(m.in_features, m.out_features, bias=False)
            del h.weight
            h.weight = next(it)
            out.append(h)
        else:
            out.append(m)
    return out
