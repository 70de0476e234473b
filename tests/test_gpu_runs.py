"""Races, checked where they can be: on a GPU (skipped without one; the interpreter
runs a program sequentially, so it sees no race between the phases of a fused step,
its barriers or the atomics).

- The fused Triton steps (persistent forward, replay, backward) 10 times on the same
  input and seed: spikes, stats and potentials bitwise equal every time (the forward
  has no atomics: a difference is a race between the phases of a step); gradients to
  fp32 tolerance (the fused backward adds the weight-table gradient with float atomics).
- ``deterministic=True`` (per-op kernels, weight-table gradient without atomics) 10
  times: spikes and gradients bitwise equal. The per-op forward adds currents with
  float atomics, so the weights are multiples of 2**-10: every sum of currents is then
  exact in any order, and equal spikes are a fair demand (the same holds for the
  comparison of two float-atomic implementations in
  tests/test_kernels_triton_conv.py).
"""

from __future__ import annotations

import pytest
import torch

import asynctrain as at
from asynctrain import backends
from conftest import BASE, STAT_KEYS, TOL, cuda_or_skip, dyadic_, make_frames, make_net

SIZES = [350, 128, 128, 128, 20]
RUNS = 10


def _runs(dev, cfg, net, frames, deterministic: bool):
    w = torch.randn(frames.shape[0], frames.shape[1], SIZES[-1], generator=torch.Generator().manual_seed(3))
    res = []
    for _ in range(RUNS):
        snn = at.AsyncSNN(net, cfg, backend="triton", deterministic=deterministic).train()
        out = snn(frames, seed=7)
        (out * w.to(dev)).sum().backward()
        res.append((out.detach().cpu(), {k: snn.stats[k].cpu() for k in (*STAT_KEYS, "final_v")},
                    [m.weight.grad.cpu() for m in net]))
        net.zero_grad()
    return res


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_cuda_fused_steps_repeat_bitwise(policy):
    dev = cuda_or_skip()
    cfg = at.SimConfig(**BASE, policy=policy, forward_group_size=8, momentum_noise=0.1, refractory_dropout=0.5,
                       network_dropout=0.1)
    net = make_net(SIZES, scale=0.15, shift=0.02).to(dev)
    frames = make_frames(6, 16, SIZES[0], p=0.05).to(dev)
    assert backends.resolve("triton", dev).fused is not None
    res = _runs(dev, cfg, net, frames, deterministic=False)
    out0, st0, g0 = res[0]
    assert int(st0["forward_steps"].max()) > 4 and out0.sum() > 0, "vacuous"
    for i, (out, st, g) in enumerate(res[1:], 1):
        assert torch.equal(out, out0), f"run {i}: output spike counts differ"
        for k, v in st.items():
            assert torch.equal(v, st0[k]), f"run {i}: stats[{k!r}] differ"
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_cuda_deterministic_gradients_repeat_bitwise():
    dev = cuda_or_skip()
    cfg = at.SimConfig(**BASE, policy="MS", forward_group_size=8, momentum_noise=0.1, refractory_dropout=0.5)
    net = dyadic_(make_net(SIZES, scale=0.15, shift=0.02)).to(dev)
    frames = make_frames(6, 16, SIZES[0], p=0.05).to(dev)
    assert backends.resolve("triton", dev, deterministic=True).fused is None
    res = _runs(dev, cfg, net, frames, deterministic=True)
    out0, st0, g0 = res[0]
    assert int(st0["forward_steps"].max()) > 4 and sum(float(g.abs().sum()) for g in g0) > 0, "vacuous"
    for i, (out, st, g) in enumerate(res[1:], 1):
        assert torch.equal(out, out0), f"run {i}: output spike counts differ"
        for k, v in st.items():
            assert torch.equal(v, st0[k]), f"run {i}: stats[{k!r}] differ"
        for l, (a, b) in enumerate(zip(g, g0)):
            assert torch.equal(a, b), f"run {i}: layer {l} gradient not bitwise equal " \
                                      f"(max |diff| {(a - b).abs().max().item():.3g})"


def _fp32_sum(x: torch.Tensor) -> float:
    s = torch.zeros((), dtype=torch.float32)
    for v in x:  # one fp32 rounding per addition, in this order
        s = s + v
    return float(s)


def test_dyadic_weights_make_sums_order_free():
    # the premise of the tests above, on the CPU: a sum of dyadic currents is the same
    # in any order (random fp32 weights are not)
    g = torch.Generator().manual_seed(0)
    w = dyadic_(make_net([300, 1], scale=0.15, shift=0.02))[0].weight[0].detach()
    assert torch.equal(w * 2**10, torch.round(w * 2**10))
    assert len({_fp32_sum(w[torch.randperm(300, generator=g)]) for _ in range(10)}) == 1
    raw = make_net([300, 1], scale=0.15, shift=0.02)[0].weight[0].detach()
    assert len({_fp32_sum(raw[torch.randperm(300, generator=g)]) for _ in range(10)}) > 1
