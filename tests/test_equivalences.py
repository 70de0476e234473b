"""One test per equivalence SPEC states (sections 6-8), run on the engine itself:

- barrier preset (K = layer size, sync = fan-in, barrier messages) == layered:
  spikes, stats, potentials and weight gradients;
- refractory and K >= pending: MS and RS give the layered spikes (not its gradients);
- checkpointed backward == plain autograd;
- hardware presets construct the K / sync thresholds of SPEC 7;
- regularisers: p = 0 is no regulariser, eval mode switches them off, and the
  extreme probabilities do what their definitions say; seeded calls replay exactly.

Spike equalities across *different* executions (barrier vs layered, async vs
layered) run in float64: the two sum a neuron's currents in different orders, and
in fp32 a potential within an ulp of theta could legitimately flip a spike.
"""

from __future__ import annotations

import math

import pytest
import torch

from asynctrain import AsyncSNN, SimConfig
from conftest import (BASE, STAT_KEYS, assert_close, assert_match, assert_stats_equal, make_frames,
                      make_net, run_engine)

SIZES = [7, 6, 5, 4]
L = len(SIZES) - 1
F64 = torch.float64


def _net_frames(dtype=F64, T=3, B=4):
    return make_net(SIZES, dtype=dtype), make_frames(T, B, SIZES[0], dtype=dtype)


# --- SPEC 6: barrier preset == layered ---------------------------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS"])
@pytest.mark.parametrize("readout", ["counts", "potential"])
def test_loihi_preset_equals_layered(policy, readout):
    net, frames = _net_frames()
    cfg = SimConfig.preset("loihi", net, policy=policy, readout=readout, **BASE)
    layered = SimConfig(policy="layered", readout=readout, **BASE)
    barrier = run_engine(net, cfg, frames)
    ref = run_engine(net, layered, frames)
    # every stat, spikes_processed and spikes_to_first_output included: barrier
    # messages are delivered but are not spikes
    keys = STAT_KEYS + ("spikes_to_first_output",)
    if readout == "counts":
        assert torch.equal(barrier[0], ref[0]) and ref[0].sum() > 0
    else:
        assert_close(barrier[0], ref[0], "output potentials")
    assert_stats_equal(barrier[1], ref[1], keys)
    assert_close(barrier[1]["final_v"], ref[1]["final_v"], "final potentials")
    for a, b in zip(barrier[2], ref[2]):
        assert_close(a, b, "weight gradient")
    assert (ref[1]["forward_steps"] == L).all() and ref[1]["hidden_spikes"].sum() > 10
    assert all(g.abs().sum() > 0 for g in ref[2])


def test_loihi_preset_equals_layered_in_training():
    # Input dropout is the module's (shared); refractory dropout and momentum noise
    # cannot matter (every neuron is evaluated once per pass, K covers every pending
    # entry). Network dropout is left out on purpose: a dropped outbox "reaches
    # nobody" (SimConfig doc), so under sync = fan-in its targets never reach their
    # threshold count and are never evaluated, while layered evaluates them anyway.
    net, frames = _net_frames()
    regs = dict(input_dropout=0.3, refractory_dropout=0.5, momentum_noise=0.1)
    cfg = SimConfig.preset("barrier", net, **BASE, **regs)
    barrier = run_engine(net, cfg, frames, training=True, seed=4)
    ref = run_engine(net, SimConfig(policy="layered", **BASE, **regs), frames, training=True, seed=4)
    assert torch.equal(barrier[0], ref[0]) and ref[0].sum() > 0
    assert_stats_equal(barrier[1], ref[1], ("forward_steps", "synops", "first_output_step", "hidden_spikes"))
    assert_close(barrier[1]["final_v"], ref[1]["final_v"], "final potentials")
    for a, b in zip(barrier[2], ref[2]):
        assert_close(a, b, "weight gradient")
    no_drop = run_engine(net, SimConfig(policy="layered", **BASE), frames, grads=False)
    assert not torch.equal(ref[1]["synops"], no_drop[1]["synops"])  # input dropout acted


# --- SPEC 6: refractory + K >= pending -> layered spikes ----------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS"])
@pytest.mark.parametrize("prioritize_input", [False, True])
def test_large_k_gives_layered_spikes(policy, prioritize_input):
    net, frames = _net_frames()
    cfg = SimConfig(policy=policy, forward_group_size=32, refractory=True,
                    prioritize_input=prioritize_input, **BASE)
    async_ = run_engine(net, cfg, frames, seed=7)
    ref = run_engine(net, SimConfig(policy="layered", **BASE), frames)
    assert torch.equal(async_[0], ref[0])
    assert_stats_equal(async_[1], ref[1], ("synops", "first_output_step", "hidden_spikes"))
    # A pass ends early when a layer stays silent (nothing pending); never later.
    assert (async_[1]["forward_steps"] <= L).all()
    assert_close(async_[1]["final_v"], ref[1]["final_v"], "final potentials")
    assert ref[1]["hidden_spikes"].sum() > 10 and ref[0].sum() > 0
    # Gradients are not claimed equal (silent neurons are not delivered); only sanity:
    assert all(torch.isfinite(g).all() for g in async_[2])


def test_speck_preset_with_layer_wide_k_gives_layered_spikes():
    # Speck: K = widest layer, sync 1; with the inputs no wider than that, K covers
    # every pending outbox, so the SPEC 6 statement applies to the preset as is.
    net, frames = make_net([6, 7, 5, 4], dtype=F64), make_frames(3, 4, 6, dtype=F64)
    cfg = SimConfig.preset("speck", net, **BASE)
    assert cfg.K == 7
    async_ = run_engine(net, cfg, frames, grads=False)
    ref = run_engine(net, SimConfig(policy="layered", **BASE), frames, grads=False)
    assert torch.equal(async_[0], ref[0]) and ref[0].sum() > 0
    assert torch.equal(async_[1]["hidden_spikes"], ref[1]["hidden_spikes"])


# --- SPEC 8: checkpointed backward == plain autograd --------------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS"])
@pytest.mark.parametrize("ck", [None, 1, 5])
def test_checkpointed_grad_equals_plain_grad(policy, ck):
    net, frames = make_net(SIZES), make_frames(5, 3, SIZES[0])
    cfg = SimConfig(policy=policy, forward_group_size=2, refractory_dropout=0.5, network_dropout=0.1,
                    input_dropout=0.1, momentum_noise=0.1, **BASE)
    plain = run_engine(net, cfg, frames, training=True, checkpoint_every=0)
    ckpt = run_engine(net, cfg, frames, training=True, checkpoint_every=ck)
    assert_match(ckpt, plain)
    assert plain[1]["forward_steps"].sum() > 30  # many ops -> several checkpoint segments
    assert all(g.abs().sum() > 0 for g in plain[2])


def test_checkpointed_grad_under_no_grad_and_frozen_weights():
    # Without grad the module runs the plain forward; results are the same.
    net, frames = make_net(SIZES), make_frames(3, 2, SIZES[0])
    snn = AsyncSNN(net, SimConfig(forward_group_size=2, **BASE))
    with torch.no_grad():
        a = snn(frames, seed=1)
    b = snn(frames, seed=1)
    assert not a.requires_grad and b.requires_grad and torch.equal(a, b.detach())


# --- SPEC 7: presets -----------------------------------------------------------------------
PRESET_NET = [3, 7, 6, 2]  # fan-in 3 / 7 / 6; widest layer 7


def _fan_in():
    return torch.tensor([3] * 7 + [7] * 6 + [6] * 2)


@pytest.mark.parametrize("name", ["loihi", "barrier", "seneca", "layer", "LOIHI"])
def test_barrier_presets(name):
    net = make_net(PRESET_NET)
    cfg = SimConfig.preset(name, net)
    assert cfg.K == 7 and cfg.barrier_messages and cfg.prioritize_input
    assert torch.equal(cfg.sync_threshold.long(), _fan_in())
    AsyncSNN(net, cfg)  # per-neuron lengths fit the network


@pytest.mark.parametrize("name", ["spinnaker", "timer", "truenorth", "core"])
def test_core_presets(name):
    net = make_net(PRESET_NET)
    cfg = SimConfig.preset(name, net, neurons_per_core=4)
    assert cfg.K == 4 and cfg.barrier_messages and cfg.prioritize_input
    assert torch.equal(cfg.sync_threshold.long(), _fan_in().clamp(max=4))
    AsyncSNN(net, cfg)


@pytest.mark.parametrize("name", ["speck", "async", "ubrain"])
def test_async_presets(name):
    net = make_net(PRESET_NET)
    cfg = SimConfig.preset(name, net)
    assert cfg.K == 7 and cfg.sync_threshold == 1 and not cfg.barrier_messages


def test_preset_overrides_applied_last():
    net = make_net(PRESET_NET)
    cfg = SimConfig.preset("speck", net, policy="RS", K=3, theta=0.5)
    assert (cfg.policy, cfg.K, cfg.theta) == ("RS", 3, 0.5)
    cfg = SimConfig.preset("loihi", net, barrier_messages=False)
    assert not cfg.barrier_messages


# --- regularisers (SPEC 8) -----------------------------------------------------------------
REGS = dict(refractory_dropout=0.5, network_dropout=0.3, input_dropout=0.3, momentum_noise=0.1)


@pytest.mark.parametrize("policy", ["MS", "RS", "layered"])
def test_zero_probability_regularisers_equal_none(policy):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    zero = SimConfig(policy=policy, forward_group_size=2, refractory_dropout=0.0, network_dropout=0.0,
                     input_dropout=0.0, momentum_noise=0.0, **BASE)
    trained = run_engine(net, zero, frames, training=True, seed=2)
    plain = run_engine(net, SimConfig(policy=policy, forward_group_size=2, **BASE), frames, seed=2)
    assert_match(trained, plain)


@pytest.mark.parametrize("policy", ["MS", "RS", "layered"])
def test_regularisers_inactive_in_eval(policy):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    regs = SimConfig(policy=policy, forward_group_size=2, **REGS, **BASE)
    plain = SimConfig(policy=policy, forward_group_size=2, **BASE)
    assert_match(run_engine(net, regs, frames, seed=2), run_engine(net, plain, frames, seed=2))
    # ... and active in train mode (the comparison above is not vacuous)
    trained = run_engine(net, regs, frames, training=True, seed=2, grads=False)
    assert not torch.equal(trained[1]["synops"], run_engine(net, plain, frames, grads=False)[1]["synops"])


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_refractory_dropout_one_equals_no_refractory(policy):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    a = run_engine(net, SimConfig(policy=policy, forward_group_size=2, refractory_dropout=1.0, **BASE),
                   frames, training=True, seed=5)
    b = run_engine(net, SimConfig(policy=policy, forward_group_size=2, refractory=False, **BASE),
                   frames, training=True, seed=5)
    assert_match(a, b)
    refr = run_engine(net, SimConfig(policy=policy, forward_group_size=2, **BASE), frames, grads=False)
    assert b[1]["hidden_spikes"].sum() > refr[1]["hidden_spikes"].sum()  # refractoriness mattered


@pytest.mark.parametrize("policy,k", [("MS", 2), ("RS", 3)])
def test_network_dropout_one_delivers_nothing(policy, k):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    nnz = (frames != 0).sum(2)
    cfg = SimConfig(policy=policy, forward_group_size=k, network_dropout=1.0, **BASE)
    out, st, _ = run_engine(net, cfg, frames, training=True, grads=False)
    # Queued input: every input entry is selected (taking steps) and dropped.
    assert (out == 0).all() and (st["hidden_spikes"] == 0).all()
    assert (st["synops"] == 0).all() and (st["spikes_processed"] == 0).all()
    assert torch.equal(st["forward_steps"], (nnz + k - 1) // k)
    # Prioritized input is not subject to network dropout: only that step delivers.
    out, st, _ = run_engine(net, cfg.replace(prioritize_input=True), frames, training=True, grads=False)
    assert (out == 0).all() and st["hidden_spikes"].sum() > 0
    assert torch.equal(st["synops"], nnz * SIZES[1]) and torch.equal(st["spikes_processed"], nnz)
    out, st, _ = run_engine(net, SimConfig(policy="layered", network_dropout=1.0, **BASE), frames,
                            training=True, grads=False)
    assert (out == 0).all() and torch.equal(st["synops"], nnz * SIZES[1])


@pytest.mark.parametrize("policy", ["MS", "RS", "layered"])
def test_input_dropout_one_gives_no_input(policy):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    cfg = SimConfig(policy=policy, input_dropout=1.0, **BASE)
    out, st, _ = run_engine(net, cfg, frames, training=True, grads=False)
    assert (out == 0).all() and (st["synops"] == 0).all() and (st["hidden_spikes"] == 0).all()
    if policy != "layered":
        assert (st["forward_steps"] == 0).all()
        out, st, _ = run_engine(net, cfg.replace(prioritize_input=True), frames, training=True, grads=False)
        assert (out == 0).all() and (st["forward_steps"] == 1).all() and (st["synops"] == 0).all()


# --- deterministic replay --------------------------------------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_same_seed_same_result(policy):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0])
    cfg = SimConfig(policy=policy, forward_group_size=2, **REGS, **BASE)
    a = run_engine(net, cfg, frames, training=True, seed=9)
    b = run_engine(net, cfg, frames, training=True, seed=9)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert_stats_equal(a[1], b[1])
    c = run_engine(net, cfg, frames, training=True, seed=10, grads=False)
    assert not all(torch.equal(a[1][k], c[1][k]) for k in ("synops", "forward_steps", "hidden_spikes"))


def test_config_seed_gives_reproducible_call_sequence():
    net, frames = make_net(SIZES), make_frames(2, 3, SIZES[0])
    cfg = SimConfig(policy="RS", forward_group_size=2, seed=123, **REGS, **BASE)
    runs = []
    for _ in range(2):
        snn = AsyncSNN(net, cfg).train()
        runs.append([(snn(frames).detach(), snn.stats["seed"], snn.stats["synops"]) for _ in range(3)])
    for (o1, s1, n1), (o2, s2, n2) in zip(*runs):
        assert torch.equal(o1, o2) and s1 == s2 and torch.equal(n1, n2)
    seeds = [s for _, s, _ in runs[0]]
    assert len(set(seeds)) == 3  # call i gets its own seed
    assert not all(torch.equal(runs[0][0][2], n) for _, _, n in runs[0][1:])


def test_unseeded_calls_follow_torch_manual_seed():
    net, frames = make_net(SIZES), make_frames(2, 2, SIZES[0])
    cfg = SimConfig(policy="RS", forward_group_size=2, **BASE)
    seeds = []
    for _ in range(2):
        torch.manual_seed(42)
        snn = AsyncSNN(net, cfg)
        snn(frames)
        seeds.append(snn.stats["seed"])
    assert seeds[0] == seeds[1]


def test_potential_readout_equals_final_v_of_outputs():
    net, frames = make_net(SIZES), make_frames(3, 2, SIZES[0])
    cfg = SimConfig(policy="MS", forward_group_size=2, readout="potential", **BASE)
    out, st, _ = run_engine(net, cfg, frames, grads=False)
    assert torch.equal(out[-1], st["final_v"][:, -SIZES[-1]:])
    assert math.isfinite(out.abs().sum().item()) and out.abs().sum() > 0


@pytest.mark.parametrize("policy", ["MS", "RS", "layered"])
def test_currents_to_spike_histogram(policy):
    # SPEC 9 histogram (record_currents=True): one count per spike (hidden and output),
    # binned by the currents the neuron had integrated in the pass.
    net, frames = _net_frames()
    snn = AsyncSNN(net, SimConfig(policy=policy, forward_group_size=2, **BASE), record_currents=True)
    out = snn(frames, seed=1)
    hist = snn.stats["currents_to_spike"]
    assert hist.shape == (max(SIZES[:-1]) + 1,)
    assert hist.sum() == snn.stats["hidden_spikes"].sum() + out.sum() > 0
    if policy == "layered":  # every neuron integrates its whole fan-in before its threshold
        assert set(hist.nonzero().flatten().tolist()) <= set(SIZES[:-1])
    else:  # K = 2: many spikes after fewer currents than the fan-in
        assert hist[:3].sum() > 0
    snn = AsyncSNN(net, SimConfig(policy=policy, **BASE))
    snn(frames)
    assert "currents_to_spike" not in snn.stats  # off by default


def test_currents_to_spike_histogram_barrier_equals_layered():
    net, frames = _net_frames()
    hists = []
    for cfg in (SimConfig.preset("loihi", net, **BASE), SimConfig(policy="layered", **BASE)):
        snn = AsyncSNN(net, cfg, record_currents=True)
        snn(frames, seed=1)
        hists.append(snn.stats["currents_to_spike"])
    assert torch.equal(hists[0], hists[1]) and hists[1].sum() > 0
    assert set(hists[1].nonzero().flatten().tolist()) <= set(SIZES[:-1])


@pytest.mark.parametrize("prioritize_input", [True, False])
def test_checkpointed_frame_gradient_equals_plain(prioritize_input):
    """Analog inputs get the same gradient with or without checkpointing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 8, bias=False), torch.nn.Linear(8, 5, bias=False)).double()
    for m in net:
        torch.nn.init.xavier_uniform_(m.weight, gain=2.0)
    base = torch.rand(4, 3, 12, dtype=torch.float64)
    grads = []
    for every in (0, None, 2):
        x = base.clone().requires_grad_()
        cfg = SimConfig(K=3, policy="MS", prioritize_input=prioritize_input, theta=0.4, readout="potential")
        out = AsyncSNN(net, cfg, checkpoint_every=every)(x, seed=2)
        (out * torch.arange(5.0, dtype=torch.float64)).sum().backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-10, rtol=1e-8)


def test_simconfig_k_alias_and_value_equality():
    assert SimConfig(K=5) == SimConfig(forward_group_size=5) and SimConfig(K=5).K == 5
    with pytest.raises(ValueError, match="K=3 and forward_group_size=4 disagree"):
        SimConfig(K=3, forward_group_size=4)
    a = SimConfig(theta=torch.full((3,), 0.3))
    assert a == SimConfig(theta=torch.full((3,), 0.3)) and a != SimConfig(theta=torch.full((3,), 0.4))
    assert a != SimConfig()
