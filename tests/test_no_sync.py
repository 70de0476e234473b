"""No host sync inside the step loop (CUDA), and what makes that possible changes nothing.

- The per-op loop's stop test every N steps (`plan.STOP_EVERY`, N = 8 on CUDA): on
  the CPU with N = 3 and 8 against N = 1, outputs, every stat and the gradients are
  bitwise equal (the extra steps after the last sample is done are recorded no-ops,
  replayed by the backward too), fully connected (MS with noise and both dropouts,
  RS with fill_slots) and conv.
- A CPU guard that can fail (`asynctrain.traffic.HostReads`): with the loop in its
  sync-free mode (as on CUDA, `plan.SYNC_FREE_DEVICES`, forced with `plan.forced`),
  one training iteration (fused `cpu` steps, the per-op torch loop, conv networks with
  whole-state and listed steps; whole iterations with the optimizer step, twice)
  calls nothing a CUDA run would pay a host sync or a blocking copy for inside the
  forward's loops (`loop.CallLoop.forward`) or the backward's segment sweeps
  (`loop.CallLoop.sweep_segment`), except the stop test (`kernels/host.py`): no
  conversion to a host value (item, tolist, bool, int, float, index, complex, numpy,
  cpu, __array__), no op of data-dependent shape (nonzero, argwhere, masked_select,
  unique, bincount, repeat_interleave, one-argument where) or host bool (equal,
  allclose, is_nonzero), no boolean-mask indexing, no Python number assigned through
  a tensor index, no tensor built from Python values (`traffic.KINDS`). Each kind
  has deliberately bad snippets that the guard must catch, in the forward's step
  loop and in the backward sweep. The same run in the default CPU mode does call
  them (listing pending entries and receivers, packing checkpoints sparsely): the
  guard sees them.
- The sync-free mode against the default one on the CPU: bitwise equal (fused and
  per-op fully connected loops, fill_slots, random input order, histogram; conv
  networks: the per-layer split without a host read, dense steps and records);
  backend="triton" interpreted too (the select kernel computing its keys), and
  against backend="torch" in the sync-free mode (the same spikes and stats).
- On a GPU (skipped without one): the same iteration with the triton backend under
  ``torch.cuda.set_sync_debug_mode("error")``, the stop test's reads excepted and
  counted (one per pass, then one per launch of the fused steps or per 8 per-op
  steps), fully connected (fused and per-op kernels) and a narrow VGG-7.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import asynctrain as at
from asynctrain import plan, traffic
from asynctrain.kernels import host
from asynctrain.loop import CallLoop
from conftest import BASE, STAT_KEYS, cuda_or_skip, make_frames, make_net
from test_conv_engine import conv_net, image_frames

SIZES = [40, 24, 24, 6]


def _iteration(net, cfg, frames, backend: str, seed: int = 5, record_currents: bool = False,
               deterministic: bool = False, checkpoint_every: int | None = None):
    """One training iteration; returns (out, stats, grads)."""
    snn = at.AsyncSNN(net, cfg, backend=backend, record_currents=record_currents,
                      deterministic=deterministic, checkpoint_every=checkpoint_every).train()
    out = snn(frames, seed=seed)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    grads = torch.autograd.grad((out * w).sum(), [p for p in net.parameters()])
    return out.detach(), {k: v.clone() for k, v in snn.stats.items() if isinstance(v, torch.Tensor)}, grads


def _fc(policy, **kw):
    cfg = at.SimConfig(**BASE, policy=policy, forward_group_size=3, **kw)
    return make_net(SIZES, scale=0.5, shift=0.1), cfg, make_frames(4, 5, SIZES[0], p=0.3)


CASES = {
    "fc-MS-noise-dropout": lambda: _fc("MS", momentum_noise=0.1, refractory_dropout=0.3, network_dropout=0.2),
    "fc-RS-fill": lambda: _fc("RS", fill_slots=True, refractory_dropout=0.3),
    "fc-MS-fire-or-last": lambda: _fc("MS", refractory_dropout=0.3, surrogate_at="fire_or_last"),
    "conv-MS": lambda: (conv_net("pool"), at.SimConfig(**BASE, policy="MS", forward_group_size=4,
                                                        refractory_dropout=0.3),
                        image_frames(3, 3, (2, 6, 6), p=0.4)),
}


@pytest.mark.parametrize("every", [3, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stop_every_n_steps_changes_nothing(case, every, monkeypatch):
    net, cfg, frames = CASES[case]()
    n_ops = []
    run = CallLoop.forward

    def counting_run(*a, **kw):
        res = run(*a, **kw)
        n_ops.append(len(res.ops))
        return res

    monkeypatch.setattr(CallLoop, "forward", counting_run)
    want = _iteration(net, cfg, frames, "torch")
    with plan.forced(stop_every=every):
        got = _iteration(net, cfg, frames, "torch")
    assert n_ops[1] > n_ops[0], "vacuous: no step ran after every sample was done"
    assert torch.equal(got[0], want[0])
    assert want[1].keys() == got[1].keys() and set(STAT_KEYS) <= set(want[1])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    assert int(want[1]["forward_steps"].sum()) > 0 and any(g.abs().sum() > 0 for g in want[2]), "vacuous"
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)


# --- the guard: tensor-to-host conversions inside the loop --------------------------
class _Conversions(traffic.HostReads):
    """The guard (`asynctrain.traffic.HostReads`: every kind of `traffic.KINDS`),
    installed for one test; records while `watching`, not while `allowed`."""

    def __init__(self, monkeypatch, on_read=None):
        super().__init__(on_read=on_read, setattr=monkeypatch.setattr)
        self.__enter__()


def _watch_loops(monkeypatch, region, allow):
    """Run `CallLoop.forward` and `CallLoop.sweep_segment` inside `region()`, the stop
    test's `host.read` inside `allow()`; returns the list of reads (their values)."""
    reads = []
    run, sweep, read = CallLoop.forward, CallLoop.sweep_segment, host.read

    def in_region(fn):
        def wrapped(*a, **kw):
            with region():
                return fn(*a, **kw)
        return wrapped

    def counted_read(x):
        with allow():
            v = read(x)
        reads.append(v)
        return v

    monkeypatch.setattr(CallLoop, "forward", in_region(run))
    monkeypatch.setattr(CallLoop, "sweep_segment", in_region(sweep))
    monkeypatch.setattr(host, "read", counted_read)
    return reads


# (backend, case): "cpu" runs the fused C steps, "torch" the per-op loop
def _knobs(policy, **kw):
    return _fc(policy, momentum_noise=0.1, refractory_dropout=0.3, network_dropout=0.2, **kw)


def _conv(policy, kind="pool", **kw):
    cfg = at.SimConfig(**BASE, policy=policy, forward_group_size=4, refractory_dropout=0.3, **kw)
    frames = image_frames(3, 3, (2, 6, 6) if kind == "pool" else (2, 5, 7), p=0.4)
    return conv_net(kind), cfg, frames


LOOPS = {
    "fused-MS": ("cpu", lambda: _knobs("MS", prioritize_input=True)),
    "fused-RS-fill": ("cpu", lambda: _knobs("RS", fill_slots=True)),
    "per-op-MS-random-order": ("torch", lambda: _knobs("MS", input_order="random")),
    "per-op-MS-fill-prioritized": ("torch", lambda: _knobs("MS", fill_slots=True, prioritize_input=True)),
    "per-op-RS-fill": ("torch", lambda: _knobs("RS", fill_slots=True)),
    "conv-MS-noise-dropout": ("torch", lambda: _conv("MS", momentum_noise=0.1, network_dropout=0.2)),
    "conv-RS-fill-odd": ("torch", lambda: _conv("RS", "odd", fill_slots=True)),
    "conv-MS-prioritized": ("torch", lambda: _conv("MS", prioritize_input=True)),
}


def _loop_case(name):
    backend, make = LOOPS[name]
    return backend, make()


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_sync_free_mode_changes_nothing(name, monkeypatch):
    """The sync-free mode (CUDA's: keys over every column, dense checkpoints, dense
    dropout draws and histogram counts) on the CPU against the default mode: bitwise
    equal outputs, stats (the currents-to-spike histogram too) and gradients."""
    backend, (net, cfg, frames) = _loop_case(name)
    want = _iteration(net, cfg, frames, backend, record_currents=backend == "torch")
    with plan.forced(sync_free=True):
        got = _iteration(net, cfg, frames, backend, record_currents=backend == "torch")
    assert torch.equal(got[0], want[0])
    assert want[1].keys() == got[1].keys()
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)
    assert int(want[1]["forward_steps"].sum()) > 0 and any(g.abs().sum() > 0 for g in want[2]), "vacuous"


@pytest.mark.parametrize("name", ["per-op-MS-fill-prioritized", "conv-RS-fill-odd"])
def test_sync_free_mode_changes_nothing_under_plain_autograd(name, monkeypatch):
    """``checkpoint_every=0``: autograd through every step (the Functions of ops.py and
    conv._ImageDeliver) in the sync-free mode, against the default mode."""
    backend, (net, cfg, frames) = _loop_case(name)
    want = _iteration(net, cfg, frames, backend, checkpoint_every=0)
    with plan.forced(sync_free=True):
        got = _iteration(net, cfg, frames, backend, checkpoint_every=0)
    assert torch.equal(got[0], want[0])
    for k in want[1]:
        assert torch.equal(got[1][k], want[1][k]), k
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)
    assert any(g.abs().sum() > 0 for g in want[2]), "vacuous"


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_step_loop_converts_nothing_but_the_stop_test(name, monkeypatch):
    backend, (net, cfg, frames) = _loop_case(name)
    hist = backend == "torch"
    conv = _Conversions(monkeypatch)
    reads = _watch_loops(monkeypatch, conv.watching, conv.allowed)
    _iteration(net, cfg, frames, backend, record_currents=hist)  # the default CPU mode
    assert "nonzero" in conv.seen, "the guard saw nothing in the default mode: it cannot fail"
    conv.seen.clear()
    reads.clear()
    with plan.forced(sync_free=True):
        out, stats, grads = _iteration(net, cfg, frames, backend, record_currents=hist)
    assert conv.seen == []
    T = frames.shape[0]
    # one read per pass, then one per launch of fused steps or per step (N = 1 on CPU)
    assert T <= len(reads) <= T + int(stats["forward_steps"].max(1).values.sum()), reads
    assert int(stats["forward_steps"].sum()) > 0 and any(g.abs().sum() > 0 for g in grads), "vacuous"


def _setitem_scalar(m, x):
    y = x.clone()
    y[m.view(-1)[:2].long()] = 0.0  # rows 0 / 1: a Python number through a tensor index


def _setitem_mask(m, x):
    y = x.clone()
    y[m] = 0.0


# kind -> deliberately bad snippets, each called with (flags bool [B, W], values [B, W])
BAD = {
    "item": [lambda m, x: x.sum().item()],
    "tolist": [lambda m, x: x[:1].tolist()],
    "bool": [lambda m, x: bool(m.any()), lambda m, x: 1 if m.any() else 0],
    "int": [lambda m, x: int(m.sum())],
    "float": [lambda m, x: float(x.sum())],
    "index": [lambda m, x: operator.index(m.sum()), lambda m, x: list(range(m.sum()))],
    "complex": [lambda m, x: complex(x.sum())],
    "numpy": [lambda m, x: x.numpy()],
    "cpu": [lambda m, x: x.cpu()],
    "array": [lambda m, x: np.asarray(x)],
    "nonzero": [lambda m, x: m.nonzero(), lambda m, x: torch.nonzero(m), lambda m, x: m.nonzero(as_tuple=True)],
    "argwhere": [lambda m, x: torch.argwhere(m)],
    "masked_select": [lambda m, x: x.masked_select(m), lambda m, x: torch.masked_select(x, m)],
    "unique": [lambda m, x: torch.unique(x), lambda m, x: x.unique()],
    "bincount": [lambda m, x: torch.bincount(m.view(-1).long(), minlength=3)],
    "repeat_interleave": [lambda m, x: torch.repeat_interleave(x.view(-1), m.view(-1).long()),
                          lambda m, x: x.view(-1).repeat_interleave(m.view(-1).long())],
    "where(cond)": [lambda m, x: torch.where(m)],
    "equal": [lambda m, x: torch.equal(x, x), lambda m, x: x.equal(x)],
    "allclose": [lambda m, x: torch.allclose(x, x)],
    "is_nonzero": [lambda m, x: torch.is_nonzero(m.any())],
    "bool-mask index": [lambda m, x: x[m], _setitem_mask, lambda m, x: x.clone().index_put_((m,), x[0, 0]),
                        lambda m, x: x.index_put((m,), x[0, 0])],
    "scalar through a tensor index": [_setitem_scalar],
    "tensor from Python values": [lambda m, x: torch.tensor([0.5]), lambda m, x: torch.as_tensor([1, 2]),
                                  lambda m, x: torch.asarray([1.0], device=x.device)],
}


def test_every_kind_has_bad_snippets():
    assert set(BAD) == set(traffic.KINDS)


@pytest.mark.parametrize("kind,i", [(k, i) for k in sorted(BAD) for i in range(len(BAD[k]))])
def test_the_guard_catches_each_kind_in_the_loops(kind, i, monkeypatch):
    """A deliberately bad snippet run inside the forward's step loop (at each step's
    selection) and inside the backward sweep (at each step's reverse) of a sync-free
    per-op iteration: the guard records its kind, at both places, and nothing else;
    good code around it (the same iteration without the snippet) records nothing."""
    from asynctrain.engine import Engine
    from asynctrain.steps import PerOpMode
    snippet, site, where = BAD[kind][i], [None], set()
    guard = _Conversions(monkeypatch, on_read=lambda k: where.add((site[0], k)))
    _watch_loops(monkeypatch, guard.watching, guard.allowed)
    select, step_backward = Engine.select, PerOpMode.step_backward
    bad = [False]

    def at(name, fn, args):
        if bad[0]:
            site[0] = name
            snippet(*args)
            site[0] = None
        return fn()

    monkeypatch.setattr(Engine, "select", lambda self, pending, pre, *a, **kw: at(
        "forward", lambda: select(self, pending, pre, *a, **kw), (pending, pre)))
    monkeypatch.setattr(PerOpMode, "step_backward", lambda self, op, rec, sweep: at(
        "backward", lambda: step_backward(self, op, rec, sweep), (sweep.adj.v > 0, sweep.adj.v)))
    net, cfg, frames = _fc("MS")
    with plan.forced(sync_free=True):
        _iteration(net, cfg, frames[:2], "torch")
        assert guard.seen == [], guard.where
        bad[0] = True
        _iteration(net, cfg, frames[:2], "torch")
    assert where == {("forward", kind), ("backward", kind)}, (where, guard.where[:4])


def test_surrogate_constants_are_cached_and_copy_nothing_from_the_host():
    """The LIF backward's and the fused backward's surrogate constants
    (`kernels/lif.py` `surrogate_constants`): the numbers ``torch.tensor`` gives, built
    from kernel arguments (no tensor from Python values, even at the first call) and
    cached per (alpha, dtype, device)."""
    import math
    from asynctrain.kernels.lif import surrogate_constants
    alpha = 2.3  # alpha / 2 and pi / 2 * alpha round differently in fp32 and fp64
    with traffic.HostReads() as guard, guard.watching():
        got = {dtype: surrogate_constants(alpha, dtype, torch.device("cpu"))
               for dtype in (torch.float32, torch.float64)}
        again = {dtype: surrogate_constants(alpha, dtype, torch.device("cpu")) for dtype in got}
    assert guard.seen == []
    for dtype, c in got.items():
        assert again[dtype] is c
        assert c.dtype == dtype and torch.equal(c, torch.tensor([alpha / 2, math.pi / 2 * alpha], dtype=dtype))


ITERATIONS = {  # name: (backend, make, the step mode forced)
    "mlp-fused": ("cpu", lambda: _knobs("RS"), None),
    "mlp-per-op": ("torch", lambda: _knobs("MS", fill_slots=True, surrogate_at="fire_or_last"), None),
    "conv-whole": ("torch", lambda: _conv("MS", momentum_noise=0.1, network_dropout=0.2), "whole"),
    "conv-listed": ("torch", lambda: _conv("RS", "odd", fill_slots=True), "listed"),
}


@pytest.mark.parametrize("name", sorted(ITERATIONS))
def test_training_iterations_convert_nothing_but_the_stop_test(name, monkeypatch):
    """Whole training iterations (forward, checkpointed backward, optimizer step), twice,
    in the sync-free mode: MLPs with the fused and the per-op steps, conv networks with
    the whole-state and the listed steps; nothing in their loops converts to the host
    but the stop test."""
    backend, make, steps = ITERATIONS[name]
    net, cfg, frames = make()
    guard = _Conversions(monkeypatch)
    reads = _watch_loops(monkeypatch, guard.watching, guard.allowed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    snn = at.AsyncSNN(net, cfg, backend=backend).train()
    w = None
    with plan.forced(sync_free=True, steps=steps):
        for _ in range(2):
            opt.zero_grad()
            out = snn(frames, seed=5)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) if w is None else w
            (out * w).sum().backward()
            opt.step()
    assert guard.seen == [], guard.where
    assert reads and int(snn.stats["forward_steps"].sum()) > 0, "vacuous"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), "vacuous"


# --- on a GPU -------------------------------------------------------------------------------
@contextlib.contextmanager
def _sync_mode(mode):
    was = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(was)


@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "per-op"])
@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_cuda_fc_step_loop_has_no_sync(policy, deterministic, monkeypatch):
    """shd-like MLP (700 -> 64 -> 64 -> 20), K = 8, training with noise and both
    dropouts, prioritized and queued input; the fused steps, and the per-op kernels
    (``deterministic=True``) with fill_slots."""
    dev = cuda_or_skip()
    net = make_net([700, 64, 64, 20], scale=0.15, shift=0.02).to(dev)
    frames = make_frames(6, 16, 700, p=0.05).to(dev)
    cfgs = [at.SimConfig(**BASE, policy=policy, forward_group_size=8, momentum_noise=0.1,
                         refractory_dropout=0.3, network_dropout=0.1, prioritize_input=prioritize,
                         fill_slots=deterministic)
            for prioritize in (False, True)]
    for cfg in cfgs:
        _iteration(net, cfg, frames, "triton", deterministic=deterministic)  # compile outside the check
    reads = _watch_loops(monkeypatch, lambda: _sync_mode("error"), lambda: _sync_mode("default"))
    for cfg in cfgs:
        reads.clear()
        out, stats, grads = _iteration(net, cfg, frames, "triton", deterministic=deterministic)
        assert int(stats["forward_steps"].max()) > 4 and any(float(g.abs().sum()) > 0 for g in grads), "vacuous"
        # one read per pass, then one per launch of the fused steps (>= 1 step each) or
        # per 8 per-op steps
        T = frames.shape[0]
        assert T <= len(reads) <= T + int(stats["forward_steps"].max(1).values.sum()), reads


def test_cuda_conv_step_loop_has_no_sync(monkeypatch):
    """A narrow VGG-7 (width 1/16, 16x16 images), K = 8, the triton backend."""
    dev = cuda_or_skip()
    from asynctrain.models import vgg7
    net = vgg7(width=1 / 16, image_size=16).to(dev)
    frames = image_frames(3, 4, (3, 16, 16), p=0.3).to(dev)
    cfg = at.SimConfig(**BASE, policy="MS", forward_group_size=8, refractory_dropout=0.3)
    _iteration(net, cfg, frames, "triton")  # compile outside the check
    reads = _watch_loops(monkeypatch, lambda: _sync_mode("error"), lambda: _sync_mode("default"))
    out, stats, grads = _iteration(net, cfg, frames, "triton")
    assert int(stats["forward_steps"].max()) > 4 and any(float(g.abs().sum()) > 0 for g in grads), "vacuous"
    T = frames.shape[0]
    assert T <= len(reads) <= T + int(stats["forward_steps"].max(1).values.sum()), reads


# --- the triton per-op kernels, interpreted (a child process: TRITON_INTERPRET=1) ---------
# A child's tiny conv net and its frames, drawn from the child's global generator (also
# tests/test_listed_steps.py's child).
CHILD_CONV = textwrap.dedent("""
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, bias=False), torch.nn.AvgPool2d(2),
                               torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                               torch.nn.Linear(36, 5, bias=False))
    conv.input_shape = (2, 6, 6)
    for m in conv:
        if hasattr(m, "weight"):
            torch.nn.init.xavier_uniform_(m.weight, gain=3.0)
    images = (torch.rand(2, 2, 2, 6, 6) < 0.4).float()
""")
CHILD = textwrap.dedent("""
    import json, torch, asynctrain as at
    from asynctrain import plan
    torch.manual_seed(0)
    fc = torch.nn.Sequential(torch.nn.Linear(23, 17, bias=False), torch.nn.Linear(17, 11, bias=False),
                             torch.nn.Linear(11, 5, bias=False))
    for m in fc:
        torch.nn.init.xavier_uniform_(m.weight, gain=2.5)
    fc_frames = (torch.rand(4, 3, 23) < 0.3).float()
    weights = torch.linspace(-1, 1, 5)
    CHILD_CONV
    res = {}
    for name, cfg in {
        "MS-random-fill": at.SimConfig(K=3, policy="MS", theta=0.3, tau=20.0, refractory_dropout=0.5,
                                       momentum_noise=0.1, input_order="random", fill_slots=True),
        "RS-fill": at.SimConfig(K=4, policy="RS", theta=0.3, tau=20.0, network_dropout=0.2, fill_slots=True),
        "conv-MS-fill": at.SimConfig(K=4, policy="MS", theta=0.3, tau=20.0, refractory_dropout=0.3,
                                     fill_slots=True),
    }.items():
        net, frames = (conv, images) if name.startswith("conv") else (fc, fc_frames)
        runs = []
        for backend, sync_free in (("triton", False), ("triton", True), ("torch", True)):
            with plan.forced(sync_free=sync_free, stop_every=8 if sync_free else 1):
                snn = at.AsyncSNN(net, cfg, backend=backend, deterministic=True, record_currents=True).train()
                out = snn(frames, seed=5)
                (out * weights).sum().backward()
            runs.append((out.detach(), {k: v for k, v in snn.stats.items() if isinstance(v, torch.Tensor)},
                         torch.cat([p.grad.flatten() for p in net.parameters()])))
            net.zero_grad()
        (o0, s0, g0), (o1, s1, g1), (o2, s2, g2) = runs
        res[name] = dict(out=torch.equal(o0, o1), grads=torch.equal(g0, g1), keys=sorted(s0) == sorted(s1),
                         grad_err=float((g0 - g1).abs().max()),
                         stats=[k for k in s0 if not torch.equal(s0[k], s1[k])],
                         steps=int(s0["forward_steps"].max()), grad_norm=float(g0.norm()),
                         torch_out=torch.equal(o1, o2), torch_keys=sorted(s1) == sorted(s2),
                         torch_stats=[k for k in s1 if k in s2 and not torch.equal(s1[k], s2[k])],
                         torch_grad_err=float((g1 - g2).abs().max()),
                         torch_v_err=float((s1["final_v"] - s2["final_v"]).abs().max()))
    print(json.dumps(res))
""").replace("CHILD_CONV\n", CHILD_CONV)


def test_sync_free_mode_changes_nothing_on_the_triton_kernels():
    """backend="triton" (interpreted, ``deterministic=True``: the per-op kernels) in the
    default mode against the sync-free one (`select_keyed._select_keyed_kernel`): bitwise
    equal; and the sync-free triton run against the sync-free torch one."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, v in res.items():
        assert v["out"] and v["keys"] and v["stats"] == [], (name, v)
        if name.startswith("conv"):
            # the conv kernels' backward reduces each layer's entries sorted by layer
            # (its segment) in other blocks than the CPU split: equal to fp rounding
            assert v["grad_err"] <= 1e-5 * max(1.0, v["grad_norm"]), (name, v)
        else:
            assert v["grads"], (name, v)
        assert v["steps"] > 3 and v["grad_norm"] > 0, ("vacuous", name, v)
        # sync-free triton (the select kernel computes the keys) against sync-free torch
        # (the twin's dense keys): the same spikes and stats; potentials and gradients
        # to fp rounding (the kernels sum currents in another order)
        assert v["torch_out"] and v["torch_keys"] and set(v["torch_stats"]) <= {"final_v"}, (name, v)
        assert v["torch_v_err"] <= 1e-5 and v["torch_grad_err"] <= 1e-5 * max(1.0, v["grad_norm"]), (name, v)
