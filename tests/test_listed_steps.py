"""Sync-free conv steps at a fixed-size list of their receivers (`receivers.ListedReceivers`).

On CUDA (the sync-free mode, `plan.SYNC_FREE_DEVICES`) a conv step without autograd
adds its deliveries into kept [B, W] buffers, evaluates the neurons at
`ImageSynapses.receiver_list` (every target of every delivered entry, repeats
included; shapes fixed by K) and zeroes the buffers there again, when that list is at
most `plan.LISTED_BELOW` of the state's width. What is demanded here:

- the list is exactly the deliveries' targets: counting its valid entries per column
  gives the received counts the delivery kernels write (multiplicities included), and
  an entry that reaches nobody lists its own sample's dump column;
- the listed steps change nothing: one training iteration (forward, checkpointed
  backward, nested sub-segments) with the listed steps forced on the CPU is bitwise
  equal to the default CPU mode in outputs, every stat (the currents-to-spike
  histogram too) and gradients, for MS with noise and dropouts, RS with fill_slots on
  an odd-sized pooled net, prioritized input, barrier messages; and the path was taken;
- the kept buffers are all zero after the call (zeroed at the receivers only);
- no tensor-to-host conversion in the loops but the stop test (the guard of
  tests/test_no_sync.py);
- the choice is fixed by K and the network (VGG-7: listed at K = 8, not at K = 64);
- the Triton kernels (interpreted) give the same outputs and stats with listed steps;
  on a GPU (skipped without one) a narrow VGG-7 runs them under
  ``set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import asynctrain as at
from asynctrain import engine, plan
from asynctrain.network import Network
from asynctrain.receivers import ListedReceivers
from conftest import BASE, cuda_or_skip
from test_conv_engine import conv_net, image_frames
from test_no_sync import CHILD_CONV, _Conversions, _iteration, _sync_mode, _watch_loops


def _conv(kind, policy, K=4, **kw):
    shape = {"pool": (2, 6, 6), "odd": (2, 5, 7), "deep": (1, 6, 6)}[kind]
    cfg = at.SimConfig(**BASE, policy=policy, forward_group_size=K, **kw)
    return conv_net(kind), cfg, image_frames(3, 3, shape, p=0.4)


CASES = {
    "MS-noise-dropout": lambda: _conv("pool", "MS", momentum_noise=0.1, network_dropout=0.2,
                                      refractory_dropout=0.3),
    "RS-fill-odd": lambda: _conv("odd", "RS", fill_slots=True, refractory_dropout=0.3),
    "MS-fill-prioritized": lambda: _conv("pool", "MS", prioritize_input=True, fill_slots=True),
    "RS-deep-barrier": lambda: _conv("deep", "RS", K=2, barrier_messages=True, refractory=False),
    "MS-fill-fire-or-last": lambda: _conv("pool", "MS", fill_slots=True, refractory_dropout=0.3,
                                          surrogate_at="fire_or_last"),
}


@contextlib.contextmanager
def _listed(monkeypatch):
    """Force the sync-free mode with listed steps on the CPU; yields the engines made."""
    made = []
    init = engine.Engine.__init__

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(engine.Engine, "__init__", recording_init)
    with plan.forced(sync_free=True, steps="listed"):
        yield made


@pytest.mark.parametrize("kind", ["pool", "odd", "deep", "vgg"])
def test_receiver_list_is_the_deliveries_targets(kind):
    if kind == "vgg":
        from asynctrain.models import vgg7
        module = vgg7(width=1 / 16, image_size=16)
    else:
        module = conv_net(kind)
    net = Network.from_module(module, getattr(module, "input_shape", None))
    syn, w = net.synapses, net.width + 1
    tables = net.tables(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    B, K = 3, 7
    # entries of every source layer, outputs and the dump (reach nobody)
    sel = torch.randint(0, w, (B, K), generator=g)
    sel[0, 0] = w - 1
    sel[1, 0] = net.output_slice.start
    flat = torch.cat([m.weight.detach().reshape(-1) for m in module if hasattr(m, "weight")])
    vals = torch.rand(B, K, generator=g)
    vals[2, :2] = 0.0  # zero values are received too
    current, counts = syn.deliver(vals, sel, flat, tables.source_slot)
    idx, valid = syn.receiver_list(sel, tables.source_slot)
    assert idx.shape == valid.shape == (B * K * syn.list_width,)
    listed = torch.bincount(idx[valid], minlength=B * w).view(B, w)
    assert torch.equal(listed.to(torch.int32), counts), "the list is not the deliveries' targets"
    assert int(counts.sum()) > 0
    dump = (idx.view(B, -1)[~valid.view(B, -1)] % w)
    assert bool((dump == w - 1).all())
    rows = (idx // w).view(B, -1)
    assert torch.equal(rows, torch.arange(B)[:, None].expand_as(rows)), "an entry listed another sample"


@pytest.mark.parametrize("name", sorted(CASES))
def test_listed_steps_change_nothing(name, monkeypatch):
    net, cfg, frames = CASES[name]()
    want = _iteration(net, cfg, frames, "torch", record_currents=True)
    calls, modes = [], []
    step, init = ListedReceivers.step, ListedReceivers.__init__
    monkeypatch.setattr(ListedReceivers, "step", lambda self, *a: calls.append(1) or step(self, *a))
    monkeypatch.setattr(ListedReceivers, "__init__", lambda self, *a: modes.append(self) or init(self, *a))
    with _listed(monkeypatch):
        got = _iteration(net, cfg, frames, "torch", record_currents=True)
    assert len(calls) > int(want[1]["forward_steps"].sum()) // 2, "the listed steps did not run"
    assert torch.equal(got[0], want[0])
    assert want[1].keys() == got[1].keys()
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in want[2]), "vacuous"
    assert modes
    for mode in modes:  # zeroed at the receivers only, yet all zero again
        assert mode.buffers, "no buffers were kept"
        for c, n in mode.buffers.values():
            assert not c.any() and not n.any()


def test_nested_segments_with_listed_records(monkeypatch):
    """Long passes split their segments again (`Plan.sub_segment`): the listed records
    of the inner sweeps too, against the default mode."""
    net, cfg, frames = _conv("pool", "MS", K=1, refractory_dropout=0.3)
    want = _iteration(net, cfg, frames, "torch")
    with _listed(monkeypatch) as made:
        got = _iteration(net, cfg, frames, "torch")
    assert any(e.plan.nested and e.plan.sub_segment(int(want[1]["forward_steps"].sum())) for e in made), \
        "vacuous"
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)


def test_listed_steps_convert_nothing_but_the_stop_test(monkeypatch):
    net, cfg, frames = CASES["RS-fill-odd"]()
    conv = _Conversions(monkeypatch)
    reads = _watch_loops(monkeypatch, conv.watching, conv.allowed)
    with _listed(monkeypatch):
        out, stats, grads = _iteration(net, cfg, frames, "torch", record_currents=True)
    assert conv.seen == []
    T = frames.shape[0]
    assert T <= len(reads) <= T + int(stats["forward_steps"].max(1).values.sum()), reads
    assert int(stats["forward_steps"].sum()) > 0


def test_the_choice_is_fixed_by_K_and_the_network(monkeypatch):
    from asynctrain.models import vgg7
    module = vgg7()
    network = Network.from_module(module, module.input_shape)
    assert network.synapses.list_width == 9 * 256

    def listed(K):
        cfg = at.SimConfig(policy="MS", K=K, theta=0.2, tau=float("inf"))
        return engine.Engine(network, cfg, batch=2, device=torch.device("cpu"), dtype=torch.float32,
                             training=True, seed=0).plan.steps == "listed"
    with plan.forced(sync_free=True):
        assert listed(8) and listed(16) and not listed(32) and not listed(64)
    assert not listed(8), "listed steps outside the sync-free mode"


CHILD = textwrap.dedent("""
    import json, torch, asynctrain as at
    from asynctrain import plan
    torch.manual_seed(0)
    CHILD_CONV
    weights = torch.linspace(-1, 1, 5)
    cfg = at.SimConfig(K=4, policy="MS", theta=0.3, tau=20.0, refractory_dropout=0.3, fill_slots=True)
    runs = []
    for steps in ("whole", "listed"):
        with plan.forced(sync_free=True, steps=steps):
            snn = at.AsyncSNN(conv, cfg, backend="triton", deterministic=True, record_currents=True).train()
            out = snn(images, seed=5)
            (out * weights).sum().backward()
        runs.append((out.detach(), {k: v for k, v in snn.stats.items() if isinstance(v, torch.Tensor)},
                     torch.cat([p.grad.flatten() for p in conv.parameters()])))
        conv.zero_grad()
    (o0, s0, g0), (o1, s1, g1) = runs
    print(json.dumps(dict(out=torch.equal(o0, o1), stats=[k for k in s0 if not torch.equal(s0[k], s1[k])],
                          grad_err=float((g0 - g1).abs().max()), grad_norm=float(g0.norm()),
                          steps=int(s0["forward_steps"].max()))))
""").replace("CHILD_CONV\n", CHILD_CONV)


def test_listed_steps_on_the_triton_kernels():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    v = json.loads(r.stdout.strip().splitlines()[-1])
    assert v["out"] and v["stats"] == [], v
    # the same kernels over the same entries; sums of the weight gradient in another order
    assert v["grad_err"] <= 1e-5 * max(1.0, v["grad_norm"]), v
    assert v["steps"] > 3 and v["grad_norm"] > 0, ("vacuous", v)


def test_cuda_listed_conv_steps_have_no_sync(monkeypatch):
    """A narrow VGG-7 (width 1/16, 16x16 images), K = 8, triton, listed steps forced."""
    dev = cuda_or_skip()
    from asynctrain.models import vgg7
    net = vgg7(width=1 / 16, image_size=16).to(dev)
    frames = image_frames(3, 4, (3, 16, 16), p=0.3).to(dev)
    cfg = at.SimConfig(**BASE, policy="MS", forward_group_size=8, refractory_dropout=0.3)
    with plan.forced(steps="listed"):
        want = _iteration(net, cfg, frames, "triton")  # compiles outside the check
        reads = _watch_loops(monkeypatch, lambda: _sync_mode("error"), lambda: _sync_mode("default"))
        out, stats, grads = _iteration(net, cfg, frames, "triton")
    assert int(stats["forward_steps"].max()) > 4 and any(float(g.abs().sum()) > 0 for g in grads), "vacuous"
    assert len(reads) >= frames.shape[0], reads  # the stop tests' reads, allowed: one per pass at least
    assert torch.equal(stats["forward_steps"], want[1]["forward_steps"])
