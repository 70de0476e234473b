"""The paper's per-step algorithm, batched and dense: the baseline of `cost.py`.

Per forward step it does what the paper's code does: the whole network is one block
weight matrix ``Wbig [N, N]``; the masked outbox vector is multiplied by it (a dense
``[B, N] x [N, N]`` matmul), selection is a full argsort of the keys over the network,
and plain autograd keeps every step's activations. Same semantics and random numbers
as the engine (`asynctrain.rng`), so the two compute the same thing and a ratio of
their costs compares implementations, not models (checked in
tests/test_dense_baseline.py).

Supported: policy RS / MS, K, refractoriness and its dropout, momentum noise, input
and network dropout, both stop conditions, max_steps, counts readout, sync threshold 1,
no barriers, no carried outboxes, input through the queue. Anything else raises.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from asynctrain import rng
from asynctrain.config import SimConfig
from asynctrain.kernels.lif import arctan_surrogate
from asynctrain.network import Network, linear_weights


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * arctan_surrogate(x, ctx.alpha), None


class DenseSNN(nn.Module):
    """Drop-in for `AsyncSNN` with the dense per-step algorithm (baseline only)."""

    def __init__(self, net: nn.Module, cfg: SimConfig):
        super().__init__()
        bad = {"prioritize_input": cfg.prioritize_input, "barrier_messages": cfg.barrier_messages,
               "carry_pending": cfg.carry_pending}
        if cfg.policy not in ("RS", "MS") or any(bad.values()) or cfg.readout != "counts" \
                or isinstance(cfg.sync_threshold, torch.Tensor) or cfg.sync_threshold != 1:
            raise NotImplementedError(f"dense baseline supports RS/MS, sync 1, counts readout, no "
                                      f"{[k for k, v in bad.items() if v]}; got {cfg}")
        self.net, self.cfg = net, cfg
        self.graph = Network.from_module(net)
        self.stats: dict = {}

    def forward(self, frames: torch.Tensor, seed: int = 0) -> torch.Tensor:
        cfg, g = self.cfg, self.graph
        training = self.training
        weights = linear_weights(self.net)
        T, B, n0 = frames.shape
        N, L, offs, sizes = g.width, g.n_layers, g.offsets, g.layer_sizes
        dt = weights[0].dtype
        wbig = weights[0].new_zeros(N, N)
        layer_of = torch.cat([torch.full((n,), l) for l, n in enumerate(sizes)])
        for l, w in enumerate(weights):
            wbig[offs[l]:offs[l] + sizes[l], offs[l + 1]:offs[l + 1] + sizes[l + 1]] = w.t()
        # receivers of a step: every neuron of a layer after a layer that delivered
        onehot = nn.functional.one_hot(layer_of, L + 1).to(dt)           # [N, L+1]
        prev_layer = (layer_of - 1).clamp(min=0)
        is_neuron = layer_of > 0
        hidden = is_neuron & (layer_of < L)
        out_sl = slice(offs[L], N)
        theta = torch.cat([torch.full((n0,), math.inf, dtype=dt),
                           torch.as_tensor(cfg.theta, dtype=dt).expand(g.n_neurons)])
        tau = torch.as_tensor(cfg.tau, dtype=torch.float64).expand(g.n_neurons)
        decay = torch.cat([torch.ones(n0, dtype=dt), torch.exp(-cfg.dt / tau).to(dt)])
        idx = torch.arange(N).expand(B, N)
        p_ref = cfg.refractory_dropout if training else 0.0
        p_net = cfg.network_dropout if training else 0.0
        noise = cfg.momentum_noise if training else 0.0
        v = frames.new_zeros(B, N)
        outs, steps_all = [], torch.zeros(T, B, dtype=torch.int64)
        for t in range(T):
            x = frames[t]
            if training and cfg.input_dropout > 0:
                keep = rng.uniform(seed, rng.STREAM_INPUT_DROPOUT, t, 0, idx[:, :n0]) >= cfg.input_dropout
                x = x * keep
            v = v * decay
            o = nn.functional.pad(x, (0, N - n0))
            pending = o != 0
            refr = torch.zeros(B, N, dtype=torch.bool)
            pre = torch.zeros(B, N, dtype=dt)
            acc = frames.new_zeros(B, sizes[-1])
            steps = torch.zeros(B, dtype=torch.int64)
            first = torch.full((B,), -1, dtype=torch.int64)
            k = 0
            while True:
                out_stop = (first >= 0) & (steps >= first + cfg.steps_after_output) \
                    if cfg.stop == "output" else torch.zeros(B, dtype=torch.bool)
                active = pending.any(1) & ~out_stop & (steps < cfg.max_steps)
                if not active.any():
                    break
                if cfg.policy == "RS":
                    key = rng.uniform(seed, rng.STREAM_RS_KEY, t, k, idx)
                else:
                    key = pre.float()
                    if noise > 0:
                        key = key + noise * rng.uniform(seed, rng.STREAM_MOMENTUM_NOISE, t, k, idx)
                    key[:, :n0] = math.inf
                key = key.masked_fill(~pending, -math.inf)
                order = torch.sort(-key, dim=1, stable=True).indices[:, :cfg.forward_group_size]
                ok = pending.gather(1, order) & active[:, None]
                sel = torch.zeros_like(pending).scatter(1, order, ok)
                deliv = sel
                if p_net > 0:
                    deliv = sel & (rng.uniform(seed, rng.STREAM_NETWORK_DROPOUT, t, k, idx) >= p_net)
                vals = torch.where(deliv, o, 0.0)
                o = torch.where(sel, 0.0, o)
                pending = pending & ~sel
                current = vals @ wbig
                recv = ((deliv.to(dt) @ onehot)[:, prev_layer] > 0) & is_neuron
                v1 = torch.where(refr, 0.0, v + current)
                s = _Spike.apply(v1 - theta, float(cfg.surrogate_steepness)) * recv
                reset = s.detach() if cfg.detach_reset else s
                v = torch.where(recv, v1 * (1 - reset), v)
                fired = s.detach() > 0
                o = o + torch.where(hidden, s, 0.0)
                acc = acc + s[:, out_sl]
                pending = pending | (fired & hidden)
                pre = torch.where(fired, v1.detach(), pre)
                if cfg.refractory:
                    rf = fired
                    if p_ref > 0:
                        rf = rf & (rng.uniform(seed, rng.STREAM_REFRACTORY_DROPOUT, t, k, idx) >= p_ref)
                    refr = refr | rf
                steps += active
                first = torch.where((first < 0) & fired[:, out_sl].any(1), steps, first)
                k += 1
            steps_all[t] = steps
            outs.append(acc)
        self.stats = {"forward_steps": steps_all}
        return torch.stack(outs)
