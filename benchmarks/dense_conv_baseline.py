"""The paper's per-step algorithm for convolutional networks, batched and dense: the
baseline of `cost_vgg7.py`.

An [N, N] block matrix is out of the question for VGG-7 (229,386 neurons), so the
dense per-step algorithm applies every layer's map to the masked outbox vector at
every forward step: ``F.conv2d`` (behind ``F.avg_pool2d`` for pooled maps) or a matmul
per layer, i.e. one full network evaluation per forward step, the receivers found by
a 3x3 box filter of the delivered mask; selection is a full argsort of the keys and
plain autograd keeps every step's activations. Same semantics and random numbers as
the engine (`asynctrain.rng`), so a ratio of costs compares implementations, not
models (checked in tests/test_dense_conv_baseline.py).

Supported: policy RS / MS, K, refractoriness and its dropout, momentum noise,
prioritized or queued input, counts or potential readout, spiking-done or output
stop, max_steps, sync threshold 1, no barriers, no carried outboxes, no network or
input dropout. Anything else raises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from asynctrain import rng
from asynctrain.config import SimConfig, per_neuron
from asynctrain.network import Network, linear_weights

from dense_baseline import _Spike


class DenseConvSNN(nn.Module):
    """Drop-in for `AsyncSNN` on conv networks with the dense per-step algorithm."""

    def __init__(self, net: nn.Module, cfg: SimConfig):
        super().__init__()
        bad = {"barrier_messages": cfg.barrier_messages, "carry_pending": cfg.carry_pending,
               "network_dropout": cfg.network_dropout > 0, "input_dropout": cfg.input_dropout > 0}
        if cfg.policy not in ("RS", "MS") or any(bad.values()) \
                or isinstance(cfg.sync_threshold, torch.Tensor) or cfg.sync_threshold != 1:
            raise NotImplementedError(f"dense conv baseline supports RS/MS, sync 1, no "
                                      f"{[k for k, v in bad.items() if v]}; got {cfg}")
        self.net, self.cfg = net, cfg
        self.graph = Network.from_module(net)
        if not self.graph.image:
            raise ValueError("DenseConvSNN is for conv networks; use dense_baseline.DenseSNN")
        self.stats: dict = {}

    def _receivers(self, deliv: torch.Tensor) -> torch.Tensor:
        """bool [B, N]: neurons reached by the delivered sources (structure only)."""
        g = self.graph
        B = deliv.shape[0]
        parts = [deliv.new_zeros(B, g.n_inputs)]
        for l, m in enumerate(g.maps):
            d = deliv[:, g.offsets[l]:g.offsets[l] + g.layer_sizes[l]].to(torch.float32)
            if len(m.in_shape) == 3:
                d = d.view(B, *m.in_shape).sum(1, keepdim=True)
                if m.pool:
                    d = F.avg_pool2d(d, 2)
            if m.kind == "conv":
                hit = F.conv2d(d, d.new_ones(1, 1, 3, 3), padding=1) > 0
                parts.append(hit.expand(B, m.out_shape[0], *m.out_shape[1:]).reshape(B, -1))
            else:
                parts.append((d.reshape(B, -1).sum(1, keepdim=True) > 0).expand(B, m.n_out))
        return torch.cat(parts, 1)

    def _current(self, vals: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        g = self.graph
        parts = [vals.new_zeros(vals.shape[0], g.n_inputs)]
        for l, m in enumerate(g.maps):
            parts.append(m.dense(vals[:, g.offsets[l]:g.offsets[l] + g.layer_sizes[l]], weights[l]))
        return torch.cat(parts, 1)

    def forward(self, frames: torch.Tensor, seed: int = 0) -> torch.Tensor:
        cfg, g = self.cfg, self.graph
        training = self.training
        weights = linear_weights(self.net)
        frames = frames.reshape(frames.shape[0], frames.shape[1], -1)
        T, B, n0 = frames.shape
        N, L, offs, sizes = g.width, g.n_layers, g.offsets, g.layer_sizes
        dt = weights[0].dtype
        layer_of = torch.cat([torch.full((n,), l) for l, n in enumerate(sizes)])
        is_neuron = layer_of > 0
        hidden = is_neuron & (layer_of < L)
        out_sl = slice(offs[L], N)
        theta = torch.cat([torch.full((n0,), math.inf, dtype=dt),
                           per_neuron(cfg.theta, g.n_neurons, "theta", dt)])
        tau = per_neuron(cfg.tau, g.n_neurons, "tau", torch.float64)
        decay = torch.cat([torch.ones(n0, dtype=dt), torch.exp(-cfg.dt / tau).to(dt)])
        idx = torch.arange(N).expand(B, N)
        p_ref = cfg.refractory_dropout if training else 0.0
        noise = cfg.momentum_noise if training else 0.0
        alpha = float(cfg.surrogate_steepness)
        layer1 = (layer_of == 1).expand(B, N)
        v = frames.new_zeros(B, N)
        outs, steps_all = [], torch.zeros(T, B, dtype=torch.int64)

        def evaluate(v, current, recv, refr):
            v1 = torch.where(refr, 0.0, v + current)
            s = _Spike.apply(v1 - theta, alpha) * recv
            reset = s.detach() if cfg.detach_reset else s
            return torch.where(recv, v1 * (1 - reset), v), s, v1

        for t in range(T):
            x = frames[t]
            v = v * decay
            refr = torch.zeros(B, N, dtype=torch.bool)
            pre = torch.zeros(B, N, dtype=dt)
            acc = frames.new_zeros(B, sizes[-1])
            steps = torch.zeros(B, dtype=torch.int64)
            first = torch.full((B,), -1, dtype=torch.int64)
            k = 0
            o = F.pad(x, (0, N - n0))
            pending = o != 0
            if cfg.prioritize_input:
                lo = offs[1]
                current = F.pad(g.maps[0].dense(x, weights[0]), (lo, N - lo - sizes[1]))
                o = torch.zeros_like(o)
                pending = torch.zeros_like(pending)
                v, s, v1 = evaluate(v, current, layer1, refr)
                fired = s.detach() > 0
                o = o + torch.where(hidden, s, 0.0)
                acc = acc + s[:, out_sl]
                pending = pending | (fired & hidden)
                pre = torch.where(fired, v1.detach(), pre)
                if cfg.refractory:
                    rf = fired
                    if p_ref > 0:
                        rf = rf & (rng.uniform(seed, rng.STREAM_REFRACTORY_DROPOUT, t, 0, idx) >= p_ref)
                    refr = refr | rf
                steps += 1
                first = torch.where(fired[:, out_sl].any(1), steps, first)
                k = 1
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
                vals = torch.where(sel, o, 0.0)
                o = torch.where(sel, 0.0, o)
                pending = pending & ~sel
                current = self._current(vals, weights)
                recv = self._receivers(sel) & is_neuron
                v, s, v1 = evaluate(v, current, recv, refr)
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
            outs.append(v[:, out_sl] if cfg.readout == "potential" else acc)
        self.stats = {"forward_steps": steps_all}
        return torch.stack(outs)
