"""`SimConfig.fill_slots` (SPEC 8): in training, each event step's unused slots take
zero-valued outboxes of hidden neurons that are not pending and hold surrogate
gradient (synced, not refractory, evaluated since their last delivery), ranked MS:
highest V, RS: random. Rules checked here:

- spikes, output counts, potentials, every stat and synops are exactly those of
  the run without filling; only the gradient changes, and more hidden neurons get one;
- the gradient equals plain autograd through the dense oracle with the same fillers
  (`tests/dense_oracle.py`, `conftest.TOL`: fp64 1e-10, fp32 atol 1e-5 / rtol 1e-4),
  for plain autograd, checkpointed and adaptive backwards, fully connected and conv;
- fillers are recorded in the int32 [B, K] step record as -1 - column and replayed;
- inference never fills; edge cases: K above the pending count, no input spikes,
  every neuron refractory, max_steps reached, network dropout on fillers.
Backends: torch, cpu (fused C steps) here; triton (interpreted) against the C steps in
tests/test_steps_triton.py (fused steps, `*fill*` cases) and against torch in
tests/test_kernels_triton_conv.py (per-op kernels, conv, `*-fill*` model cases).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from asynctrain import SimConfig, backends
from asynctrain.engine import Engine
from asynctrain.loop import CallLoop
from asynctrain.timeline import EventStep
from asynctrain.network import Network
from conftest import (BASE, STAT_KEYS, assert_match, assert_stats_equal, make_frames, make_net, run_engine,
                      run_oracle)

SIZES = [8, 12, 10, 3]
SPARSE = dict(BASE, theta=1.0)  # few spikes: many silent neurons for the fillers


def _net(dtype=torch.float32):
    return make_net(SIZES, scale=0.5, shift=0.1, dtype=dtype)


def _frames(dtype=torch.float32, T=3, B=4):
    return make_frames(T, B, SIZES[0], p=0.4, dtype=dtype)


def _records(net, cfg, frames, training=True, backend="torch", seed=3):
    """The step records (int32 [B, K] selections) of one forward call."""
    graph = Network.from_module(net)
    eng = Engine(graph, cfg, batch=frames.shape[1], device=torch.device("cpu"), dtype=frames.dtype,
                 training=training, seed=seed, ops={"torch": backends.TORCH, "cpu": backends.CPU}[backend])
    wt = graph.weight_table([m.weight.detach() for m in net]).contiguous()
    with torch.no_grad():
        ops = CallLoop(eng).forward(frames, wt, keep_checkpoints=False).ops
    return [op.sel for op in ops if isinstance(op, EventStep)]


def _n_fillers(net, cfg, frames, **kw) -> int:
    return sum(int((r < 0).sum()) for r in _records(net, cfg, frames, **kw))


def _hidden_with_grad(grads) -> int:
    """Hidden neurons whose incoming weights got a nonzero gradient."""
    return sum(int((g.abs().sum(1) > 0).sum()) for g in grads[:-1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("policy,k", [("MS", 2), ("MS", 5), ("RS", 3), ("RS", 40)])
def test_fill_matches_oracle_and_changes_only_the_gradient(policy, k, dtype, backend):
    cfg = SimConfig(**SPARSE, policy=policy, forward_group_size=k, fill_slots=True)
    net, frames = _net(dtype), _frames(dtype)
    ora = run_oracle(net, cfg, frames, training=True)
    for ck in (0, 1, None):
        assert_match(run_engine(net, cfg, frames, training=True, checkpoint_every=ck, backend=backend), ora)
    assert _n_fillers(net, cfg, frames, backend=backend) > 0, "vacuous: no slot was filled"
    off = run_engine(net, cfg.replace(fill_slots=False), frames, training=True, backend=backend)
    on = run_engine(net, cfg, frames, training=True, backend=backend)
    assert torch.equal(on[0], off[0])
    assert_stats_equal(on[1], off[1])
    assert torch.equal(on[1]["final_v"], off[1]["final_v"]), "fillers changed a potential"
    assert any(not torch.equal(a, b) for a, b in zip(on[2], off[2])), "fillers changed no gradient"


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_fill_reaches_more_hidden_neurons(policy):
    cfg = SimConfig(**SPARSE, policy=policy, forward_group_size=4, fill_slots=True)
    net, frames = _net(), _frames()
    on = run_engine(net, cfg, frames, training=True)
    off = run_engine(net, cfg.replace(fill_slots=False), frames, training=True)
    assert _hidden_with_grad(on[2]) > _hidden_with_grad(off[2])


def test_fill_with_regularisers_matches_oracle():
    """Network dropout applies to fillers too (a dropped outbox reaches nobody);
    refractory dropout and momentum noise as usual."""
    cfg = SimConfig(**SPARSE, policy="MS", forward_group_size=3, fill_slots=True, network_dropout=0.3,
                    refractory_dropout=0.5, momentum_noise=0.1, input_dropout=0.1)
    net, frames = _net(), _frames()
    ora = run_oracle(net, cfg, frames, training=True)
    for backend in ("torch", "cpu"):
        assert_match(run_engine(net, cfg, frames, training=True, backend=backend), ora)
    off = run_oracle(net, cfg.replace(fill_slots=False), frames, training=True)
    assert torch.equal(off[1]["V"], ora[1]["V"]) and torch.equal(off[0], ora[0])


@pytest.mark.parametrize("kw", [dict(prioritize_input=True), dict(barrier_messages=True, sync_threshold=2),
                                dict(stop="output", steps_after_output=1), dict(readout="potential")],
                         ids=["prio", "barrier-sync2", "output-stop", "potential"])
def test_fill_with_other_modes_matches_oracle(kw):
    cfg = SimConfig(**{**SPARSE, "theta": 0.6}, policy="RS", forward_group_size=3, fill_slots=True, **kw)
    net, frames = _net(), _frames()
    ora = run_oracle(net, cfg, frames, training=True)
    for backend in ("torch", "cpu"):
        assert_match(run_engine(net, cfg, frames, training=True, backend=backend), ora, cfg.readout)
    assert _n_fillers(net, cfg, frames) > 0


def test_fill_record_encoding():
    """Fillers ride in the int32 [B, K] record as -1 - column: hidden, never pending
    entries of the same step, at most K entries a row."""
    cfg = SimConfig(**SPARSE, policy="MS", forward_group_size=4, fill_slots=True)
    net, frames = _net(), _frames()
    graph = Network.from_module(net)
    hidden = set(graph.tables(torch.device("cpu")).is_hidden.nonzero().flatten().tolist())
    assert hidden == set(range(SIZES[0], SIZES[0] + SIZES[1] + SIZES[2]))
    recs = _records(net, cfg, frames)
    assert all(r.dtype == torch.int32 and r.shape == (frames.shape[1], 4) for r in recs)
    for r in recs:
        for row in r.tolist():
            fillers = [-1 - i for i in row if i < 0]
            assert set(fillers) <= hidden and len(set(fillers)) == len(fillers)
            assert not set(fillers) & set(row)
    assert any((r < 0).any() for r in recs)
    # fillers take only the slots the unfilled run leaves to the dump: the same selections
    plain = _records(net, cfg.replace(fill_slots=False), frames)
    assert len(plain) == len(recs)
    for r, p in zip(recs, plain):
        assert torch.equal(r.masked_fill(r < 0, graph.dump), p)


def test_eval_never_fills():
    cfg = SimConfig(**SPARSE, policy="MS", forward_group_size=4, fill_slots=True)
    net, frames = _net(), _frames()
    assert _n_fillers(net, cfg, frames, training=False) == 0
    a = run_engine(net, cfg, frames, training=False)
    b = run_engine(net, cfg.replace(fill_slots=False), frames, training=False)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_fill_edge_no_input_spikes():
    cfg = SimConfig(**SPARSE, policy="RS", forward_group_size=4, fill_slots=True)
    net, frames = _net(), torch.zeros(2, 3, SIZES[0])
    out, st, grads = run_engine(net, cfg, frames, training=True)
    assert out.sum() == 0 and (st["forward_steps"] == 0).all()
    assert all((g == 0).all() for g in grads)


def test_fill_edge_every_neuron_refractory():
    # Strong positive weights: every hidden neuron fires at its first evaluation and is
    # refractory afterwards, so no outbox holds gradient unpending: nothing to fill.
    net = make_net(SIZES, scale=0.0, shift=2.0)
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=6, fill_slots=True)
    frames = torch.ones(2, 2, SIZES[0])
    assert _n_fillers(net, cfg, frames) == 0
    on, off = (run_engine(net, c, frames, training=True, backend="torch")
               for c in (cfg, cfg.replace(fill_slots=False)))
    assert (on[1]["hidden_spikes"] == 2 * (SIZES[1] + SIZES[2])).all()  # every neuron, both passes
    assert all(torch.equal(a, b) for a, b in zip(on[2], off[2]))


def test_fill_edge_max_steps_reached():
    cfg = SimConfig(**SPARSE, policy="MS", forward_group_size=2, fill_slots=True, max_steps=3)
    net, frames = _net(), _frames()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        on = run_engine(net, cfg, frames, training=True)
        off = run_engine(net, cfg.replace(fill_slots=False), frames, training=True)
    ora = run_oracle(net, cfg, frames, training=True)
    assert ora[1]["capped"].any()
    assert_match(on, ora)
    assert_stats_equal(on[1], off[1], STAT_KEYS)


def test_fill_edge_k_above_pending_is_layer_wide():
    """K larger than anything pending: every step has free slots; spikes stay those of
    the unfilled run and the gradient the oracle's."""
    cfg = SimConfig(**SPARSE, policy="RS", forward_group_size=64, fill_slots=True)
    net, frames = _net(torch.float64), _frames(torch.float64)
    assert_match(run_engine(net, cfg, frames, training=True), run_oracle(net, cfg, frames, training=True))
    assert _n_fillers(net, cfg, frames) > 0


# --- convolutional networks -----------------------------------------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS"])
@pytest.mark.parametrize("ck", [None, 0])
def test_fill_conv_matches_oracle(policy, ck):
    from test_conv_engine import assert_match as conv_match, conv_net, image_frames, run_engine as conv_engine, \
        run_oracle as conv_oracle
    net = conv_net("pool", seed=4)
    cfg = SimConfig(**{**BASE, "theta": 0.6}, policy=policy, forward_group_size=5, fill_slots=True,
                    network_dropout=0.1)
    frames = image_frames(2, 2, net.input_shape, seed=6)
    on = conv_engine(net, cfg, frames, training=True, checkpoint_every=ck)
    conv_match(on, conv_oracle(net, cfg, frames, training=True))
    off = conv_engine(net, cfg.replace(fill_slots=False), frames, training=True, checkpoint_every=ck)
    assert torch.equal(on[0], off[0]) and torch.equal(on[1]["final_v"], off[1]["final_v"])
    assert any(not torch.equal(a, b) for a, b in zip(on[2], off[2]))


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_fill_fused_c_steps_select_the_torch_fillers(policy):
    """The fused C steps (backend='cpu') pick the same fillers as the torch ops, in
    the same slots (real entries first, fillers after, best first)."""
    cfg = SimConfig(**SPARSE, policy=policy, forward_group_size=4, fill_slots=True, network_dropout=0.2)
    net, frames = _net(), _frames()
    assert backends.CPU.fused.fills_slots
    rc, rt = _records(net, cfg, frames, backend="cpu"), _records(net, cfg, frames, backend="torch")
    assert len(rc) == len(rt) and sum(int((r < 0).sum()) for r in rc) > 0
    for a, b in zip(rc, rt):
        assert torch.equal(a, b.to(a.dtype))
