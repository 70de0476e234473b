"""The benchmarks' dense baseline computes what the engine computes, so cost ratios
compare implementations of one model (benchmarks/cost.py, cost_vgg7.py): fully
connected and convolutional networks."""

import sys
from pathlib import Path

import pytest
import torch

import asynctrain as at
from test_conv_engine import conv_net, image_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dense_baseline import DenseSNN  # noqa: E402


@pytest.mark.parametrize("policy,K,train,prio,readout", [
    ("MS", 3, True, False, "counts"), ("RS", 5, True, False, "counts"), ("MS", 64, False, False, "counts"),
    ("RS", 4, True, True, "potential")])
def test_dense_baseline_matches_engine(policy, K, train, prio, readout):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=False), torch.nn.Linear(24, 16, bias=False),
                              torch.nn.Linear(16, 6, bias=False)).double()
    for m in net:
        torch.nn.init.xavier_uniform_(m.weight, gain=2.5)
    cfg = at.SimConfig(forward_group_size=K, policy=policy, theta=0.3, tau=50.0, refractory_dropout=0.5,
                       momentum_noise=0.1, input_dropout=0.2, network_dropout=0.1,
                       prioritize_input=prio, readout=readout)
    frames = (torch.rand(5, 4, 40) < 0.2).double()
    grads = []
    outs = []
    for mod in (at.AsyncSNN(net, cfg), DenseSNN(net, cfg)):
        mod.train(train)
        out = mod(frames, seed=11)
        (out * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum().backward()
        grads.append([m.weight.grad.clone() for m in net])
        outs.append((out.detach(), mod.stats["forward_steps"]))
        net.zero_grad()
    if K < 16:  # small K must spread a pass over more steps than layers
        assert outs[0][1].max() > len(net), "the case must take several forward steps per pass"
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-10, rtol=1e-8)  # counts: exact
    assert readout == "potential" or torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind,policy,K,train,prio,readout", [
    ("pool", "MS", 3, True, False, "counts"), ("odd", "RS", 5, True, True, "potential"),
    ("deep", "MS", 64, False, True, "potential"), ("pool", "RS", 2, False, False, "counts")])
def test_dense_baseline_matches_engine_conv(kind, policy, K, train, prio, readout):
    net = conv_net(kind, seed=3, dtype=torch.float64)
    cfg = at.SimConfig(forward_group_size=K, policy=policy, theta=0.3, tau=50.0, refractory_dropout=0.5,
                       momentum_noise=0.1, prioritize_input=prio, readout=readout)
    frames = image_frames(2, 3, net.input_shape, analog=prio, dtype=torch.float64)
    grads, outs = [], []
    for mod in (at.AsyncSNN(net, cfg), DenseSNN(net, cfg)):
        mod.train(train)
        out = mod(frames, seed=11)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
        grads.append([m.weight.grad.clone() for m in net if hasattr(m, "weight")])
        outs.append((out.detach(), mod.stats["forward_steps"]))
        net.zero_grad()
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-10, rtol=1e-8)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
