"""Sanity tests of the dense oracle itself (no engine involved)."""

from __future__ import annotations

import math

import pytest
import torch

from asynctrain.config import SimConfig
from dense_oracle import dense_layered, dense_simulate, spike

W0 = [[1.0, 0.5], [0.6, 0.6]]  # in0 -> h0: 1.0, in1 -> h0: 0.5, in -> h1: 0.6
W1 = [[0.5, 1.0]]  # h0 -> out: 0.5, h1 -> out: 1.0


def _hand(T=1, **kw):
    ws = [torch.tensor(W0), torch.tensor(W1)]
    frames = torch.zeros(T, 1, 2)
    frames[0] = 1.0
    # hand-computed numbers: inputs in index order (SPEC 6 `input_order="index"`)
    cfg = SimConfig(**dict(dict(forward_group_size=1, policy="MS", theta=1.0, tau=math.inf,
                                input_order="index"), **kw))
    out, st = dense_simulate(ws, frames, cfg)
    return out, {k: v.squeeze(1) if k not in ("hidden_spikes",) else v for k, v in st.items()}


def test_hand_refractory():
    # k0: in0 -> h0 = 1.0 fires, h1 = 0.6.  k1: in1 -> h0 clamped to 0, h1 = 1.2 fires.
    # k2: MS picks h1 (S=1.2 > 1.0): out = 1.0 fires (step 3).  k3: h0 -> out clamped to 0.
    out, st = _hand()
    assert out.tolist() == [[[1.0]]]
    assert st["V"].tolist() == [[0.0, 0.0, 0.0]]
    assert st["forward_steps"].tolist() == [4]
    assert st["synops"].tolist() == [6]
    assert st["spikes_processed"].tolist() == [4]
    assert st["first_output_step"].tolist() == [3]
    assert st["hidden_spikes"].tolist() == [2]
    assert st["neuron_spikes"].tolist() == [[1, 1, 1]]
    assert st["capped"].tolist() == [False]


def test_hand_no_refractory_with_decay():
    # Same order; h0 keeps 0.5 from in1, out keeps 0.5 from h0. Pass 2 (empty frame):
    # V halves (dt/tau = ln 2), nothing pending, no step.
    out, st = _hand(T=2, refractory=False, tau=10.0 / math.log(2.0), dt=10.0)
    assert out.flatten().tolist() == [1.0, 0.0]
    assert torch.allclose(st["V"], torch.tensor([[0.5, 0.0, 0.5], [0.25, 0.0, 0.25]]))
    assert st["forward_steps"].tolist() == [4, 0]
    assert st["synops"].tolist() == [6, 0]
    assert st["first_output_step"].tolist() == [3, -1]


def test_hand_output_stop_and_cap():
    out, st = _hand(stop="output", steps_after_output=0)
    assert (out.item(), st["forward_steps"].item(), st["synops"].item()) == (1.0, 3, 5)
    assert not st["capped"].item()
    _, st = _hand(stop="output", steps_after_output=1)
    assert st["forward_steps"].item() == 4
    out, st = _hand(max_steps=2)  # h0 and h1 still pending after 2 steps
    assert (out.item(), st["forward_steps"].item(), st["synops"].item()) == (0.0, 2, 4)
    assert st["capped"].item() and st["first_output_step"].item() == -1
    # carry_pending: h0, h1 (outbox 1 each, S cleared -> tie -> h0 first) finish in pass 2.
    out, st = _hand(T=2, max_steps=2, carry_pending=True)
    assert out.flatten().tolist() == [0.0, 1.0]
    assert st["capped"].tolist() == [True, False] and st["first_output_step"].tolist() == [-1, 2]


def test_single_layer_output_in_input_step():
    ws, frames = [torch.tensor([[0.6, 0.6]])], torch.ones(1, 1, 2)
    for prio, first in ((True, 1), (False, 2)):
        cfg = SimConfig(forward_group_size=1, theta=1.0, prioritize_input=prio, stop="output",
                        steps_after_output=0)
        out, st = dense_simulate(ws, frames, cfg)
        assert out.item() == 1.0 and st["first_output_step"].item() == first
        assert st["forward_steps"].item() == first and st["hidden_spikes"].item() == 0


def test_hand_prioritized_input():
    # step 1: h0 = 1.5, h1 = 1.2 both fire.  step 2: h0 (S=1.5) -> out 0.5.  step 3: h1 -> 1.5 fires.
    out, st = _hand(prioritize_input=True)
    assert out.item() == 1.0
    assert st["forward_steps"].tolist() == [3]
    assert st["synops"].tolist() == [6]
    assert st["spikes_processed"].tolist() == [4]
    assert st["first_output_step"].tolist() == [3]


def _net(sizes, scale=0.6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(m, n, generator=g, dtype=torch.float64) + 0.15).to(dtype).requires_grad_()
            for n, m in zip(sizes[:-1], sizes[1:])]


def _frames(T, B, n, p=0.4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < p).to(dtype)


def _grads(ws, out, seed=5):
    c = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * c).sum(), ws)


@pytest.mark.parametrize("readout", ["counts", "potential"])
def test_layered_equals_handwritten_snn(readout):
    sizes, alpha, theta, decay = [6, 5, 4, 3], 2.0, 0.3, math.exp(-10.0 / 20.0)
    ws, frames = _net(sizes), _frames(4, 3, 6)
    cfg = SimConfig(policy="layered", tau=20.0, dt=10.0, theta=theta, surrogate_steepness=alpha,
                    readout=readout)
    out, st = dense_layered(ws, frames, cfg)
    V = [torch.zeros(3, m) for m in sizes[1:]]
    ref = []
    for t in range(4):
        prev = frames[t]
        for l, w in enumerate(ws):
            v1 = V[l] * decay + prev @ w.t()
            sg = torch.atan(math.pi / 2 * alpha * (v1 - theta)) / math.pi  # d/dv = surrogate
            s = (v1 >= theta).float() + (sg - sg.detach())
            V[l] = v1 * (1 - s)
            prev = s
        ref.append(prev if readout == "counts" else V[-1])
    ref = torch.stack(ref)
    assert torch.equal(out, ref)
    assert st["neuron_spikes"].sum() > 0 and (st["forward_steps"] == 3).all()
    for a, b in zip(_grads(ws, out), _grads(ws, ref)):
        assert torch.allclose(a, b, atol=1e-6) and a.abs().sum() > 0


def test_surrogate_backward_formula():
    alpha = 3.0
    x = torch.linspace(-1, 1, 41, dtype=torch.float64, requires_grad=True)
    s = spike(x, alpha)
    assert s.tolist() == [float(v >= 0) for v in x.tolist()]
    assert spike(torch.tensor([0.0]), alpha).item() == 1.0  # fires at V == theta
    (gx,) = torch.autograd.grad(s.sum(), x)
    assert torch.allclose(gx, (alpha / 2) / (1 + (math.pi / 2 * alpha * x.detach()) ** 2), rtol=0, atol=1e-15)


@pytest.mark.parametrize("policy", ["MS", "RS"])
@pytest.mark.parametrize("readout", ["counts", "potential"])
def test_barrier_preset_equals_layered(policy, readout):
    # SPEC 6: K = widest layer, sync = fan-in, barriers on -> exactly the layered result.
    sizes = [7, 6, 5, 4]
    ws, frames = _net(sizes, dtype=torch.float64), _frames(3, 4, 7, dtype=torch.float64)
    fan_in = torch.cat([torch.full((m,), n) for n, m in zip(sizes[:-1], sizes[1:])])
    base = dict(tau=30.0, theta=0.3, surrogate_steepness=2.0, readout=readout)
    cfg = SimConfig(policy=policy, forward_group_size=6, sync_threshold=fan_in, barrier_messages=True,
                    prioritize_input=True, **base)
    out_a, st_a = dense_simulate(ws, frames, cfg, seed=2)
    out_l, st_l = dense_layered(ws, frames, SimConfig(policy="layered", **base))
    assert torch.equal(st_a["neuron_spikes"], st_l["neuron_spikes"]) and st_l["neuron_spikes"].sum() > 3
    assert torch.allclose(out_a, out_l, atol=1e-12)
    assert torch.allclose(st_a["V"], st_l["V"], atol=1e-12)
    assert (st_a["forward_steps"] == 3).all() and torch.equal(st_a["first_output_step"], st_l["first_output_step"])
    for a, b in zip(_grads(ws, out_a), _grads(ws, out_l)):
        assert torch.allclose(a, b, atol=1e-10) and a.abs().sum() > 0


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_large_k_async_gives_layered_spikes(policy):
    sizes = [7, 6, 5, 4]
    ws, frames = _net(sizes, dtype=torch.float64), _frames(3, 4, 7, dtype=torch.float64)
    base = dict(tau=30.0, theta=0.3)
    out_a, st_a = dense_simulate(ws, frames, SimConfig(policy=policy, forward_group_size=32, **base), seed=1)
    out_l, st_l = dense_layered(ws, frames, SimConfig(policy="layered", **base))
    assert torch.equal(st_a["neuron_spikes"], st_l["neuron_spikes"]) and torch.equal(out_a, out_l)
    assert torch.allclose(st_a["V"], st_l["V"], atol=1e-12)


def _busy(policy, seed, training=True, **kw):
    ws = _net([12, 10, 8, 3], scale=0.5)
    frames = _frames(3, 4, 12, p=0.6)
    cfg = SimConfig(policy=policy, forward_group_size=2, theta=0.3, refractory_dropout=0.5, input_dropout=0.2,
                    network_dropout=0.1, momentum_noise=0.1, **kw)
    return dense_simulate(ws, frames, cfg, seed=seed, training=training)


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_deterministic_and_seed_dependent(policy):
    out1, st1 = _busy(policy, 3)
    out2, st2 = _busy(policy, 3)
    assert torch.equal(out1, out2) and all(torch.equal(st1[k], st2[k]) for k in st1)
    assert st1["hidden_spikes"].sum() > 20
    _, st3 = _busy(policy, 4)
    assert not torch.equal(st1["V"], st3["V"])
    if policy == "MS":  # no random draw at all when not training, no noise, index order
        _, a = _busy(policy, 3, training=False, input_order="index")
        _, b = _busy(policy, 4, training=False, input_order="index")
        assert all(torch.equal(a[k], b[k]) for k in a)
        # the random input order (the default) is the seed's, in inference too
        _, a = _busy(policy, 3, training=False)
        _, b = _busy(policy, 4, training=False)
        assert not torch.equal(a["V"], b["V"])
