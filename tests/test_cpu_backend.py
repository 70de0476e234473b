"""The `cpu` backend (fused C steps, kernels/cpu_step.py) against its twin, the torch
backend: the same selections, spikes and stats exactly; potentials within `TOL`
(the K slots of a step are added in another order when torch's unsorted topk
returns them in another order); weight gradients within `TOL` (sums in another
order). Also: selection at the kernel level (MS ties
to the lower index, MS noise, RS keys), the edge cases of the brief, the fallbacks
(conv networks, the currents histogram, autograd through every step) and the
build errors. Whole-network agreement with the dense oracle is in
test_engine_vs_oracle.py (parametrized over both backends).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from asynctrain import AsyncSNN, SimConfig, backends
from asynctrain.engine import Engine
from asynctrain.kernels.cpu_step import CpuSteps
from asynctrain.passes import Pass
from asynctrain.state import State
from asynctrain.kernels import cpu_step
from asynctrain.network import Network
from conftest import BASE, STAT_KEYS, TOL, make_frames, make_net, run_engine

SIZES = [10, 8, 7, 4]


def _both(net, cfg, frames, **kw):
    return [run_engine(net, cfg, frames, backend=b, **kw) for b in ("torch", "cpu")]


def _assert_same(a, b, dtype, readout="counts"):
    out_a, st_a, g_a = a
    out_b, st_b, g_b = b
    for k in STAT_KEYS:
        assert torch.equal(st_a[k], st_b[k]), k
    if readout == "counts":
        assert torch.equal(out_a, out_b)
    torch.testing.assert_close(out_a, out_b, **TOL[dtype])
    torch.testing.assert_close(st_a["final_v"], st_b["final_v"], **TOL[dtype])
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, **TOL[dtype])


CONFIGS = {
    "MS-K1": dict(policy="MS", forward_group_size=1),
    "MS-K3-noise": dict(policy="MS", forward_group_size=3, momentum_noise=0.1),
    "RS-K2": dict(policy="RS", forward_group_size=2),
    "RS-K100": dict(policy="RS", forward_group_size=100),  # more than the width: one step per layer
    "MS-dropouts": dict(policy="MS", forward_group_size=3, refractory_dropout=0.5, network_dropout=0.3),
    "RS-output-stop": dict(policy="RS", forward_group_size=2, stop="output", steps_after_output=1),
    "MS-barrier-sync": dict(policy="MS", forward_group_size=2, barrier_messages=True, sync_threshold=3),
    "RS-prio-potential": dict(policy="RS", forward_group_size=3, prioritize_input=True, readout="potential"),
    "MS-carry-cap": dict(policy="MS", forward_group_size=1, carry_pending=True, max_steps=5),
    "MS-detach-norefr": dict(policy="MS", forward_group_size=2, detach_reset=True, refractory=False),
    "RS-per-neuron": dict(policy="RS", forward_group_size=2, tau=torch.tensor([20.0, math.inf] * 9 + [5.0]),
                          theta=torch.tensor([0.3, 0.2, 0.5] * 6 + [0.4]),
                          sync_threshold=torch.tensor([1, 2] * 9 + [1])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("ck", [None, 1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_matches_torch(name, ck, dtype):
    cfg = SimConfig(**{**BASE, **CONFIGS[name]})
    net = make_net(SIZES, dtype=dtype)
    frames = make_frames(4, 5, SIZES[0], dtype=dtype)
    training = "dropouts" in name or "noise" in name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the capped case warns
        a, b = _both(net, cfg, frames, seed=7, training=training, checkpoint_every=ck)
    _assert_same(a, b, dtype, cfg.readout)
    assert a[1]["hidden_spikes"].sum() > 5, "vacuous: nothing spiked"
    if name == "MS-carry-cap":
        assert a[1]["capped"].any()


def test_no_input_spikes_runs_no_step():
    net = make_net(SIZES)
    frames = torch.zeros(3, 4, SIZES[0])
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2)
    a, b = _both(net, cfg, frames)
    _assert_same(a, b, torch.float32)
    assert (b[1]["forward_steps"] == 0).all() and (b[0] == 0).all()


def test_all_neurons_refractory():
    """Tiny threshold, strong weights: every neuron fires on its first current, then
    stays refractory for the pass; later deliveries change nothing."""
    net = make_net(SIZES, scale=0.0, shift=1.0)
    cfg = SimConfig(**{**BASE, "theta": 1e-3}, policy="RS", forward_group_size=1)
    frames = make_frames(2, 3, SIZES[0], p=0.8)
    a, b = _both(net, cfg, frames)
    _assert_same(a, b, torch.float32)
    assert (b[0].sum(-1) == SIZES[-1]).all()  # every output neuron spiked exactly once per pass


def _engine(policy, k, noise=0.0, batch=3):
    net = Network.from_module(make_net(SIZES))
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=k, momentum_noise=noise)
    return Engine(net, cfg, batch=batch, device=torch.device("cpu"), dtype=torch.float32,
                  training=noise > 0, seed=123, ops=backends.CPU)


@pytest.mark.parametrize("policy,k,noise", [("MS", 1, 0.0), ("MS", 3, 0.0), ("MS", 4, 0.1), ("RS", 3, 0.0),
                                            ("RS", 40, 0.0)])
def test_forward_step_selects_like_twin(policy, k, noise):
    """The fused selection against `Engine.select` (the twin) on random pending sets
    with many equal pre-spike potentials: MS ties go to the lower index."""
    eng = _engine(policy, k, noise)
    g = torch.Generator().manual_seed(0)
    B, W = eng.batch, eng.width
    for trial in range(5):
        pending = torch.rand(B, W, generator=g) < 0.5
        pending &= eng.tables.is_source
        pending[0] = False  # a sample with nothing pending: done, selects only the dump
        pre = torch.randint(0, 3, (B, W), generator=g).float() * 0.25  # many ties
        ps = Pass(B, W, torch.float32, torch.device("cpu"), pending.clone(), eager_first=False)
        ps.pre_spike = pre.clone()
        z = torch.zeros(B, W)
        st = State(z.clone(), z.clone(), torch.zeros(B, SIZES[-1]), torch.zeros(B, W, dtype=torch.bool),
                   torch.zeros(B, W, dtype=torch.int32))
        done = ps.done(eng.cfg).contiguous()
        want, _ = eng.select(pending & ~done[:, None], pre, trial, 2)  # before `done` is updated
        fused = CpuSteps(eng)
        fused.bind_weights(torch.zeros(W, eng.tables.targets.shape[1]))
        fused.bind_state(st)
        fused.bind_pass(ps.tensors(done))
        sel, _, _, _, _ = fused.forward_step(t=trial, k=2)
        assert torch.equal(sel.long().sort(1).values, want.sort(1).values)
        assert (sel[0] == W - 1).all()
        taken = torch.zeros_like(pending).scatter(1, sel.long(), True)
        assert not (ps.pending & taken).any(), "selected outboxes stay pending"


@pytest.mark.parametrize("ck", [None, 0])
@pytest.mark.parametrize("barrier", [False, True])
def test_currents_histogram_matches_torch(ck, barrier):
    """record_currents=True: the fused steps count each spike's received currents (SPEC 9)
    like the torch ops; with checkpoint_every=0 (plain autograd) the cpu backend runs
    the torch ops and agrees too."""
    net = make_net(SIZES)
    frames = make_frames(3, 4, SIZES[0])
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2, barrier_messages=barrier,
                    sync_threshold=2 if barrier else 1)
    outs = []
    for backend in ("torch", "cpu"):
        snn = AsyncSNN(net, cfg, backend=backend, record_currents=True, checkpoint_every=ck)
        outs.append((snn(frames, seed=1).detach(), snn.stats["currents_to_spike"]))
        if backend == "cpu":
            assert snn.stats["currents_to_spike"].sum() == snn.stats["hidden_spikes"].sum() + outs[-1][0].sum()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert outs[0][1].sum() > 10 and (outs[0][1] > 0).sum() > 2, "vacuous histogram"


def test_plain_autograd_uses_torch_ops():
    net = make_net(SIZES)
    frames = make_frames(3, 2, SIZES[0])
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2)
    a, b = _both(net, cfg, frames, checkpoint_every=0)
    _assert_same(a, b, torch.float32)


def test_conv_network_on_cpu_backend():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, bias=False), torch.nn.AvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 3, bias=False))
    torch.nn.init.uniform_(net[0].weight, 0.0, 0.8)
    torch.nn.init.uniform_(net[3].weight, 0.0, 0.8)
    frames = (torch.rand(2, 2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.6).float()
    cfg = SimConfig(**BASE, policy="RS", forward_group_size=2)
    outs = [AsyncSNN(net, cfg, backend=b, input_shape=(1, 4, 4))(frames, seed=2).detach()
            for b in ("torch", "cpu")]
    assert torch.equal(outs[0], outs[1])


def test_resolve_cpu_backend():
    assert backends.resolve("cpu", torch.device("cpu")) is backends.CPU
    assert backends.resolve("torch", torch.device("cpu")) is backends.TORCH
    with pytest.raises(RuntimeError, match=r"backend='cpu' needs CPU tensors, got cuda"):
        backends.resolve("cpu", torch.device("cuda"))


def test_build_error_names_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCTRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match=r"needs a C compiler: running '.*no-such-cc' failed"):
        cpu_step.load.__wrapped__()
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\necho 'error: out of cheese' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    with pytest.raises(RuntimeError, match=r"building .*cpu_step.c with '.*bad-cc' failed:\nerror: out of cheese"):
        cpu_step.load.__wrapped__()
    assert not list(tmp_path.glob("*.so")), "a failed build left a library behind"


def test_auto_falls_back_to_torch_when_the_build_fails(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_step, "load", broken)
    backends._cpu_builds.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU steps are unavailable.*no compiler here"):
            assert backends.resolve("auto", torch.device("cpu")) is backends.TORCH
        with pytest.raises(RuntimeError, match="no compiler here"):
            backends.resolve("cpu", torch.device("cpu"))
    finally:
        backends._cpu_builds.cache_clear()


def test_built_library_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCTRAIN_CACHE", str(tmp_path))
    cpu_step.load.__wrapped__()
    libs = list(tmp_path.glob("cpu_step-*.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime_ns
    cpu_step.load.__wrapped__()  # found, not rebuilt
    assert libs[0].stat().st_mtime_ns == mtime


def test_cache_falls_back_to_tmp_without_a_writable_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ASYNCTRAIN_CACHE", raising=False)
    home = tmp_path / "home"
    home.write_text("")  # a file: ~/.cache cannot be created below it, whoever we are
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(cpu_step.tempfile, "gettempdir", lambda: str(tmp_path))
    assert cpu_step._cache_dir() == tmp_path / f"asynctrain-{os.getuid()}"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cpu_step._cache_dir() == tmp_path / ".cache" / "asynctrain"
