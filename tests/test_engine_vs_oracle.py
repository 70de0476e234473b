"""The engine (`AsyncSNN`: sparse deliveries, recorded selections, checkpointed
backward) against the dense oracle (`tests/dense_oracle.py`: plain autograd through a
dense unrolling of SPEC 4-5).

Rule (docs/semantics.md section 8): output counts and every stat exact; final potentials, output
potentials and weight gradients of ``sum(out * c)`` (c a fixed random tensor) within
``conftest.TOL`` (fp32: atol 1e-5, rtol 1e-4; fp64: 1e-10).

`CASES` is a covering set, not a cartesian product: each policy meets K = 1, a few,
exactly the input width, and more than anything can be pending; refractory on and
off; both stops (F = 0 and 2); checkpoint_every 0 / 1 / 3 / None; prioritized and
queued input; both readouts; the training regularisers in train mode; barrier
messages, per-neuron knobs, carry_pending with the cap, a one-layer net and fp64.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from asynctrain import SimConfig
from conftest import BASE, assert_match, make_frames, make_net, run_engine, run_oracle

SIZES = [8, 7, 6, 3]  # 8 inputs, hidden 7 and 6, 3 outputs: L = 3 layers, width 24
L = len(SIZES) - 1
REGS = dict(refractory_dropout=0.5, network_dropout=0.2, input_dropout=0.2, momentum_noise=0.1)
N_NEU = sum(SIZES[1:])

# (id, config overrides, training, checkpoint_every). K=8 is the input width (a queued
# frame fits in one step); K=100 exceeds the whole network (width 24 + dump).
CASES = [
    ("MS-K1-refr-plain", dict(policy="MS", forward_group_size=1), False, 0),
    ("MS-K1-norefr-adaptive", dict(policy="MS", forward_group_size=1, refractory=False), False, None),
    ("MS-K3-refr-ck1", dict(policy="MS", forward_group_size=3), False, 1),
    ("MS-K3-norefr-ck3", dict(policy="MS", forward_group_size=3, refractory=False), False, 3),
    ("MS-K8-refr-adaptive", dict(policy="MS", forward_group_size=8), False, None),
    ("MS-K100-norefr-ck1", dict(policy="MS", forward_group_size=100, refractory=False), False, 1),
    ("RS-K1-refr-ck3", dict(policy="RS", forward_group_size=1), False, 3),
    ("RS-K2-norefr-plain", dict(policy="RS", forward_group_size=2, refractory=False), False, 0),
    ("RS-K3-refr-adaptive", dict(policy="RS", forward_group_size=3), False, None),
    ("RS-K100-refr-plain", dict(policy="RS", forward_group_size=100), False, 0),
    ("layered-counts", dict(policy="layered"), False, None),
    ("layered-potential", dict(policy="layered", readout="potential"), False, 0),
    ("MS-output-F0", dict(policy="MS", forward_group_size=2, stop="output", steps_after_output=0), False, None),
    ("RS-output-F2", dict(policy="RS", forward_group_size=2, stop="output", steps_after_output=2), False, 1),
    ("RS-prio-output-F0", dict(policy="RS", forward_group_size=2, stop="output", steps_after_output=0,
                               prioritize_input=True), False, 0),
    ("MS-prio-ck3", dict(policy="MS", forward_group_size=3, prioritize_input=True), False, 3),
    ("MS-potential", dict(policy="MS", forward_group_size=3, readout="potential"), False, None),
    ("RS-potential-norefr", dict(policy="RS", forward_group_size=2, readout="potential", refractory=False),
     False, 3),
    ("MS-detach-reset", dict(policy="MS", forward_group_size=2, detach_reset=True), False, None),
    ("MS-barrier-sync2", dict(policy="MS", forward_group_size=2, sync_threshold=2, barrier_messages=True),
     False, 1),
    ("RS-per-neuron-knobs", dict(policy="RS", forward_group_size=2,
                                 tau=torch.tensor([20.0, math.inf, 5.0] * 5 + [20.0]),
                                 theta=torch.tensor([0.3, 0.2, 0.5, 0.3] * 4),
                                 sync_threshold=torch.tensor([1, 2, 1, 3] * 4)), False, None),
    ("train-MS-regs", dict(policy="MS", forward_group_size=2, **REGS), True, None),
    ("train-RS-regs-prio", dict(policy="RS", forward_group_size=3, prioritize_input=True, **REGS), True, 1),
    ("train-MS-K1-regs-output", dict(policy="MS", forward_group_size=1, stop="output", **REGS), True, 3),
    ("train-RS-regs-norefr-plain", dict(policy="RS", forward_group_size=2, refractory=False, **REGS), True, 0),
    ("train-layered-dropouts", dict(policy="layered", network_dropout=0.3, input_dropout=0.2), True, 0),
]


def _check_exercised(cfg: SimConfig, stats: dict) -> None:
    """Guard against vacuous passes: spikes happened, and small K really took more
    forward steps than there are layers."""
    assert stats["hidden_spikes"].sum() > 10
    if cfg.policy == "layered":
        assert (stats["forward_steps"] == L).all()
    elif cfg.forward_group_size <= 3:
        assert stats["forward_steps"].max() > L


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,overrides,training,ck", CASES, ids=[c[0] for c in CASES])
def test_engine_matches_oracle(name, overrides, training, ck, backend):
    """Both CPU backends: `torch` (per-op twins) and `cpu` (fused steps; with
    checkpoint_every=0 it runs the torch ops under autograd)."""
    cfg = SimConfig(**{**BASE, **overrides})
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0])
    eng = run_engine(net, cfg, frames, seed=3, training=training, checkpoint_every=ck, backend=backend)
    ora = run_oracle(net, cfg, frames, seed=3, training=training)
    assert_match(eng, ora, cfg.readout)
    _check_exercised(cfg, ora[1])
    assert any(g.abs().sum() > 0 for g in ora[2]), "no gradient reached the weights"


@pytest.mark.parametrize("policy,training,ck", [("MS", True, None), ("RS", False, 1), ("layered", True, 0)])
def test_engine_matches_oracle_fp64(policy, training, ck):
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=2, network_dropout=0.2,
                    refractory_dropout=0.5, momentum_noise=0.1, input_dropout=0.2)
    net = make_net(SIZES, dtype=torch.float64)
    frames = make_frames(4, 3, SIZES[0], dtype=torch.float64)
    eng = run_engine(net, cfg, frames, seed=11, training=training, checkpoint_every=ck)
    ora = run_oracle(net, cfg, frames, seed=11, training=training)
    assert eng[0].dtype == torch.float64 and eng[2][0].dtype == torch.float64
    assert_match(eng, ora)
    _check_exercised(cfg, ora[1])


@pytest.mark.parametrize("surrogate_at", ["every", "fire_or_last"])
@pytest.mark.parametrize("ck", [0, None])
def test_carry_pending_with_cap_matches_oracle(ck, surrogate_at):
    # The cap leaves outboxes pending; carried into the next pass, they are delivered
    # with a cleared pre-spike potential (SPEC 3). Non-vacuous: some passes capped.
    # fire_or_last: windows end with each pass even when the outbox is carried on.
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2, max_steps=4, carry_pending=True,
                    surrogate_at=surrogate_at)
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0])
    with pytest.warns(RuntimeWarning, match="max_steps=4"):
        eng = run_engine(net, cfg, frames, checkpoint_every=ck)
    ora = run_oracle(net, cfg, frames)
    assert_match(eng, ora)
    assert ora[1]["capped"][:-1].any()


def test_preset_spinnaker_matches_oracle():
    # Timer/core preset: per-neuron sync threshold min(core, fan-in), barriers on.
    net, frames = make_net([3, 7, 6, 2]), make_frames(3, 2, 3, p=0.7)
    cfg = SimConfig.preset("spinnaker", net, neurons_per_core=4, **BASE)
    assert_match(run_engine(net, cfg, frames), run_oracle(net, cfg, frames))


def test_single_linear_layer_matches_oracle():
    # One nn.Linear (not a Sequential): inputs feed the output neurons directly.
    lin = make_net([6, 4], scale=0.4)[0]
    frames = make_frames(3, 2, 6, p=0.6)
    for prio in (False, True):
        cfg = SimConfig(**BASE, policy="MS", forward_group_size=1, refractory=False, prioritize_input=prio)
        eng, ora = run_engine(lin, cfg, frames), run_oracle(lin, cfg, frames)
        assert_match(eng, ora)
        assert ora[0].sum() > 0


def _random_case(i: int):
    """A reproducible random point of the config space (see `test_random_configs`)."""
    r = random.Random(i)
    n_layers = r.choice([1, 2, 3])
    sizes = [r.randint(2, 7) for _ in range(n_layers + 1)]
    n = sum(sizes[1:])
    training = r.random() < 0.5
    cfg = dict(
        policy=r.choice(["MS", "RS", "MS", "RS", "layered"]), forward_group_size=r.choice([1, 2, 3, 50]),
        prioritize_input=r.random() < 0.4, stop=r.choice(["spiking_done", "output"]),
        steps_after_output=r.choice([0, 1, 2]), max_steps=r.choice([4, 1000, 1000]),
        carry_pending=r.random() < 0.3, refractory=r.random() < 0.6,
        tau=r.choice([20.0, math.inf, torch.tensor([r.choice([5.0, 20.0, math.inf]) for _ in range(n)])]),
        theta=r.choice([0.3, torch.tensor([r.choice([0.2, 0.3, 0.5]) for _ in range(n)])]),
        sync_threshold=r.choice([1, 2, torch.tensor([r.choice([1, 1, 2, 3]) for _ in range(n)])]),
        barrier_messages=r.random() < 0.3, detach_reset=r.random() < 0.3,
        readout=r.choice(["counts", "potential"]), surrogate_steepness=r.choice([2.0, 10.0]))
    if training:
        cfg.update(refractory_dropout=r.choice([0.0, 0.5, 1.0]), network_dropout=r.choice([0.0, 0.2]),
                   input_dropout=r.choice([0.0, 0.3]), momentum_noise=r.choice([0.0, 1e-6, 0.1]))
    dtype = r.choice([torch.float32, torch.float64])
    net = make_net(sizes, scale=r.choice([0.4, 0.7, 1.0]), seed=r.randint(0, 99), dtype=dtype)
    frames = make_frames(r.randint(1, 4), r.randint(1, 3), sizes[0], seed=r.randint(0, 99), dtype=dtype)
    return net, frames, SimConfig(**cfg), training, r.choice([0, 1, 3, None]), r.randint(0, 999)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("i", range(24))
def test_random_configs(i, backend):
    """Seeded random combinations of every knob: the first 24 draws of a sweep that
    ran ~5000 draws without a disagreement while this file was written."""
    net, frames, cfg, training, ck, seed = _random_case(i)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # capped passes are part of the sweep
        eng = run_engine(net, cfg, frames, seed=seed, training=training, checkpoint_every=ck,
                         backend=backend)
    ora = run_oracle(net, cfg, frames, seed=seed, training=training)
    assert_match(eng, ora, cfg.readout)


def test_stats_shapes_and_capped_passes():
    cfg = SimConfig(**BASE, forward_group_size=2)
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0])
    _, st, _ = run_engine(net, cfg, frames, grads=False)
    for k in ("forward_steps", "synops", "first_output_step", "capped", "spikes_processed"):
        assert st[k].shape == (4, 3), k
    assert st["hidden_spikes"].shape == (3,) and st["final_v"].shape == (3, N_NEU)
    assert st["capped_passes"] == 0 and st["seed"] == 3
    assert not st["final_v"].requires_grad


@pytest.mark.parametrize("overrides", [
    dict(policy="MS", forward_group_size=2),
    dict(policy="RS", forward_group_size=3, prioritize_input=True),
    dict(policy="MS", forward_group_size=2, stop="output", steps_after_output=0),
    dict(policy="layered"),
], ids=["MS", "RS-prio", "MS-output-F0", "layered"])
def test_spikes_to_first_output_invariants(overrides):
    # The oracle has no such stat; its definition pins it to the others: -1 exactly
    # when no output fired, else the entries delivered up to that step, so at most
    # spikes_processed (equal when the pass stops right at the first output).
    cfg = SimConfig(**BASE, **overrides)
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0])
    _, st, _ = run_engine(net, cfg, frames, grads=False)
    to_first, fired = st["spikes_to_first_output"], st["first_output_step"] >= 0
    assert fired.any() and torch.equal(to_first < 0, ~fired)
    assert (to_first[fired] > 0).all() and (to_first <= st["spikes_processed"]).all()
    if cfg.policy == "layered" or cfg.stop == "output":
        assert torch.equal(to_first[fired], st["spikes_processed"][fired])
    else:  # at most K entries a step, the prioritized input step delivering the frame
        limit = cfg.K * st["first_output_step"] + (SIZES[0] if cfg.prioritize_input else 0)
        assert (to_first[fired] <= limit[fired]).all()
