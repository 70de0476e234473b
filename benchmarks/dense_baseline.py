"""The paper's per-step algorithm, batched and dense: the baseline of `cost.py` and
`cost_vgg7.py`.

Per forward step it does what the paper's code does: the masked outbox vector goes
through the whole network (one full network evaluation per step), selection is a
full argsort of the keys over the network, and plain autograd keeps every step's
activations. How the whole network is applied is the only part that depends on the
layers (`_BlockMap`, `_LayerMaps`):

- fully connected: one block weight matrix ``Wbig [N, N]`` and a dense
  ``[B, N] x [N, N]`` matmul; receivers are every neuron of a layer after a layer
  that delivered;
- convolutional (an [N, N] matrix is out of the question for VGG-7's 229,386
  neurons): every layer's map per step, ``F.conv2d`` (behind ``F.avg_pool2d`` for
  pooled maps) or a matmul; receivers from a 3x3 box filter of the delivered mask.

Same semantics and random numbers as the engine (`asynctrain.rng`), so the two
compute the same thing and a ratio of their costs compares implementations, not
models (tests/test_dense_baseline.py, fully connected and conv).

Supported: policy RS / MS, K, refractoriness and its dropout, momentum noise, input
and network dropout, prioritized or queued input, both stop conditions, max_steps,
counts or potential readout, sync threshold 1. No barrier messages, no carried
outboxes: those raise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from asynctrain import rng
from asynctrain.config import SimConfig, per_neuron
from asynctrain.kernels.lif import arctan_surrogate
from asynctrain.kernels.select import sortable_key
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


class _BlockMap:
    """Fully connected: the whole network as one [N, N] block matrix."""

    def __init__(self, g: Network, weights: list[torch.Tensor]):
        N, sizes, offs = g.width, g.layer_sizes, g.offsets
        self.wbig = weights[0].new_zeros(N, N)
        for l, w in enumerate(weights):
            self.wbig[offs[l]:offs[l] + sizes[l], offs[l + 1]:offs[l + 1] + sizes[l + 1]] = w.t()
        layer_of = torch.cat([torch.full((n,), l) for l, n in enumerate(sizes)])
        self.onehot = nn.functional.one_hot(layer_of, g.n_layers + 1).to(weights[0].dtype)  # [N, L+1]
        self.prev_layer = (layer_of - 1).clamp(min=0)

    def current(self, vals: torch.Tensor) -> torch.Tensor:
        return vals @ self.wbig

    def receivers(self, deliv: torch.Tensor) -> torch.Tensor:
        # every neuron of a layer after a layer that delivered (inputs masked by the caller)
        return (deliv.to(self.onehot.dtype) @ self.onehot)[:, self.prev_layer] > 0


class _LayerMaps:
    """Convolutional: every layer's synaptic map applied per step."""

    def __init__(self, g: Network, weights: list[torch.Tensor]):
        self.g, self.weights = g, weights

    def current(self, vals: torch.Tensor) -> torch.Tensor:
        g = self.g
        parts = [vals.new_zeros(vals.shape[0], g.n_inputs)]
        for l, m in enumerate(g.maps):
            parts.append(m.dense(vals[:, g.offsets[l]:g.offsets[l] + g.layer_sizes[l]], self.weights[l]))
        return torch.cat(parts, 1)

    def receivers(self, deliv: torch.Tensor) -> torch.Tensor:
        g = self.g
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


class DenseSNN(nn.Module):
    """Drop-in for `AsyncSNN` with the dense per-step algorithm (baseline only)."""

    def __init__(self, net: nn.Module, cfg: SimConfig):
        super().__init__()
        bad = {"barrier_messages": cfg.barrier_messages, "carry_pending": cfg.carry_pending}
        if cfg.policy not in ("RS", "MS") or any(bad.values()) \
                or isinstance(cfg.sync_threshold, torch.Tensor) or cfg.sync_threshold != 1:
            raise NotImplementedError(f"dense baseline supports RS/MS, sync 1, no "
                                      f"{[k for k, v in bad.items() if v]}; got {cfg}")
        self.net, self.cfg = net, cfg
        self.graph = Network.from_module(net)
        self.stats: dict = {}

    def forward(self, frames: torch.Tensor, seed: int = 0) -> torch.Tensor:
        cfg, g = self.cfg, self.graph
        training = self.training
        weights = linear_weights(self.net)
        maps = _LayerMaps(g, weights) if g.image else _BlockMap(g, weights)
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
        p_net = cfg.network_dropout if training else 0.0
        noise = cfg.momentum_noise if training else 0.0
        alpha = float(cfg.surrogate_steepness)
        layer1 = (layer_of == 1).expand(B, N)
        v = frames.new_zeros(B, N)
        outs, steps_all = [], torch.zeros(T, B, dtype=torch.int64)
        for t in range(T):
            x = frames[t]
            if training and cfg.input_dropout > 0:
                keep = rng.uniform(seed, rng.STREAM_INPUT_DROPOUT, t, 0, idx[:, :n0]) >= cfg.input_dropout
                x = x * keep
            v = v * decay
            refr = torch.zeros(B, N, dtype=torch.bool)
            pre = torch.zeros(B, N, dtype=dt)
            acc = frames.new_zeros(B, sizes[-1])
            steps = torch.zeros(B, dtype=torch.int64)
            first = torch.full((B,), -1, dtype=torch.int64)
            o = F.pad(x, (0, N - n0))
            pending = o != 0
            k = 0

            def evaluate(v, o, pending, pre, refr, acc, current, recv, k):
                v1 = torch.where(refr, 0.0, v + current)
                s = _Spike.apply(v1 - theta, alpha) * recv
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
                return v, o, pending, pre, refr, acc, fired[:, out_sl].any(1)

            if cfg.prioritize_input:  # the whole frame as forward step 0
                lo = offs[1]
                current = F.pad(g.maps[0].dense(x, weights[0]) if g.image else x @ weights[0].t(),
                                (lo, N - lo - sizes[1]))
                v, o, pending, pre, refr, acc, out_fired = evaluate(
                    v, torch.zeros_like(o), torch.zeros_like(pending), pre, refr, acc, current, layer1, 0)
                steps += 1
                first = torch.where(out_fired, steps, first)
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
                if cfg.policy == "MS" and cfg.input_order == "random":
                    # SPEC 6: inputs above every neuron, by the pass's order key (the
                    # packed keys of kernels/select.py; ties to the lower index)
                    high = sortable_key(key)
                    high[:, :n0] = 0x7F800000 + rng.input_order_key(seed, t, torch.arange(B)[:, None], idx[:, :n0])
                    packed = ((high << 32) | (N - 1 - idx)).masked_fill(~pending, -2**63)
                    order = packed.argsort(1, descending=True)[:, :cfg.forward_group_size]
                else:
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
                current = maps.current(vals)
                recv = maps.receivers(deliv) & is_neuron
                v, o, pending, pre, refr, acc, out_fired = evaluate(v, o, pending, pre, refr, acc, current,
                                                                    recv, k)
                steps += active
                first = torch.where((first < 0) & out_fired, steps, first)
                k += 1
            steps_all[t] = steps
            outs.append(v[:, out_sl] if cfg.readout == "potential" else acc)
        self.stats = {"forward_steps": steps_all}
        return torch.stack(outs)
