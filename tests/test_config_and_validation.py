"""Stop conditions and edge cases of a pass (SPEC 3-5), `configured()`, and every
validation error: each names the offending value in its message."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from asynctrain import AsyncSNN, SimConfig
from conftest import BASE, assert_match, make_frames, make_net, run_engine, run_oracle

SIZES = [8, 7, 6, 3]


def _lin(weight, cls=nn.Linear) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    lin = cls(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _hand_net() -> nn.Sequential:
    """The oracle's hand-checked net (tests/test_dense_oracle.py): in0 -> h0 1.0,
    in1 -> h0 0.5, in -> h1 0.6; h0 -> out 0.5, h1 -> out 1.0; theta 1, IF neurons."""
    return nn.Sequential(_lin([[1.0, 0.5], [0.6, 0.6]]), _lin([[0.5, 1.0]]))


# hand-computed numbers: inputs in index order (SPEC 6 `input_order="index"`)
HAND = dict(forward_group_size=1, policy="MS", theta=1.0, tau=math.inf, input_order="index")


# --- stop conditions -----------------------------------------------------------------
def test_max_steps_caps_counts_and_warns():
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0])
    cfg = SimConfig(**BASE, forward_group_size=1, max_steps=3)
    snn = AsyncSNN(net, cfg)
    with pytest.warns(RuntimeWarning, match=r"of 12 passes reached max_steps=3"):
        snn(frames, seed=0)
    st = snn.stats
    assert st["capped"].any() and st["capped_passes"] == int(st["capped"].sum())
    assert (st["forward_steps"] <= 3).all() and (st["forward_steps"][st["capped"]] == 3).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncapped call warns nothing
        with snn.configured(max_steps=1000):
            snn(frames, seed=0)
    assert snn.stats["capped_passes"] == 0 and not snn.stats["capped"].any()


def test_cap_not_counted_when_output_stop_triggers_at_the_cap():
    # Hand net, stop on output with F = 0: the output fires at step 3 = max_steps
    # while h0 is still pending; the pass stopped for its output, not for the cap.
    frames = torch.zeros(1, 1, 2)
    frames[0] = 1.0
    cfg = SimConfig(**HAND, stop="output", steps_after_output=0, max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, st, _ = run_engine(_hand_net(), cfg, frames, grads=False)
    assert out.item() == 1.0 and st["forward_steps"].item() == 3 and not st["capped"].item()


@pytest.mark.parametrize("after,steps", [(0, 3), (1, 4), (2, 4)])
def test_stop_on_output_hand_example(after, steps):
    # Hand net: output fires at step 3; one more entry (h0) is pending then, so F >= 1
    # ends at step 4 when nothing is pending any more.
    frames = torch.zeros(1, 1, 2)
    frames[0] = 1.0
    cfg = SimConfig(**HAND, stop="output", steps_after_output=after)
    out, st, _ = run_engine(_hand_net(), cfg, frames, grads=False)
    assert out.item() == 1.0 and st["first_output_step"].item() == 3
    assert st["forward_steps"].item() == steps


def test_carry_pending_changes_the_result():
    # Hand net, max_steps 2: after in0 and in1, h0 and h1 are still pending. Dropped
    # (default), pass 2 has nothing to do; carried, they fire the output in pass 2.
    frames = torch.zeros(2, 1, 2)
    frames[0] = 1.0
    net = _hand_net()
    for carry, want, first in ((False, [0.0, 0.0], [-1, -1]), (True, [0.0, 1.0], [-1, 2])):
        cfg = SimConfig(**HAND, max_steps=2, carry_pending=carry)
        with pytest.warns(RuntimeWarning, match="max_steps=2"):
            eng = run_engine(net, cfg, frames)
        assert eng[0].flatten().tolist() == want
        assert eng[1]["first_output_step"].flatten().tolist() == first
        assert eng[1]["capped"].flatten().tolist() == [True, False]
        assert_match(eng, run_oracle(net, cfg, frames))


# --- edge cases ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["MS", "RS", "layered"])
@pytest.mark.parametrize("prioritize_input", [False, True])
def test_no_input_spikes(policy, prioritize_input):
    net = make_net(SIZES)
    frames = torch.zeros(3, 2, SIZES[0])
    cfg = SimConfig(**BASE, policy=policy, prioritize_input=prioritize_input)
    out, st, grads = run_engine(net, cfg, frames)
    assert (out == 0).all() and (st["synops"] == 0).all() and (st["spikes_processed"] == 0).all()
    assert (st["hidden_spikes"] == 0).all() and (st["final_v"] == 0).all()
    assert (st["first_output_step"] == -1).all() and not st["capped"].any()
    want = 3 if policy == "layered" else int(prioritize_input)  # layered: one step per layer
    assert (st["forward_steps"] == want).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_refractory_blocks_a_second_spike():
    # Two inputs of weight 1 into two output neurons (theta 1), K = 1: the first input
    # fires both outputs; refractory, the later inputs find them clamped at 0.
    net = _lin([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    frames = torch.ones(1, 1, 3)
    out, st, _ = run_engine(net, SimConfig(**HAND), frames, grads=False)
    assert out.flatten().tolist() == [1.0, 1.0] and st["final_v"].flatten().tolist() == [0.0, 0.0]
    assert st["forward_steps"].item() == 3  # the clamped deliveries still take their steps
    out, st, _ = run_engine(net, SimConfig(**HAND, refractory=False), frames, grads=False)
    assert out.flatten().tolist() == [3.0, 3.0]
    # K = 3: all currents arrive together, one evaluation, one spike either way.
    for refr in (True, False):
        out, _, _ = run_engine(net, SimConfig(**dict(HAND, forward_group_size=3), refractory=refr),
                               frames, grads=False)
        assert out.flatten().tolist() == [1.0, 1.0]


def test_refractory_clamps_hidden_neurons_too():
    # Hand net: h0 fires on in0, then in1's 0.5 is clamped away (SPEC 5.4 "if
    # refractory, V <- 0"); without refractoriness h0 keeps 0.5 (oracle hand test).
    frames = torch.zeros(1, 1, 2)
    frames[0] = 1.0
    _, st, _ = run_engine(_hand_net(), SimConfig(**HAND), frames, grads=False)
    assert st["final_v"].flatten().tolist() == [0.0, 0.0, 0.0] and st["hidden_spikes"].item() == 2
    _, st, _ = run_engine(_hand_net(), SimConfig(**HAND, refractory=False), frames, grads=False)
    assert st["final_v"].flatten().tolist() == [0.5, 0.0, 0.5]


@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_k_larger_than_the_network(policy):
    net, frames = make_net(SIZES), make_frames(3, 2, SIZES[0])
    width = sum(SIZES) + 1
    a = run_engine(net, SimConfig(**BASE, policy=policy, forward_group_size=10**6), frames)
    b = run_engine(net, SimConfig(**BASE, policy=policy, forward_group_size=width), frames)
    assert_match(a, b)
    assert_match(a, run_oracle(net, SimConfig(**BASE, policy=policy, forward_group_size=10**6), frames))
    assert a[1]["hidden_spikes"].sum() > 0


# --- configured() ----------------------------------------------------------------------
def test_configured_restores_the_config():
    snn = AsyncSNN(make_net(SIZES), SimConfig(**BASE))
    old = snn.cfg
    with snn.configured(policy="RS", K=3) as s:
        assert s is snn and (snn.cfg.policy, snn.cfg.K) == ("RS", 3)
    assert snn.cfg is old
    with pytest.raises(KeyError):
        with snn.configured(stop="output"):
            assert snn.cfg.stop == "output"
            raise KeyError("boom")
    assert snn.cfg is old


def test_configured_rejects_bad_changes_and_keeps_config():
    snn = AsyncSNN(make_net(SIZES), SimConfig(**BASE))
    old = snn.cfg
    with pytest.raises(TypeError, match=r"unknown SimConfig field\(s\): \['polcy'\]"):
        with snn.configured(polcy="RS"):
            pass
    with pytest.raises(ValueError, match="got 0"):
        with snn.configured(K=0):
            pass
    with pytest.raises(ValueError, match=r"theta has shape \(3,\), the network has 16 neurons"):
        with snn.configured(theta=torch.ones(3)):
            pass
    assert snn.cfg is old


def test_replace_k_alias():
    cfg = SimConfig().replace(K=5)
    assert cfg.forward_group_size == 5 and cfg.K == 5
    with pytest.raises(ValueError, match="K=5 and forward_group_size=6 disagree"):
        SimConfig().replace(K=5, forward_group_size=6)


# --- SimConfig validation -----------------------------------------------------------------
REJECTED = [
    (dict(forward_group_size=0), r"forward_group_size \(K\) must be an int >= 1, got 0"),
    (dict(forward_group_size=-3), r"got -3"),
    (dict(forward_group_size=2.5), r"forward_group_size \(K\) must be an int >= 1, got 2.5"),
    (dict(forward_group_size=True), r"got True"),
    (dict(policy="XS"), r"policy must be one of .*got 'XS'"),
    (dict(policy="ms"), r"got 'ms'"),
    (dict(stop="never"), r"stop must be one of .*got 'never'"),
    (dict(readout="rate"), r"readout must be one of .*got 'rate'"),
    (dict(refractory_dropout=1.5), r"refractory_dropout must be a probability in \[0, 1\], got 1.5"),
    (dict(input_dropout=-0.1), r"input_dropout must be a probability in \[0, 1\], got -0.1"),
    (dict(network_dropout=math.nan), r"network_dropout must be a probability in \[0, 1\], got nan"),
    (dict(network_dropout="0.1"), r"network_dropout must be a probability"),
    (dict(momentum_noise=-1e-6), r"momentum_noise must be a finite number >= 0, got -1e-06"),
    (dict(momentum_noise=math.inf), r"momentum_noise .* got inf"),
    (dict(tau=0.0), r"tau must be > 0, got 0.0"),
    (dict(tau=-5.0), r"tau must be > 0, got -5.0"),
    (dict(tau=math.nan), r"tau contains NaN"),
    (dict(tau=torch.tensor([10.0, -1.0])), r"tau must be > 0, got -1.0"),
    (dict(theta=0.0), r"theta must be > 0, got 0.0"),
    (dict(theta=-0.3), r"theta must be > 0, got -0.3"),
    (dict(theta=math.inf), r"theta must be finite, got inf"),
    (dict(theta=torch.ones(2, 2)), r"theta tensor must be 1-D \[n_neurons\], got shape \(2, 2\)"),
    (dict(dt=0.0), r"dt must be a finite number of ms > 0, got 0.0"),
    (dict(dt=-1.0), r"dt must be .* got -1.0"),
    (dict(dt=math.inf), r"dt must be .* got inf"),
    (dict(sync_threshold=0), r"sync_threshold must be > 0, got 0"),
    (dict(sync_threshold=1.5), r"sync_threshold must be an integer count, got 1.5"),
    (dict(sync_threshold=torch.tensor([1.0, 2.5])), r"sync_threshold must be integers >= 1"),
    (dict(sync_threshold=torch.tensor([1, 0])), r"sync_threshold must be > 0, got 0"),
    (dict(steps_after_output=-1), r"steps_after_output must be an int >= 0, got -1"),
    (dict(max_steps=0), r"max_steps must be an int >= 1, got 0"),
    (dict(surrogate_steepness=0.0), r"surrogate_steepness must be > 0, got 0.0"),
    (dict(refractory=1), r"refractory must be a bool, got 1"),
    (dict(carry_pending="yes"), r"carry_pending must be a bool, got 'yes'"),
    (dict(seed=-1), r"seed must be None or an int >= 0, got -1"),
    (dict(seed=1.0), r"seed must be None or an int >= 0, got 1.0"),
]


def _id(kwargs: dict) -> str:
    k, v = next(iter(kwargs.items()))
    return f"{k}={'tensor' if isinstance(v, torch.Tensor) else v}"


@pytest.mark.parametrize("kwargs,match", REJECTED, ids=[_id(kw) for kw, _ in REJECTED])
def test_simconfig_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimConfig(**kwargs)


def test_simconfig_accepts_edges():
    SimConfig(refractory_dropout=0, input_dropout=1, network_dropout=1.0, momentum_noise=0)
    SimConfig(tau=math.inf, sync_threshold=3.0, steps_after_output=0, max_steps=1, seed=0)
    SimConfig(tau=torch.tensor([math.inf, 5.0]), sync_threshold=torch.tensor([1, 4]))


def test_per_neuron_length_checked_at_construction():
    net = make_net(SIZES)  # 16 neurons
    for name, value in (("theta", torch.full((15,), 0.3)), ("tau", torch.full((17,), 20.0)),
                        ("sync_threshold", torch.ones(8, dtype=torch.long))):
        with pytest.raises(ValueError, match=rf"{name} has shape \({value.numel()},\), the network "
                                             rf"has 16 neurons"):
            AsyncSNN(net, SimConfig(**{name: value}))
    AsyncSNN(net, SimConfig(theta=torch.full((16,), 0.3)))
    with pytest.raises(TypeError, match="cfg must be a SimConfig, got dict"):
        AsyncSNN(net, dict(K=2))


# --- network validation ------------------------------------------------------------------
@pytest.mark.parametrize("net,exc,match", [
    (nn.Conv2d(2, 4, 3), TypeError, r"layer 0 \(Conv2d\) is not supported"),
    (nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False)), TypeError,
     r"layer 1 \(ReLU\) is not supported"),
    (nn.Sequential(nn.Linear(4, 3)), ValueError, r"layer 0 \(Linear\) has a bias.*bias=False"),
    (nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2)), ValueError, r"layer 1 .* has a bias"),
    (nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(5, 2, bias=False)), ValueError,
     r"layer 1 \(Linear\) takes 5 features but the previous layer gives 3"),
    (nn.Sequential(), ValueError, r"empty nn.Sequential"),
], ids=["conv2d", "relu", "bias", "bias-layer1", "mismatch", "empty"])
def test_network_rejects(net, exc, match):
    with pytest.raises(exc, match=match):
        AsyncSNN(net)


def test_backend_choices():
    net = make_net(SIZES)
    frames = torch.ones(2, 1, SIZES[0])
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors, got cpu"):
        AsyncSNN(net, backend="triton")(frames)  # compiled kernels (no TRITON_INTERPRET) on CPU
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        AsyncSNN(net, backend="cuda")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"checkpoint_every must be None or an int >= 0, got {bad!r}"):
            AsyncSNN(net, checkpoint_every=bad)
    AsyncSNN(net, backend="torch")


# --- frames validation --------------------------------------------------------------------
def _bad_frames():
    ok = torch.zeros(2, 3, 8)
    nan, inf = ok.clone(), ok.clone()
    nan[1, 2, 5] = math.nan
    inf[0, 1, 3] = -math.inf
    return [
        (torch.zeros(3, 8), ValueError, r"frames must be \[T, B, 8\] .* got shape \(3, 8\)"),
        (torch.zeros(1, 2, 3, 8), ValueError, r"got shape \(1, 2, 3, 8\)"),
        (torch.zeros(2, 3, 7), ValueError, r"frames must be \[T, B, 8\] .* got shape \(2, 3, 7\)"),
        (torch.zeros(0, 3, 8), ValueError, r"T >= 1 and B >= 1, got shape \(0, 3, 8\)"),
        (torch.zeros(2, 3, 8, dtype=torch.int64), TypeError, r"frames must be floating point .* torch.int64"),
        (torch.zeros(2, 3, 8, dtype=torch.bool), TypeError, r"floating point .* torch.bool"),
        (nan, ValueError, r"frames contain 1 NaN/inf value\(s\), first at \[t, b, feature\] = \[1, 2, 5\]"),
        (inf, ValueError, r"first at \[t, b, feature\] = \[0, 1, 3\]"),
        (ok.numpy(), TypeError, r"frames must be a torch.Tensor \[T, B, 8\], got ndarray"),
    ]


@pytest.mark.parametrize("frames,exc,match", _bad_frames(),
                         ids=["rank2", "rank4", "features", "empty", "int64", "bool", "nan", "inf", "numpy"])
@pytest.mark.parametrize("policy", ["MS", "layered"])
def test_frames_rejected(frames, exc, match, policy):
    snn = AsyncSNN(make_net(SIZES), SimConfig(policy=policy))
    with pytest.raises(exc, match=match):
        snn(frames)


def test_call_seed_validated():
    snn = AsyncSNN(make_net(SIZES))
    for bad in (-1, 2**32, 1.0, True):
        with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*32\), got {bad!r}"):
            snn(torch.zeros(1, 1, 8), seed=bad)


# --- presets ---------------------------------------------------------------------------
def test_preset_errors():
    net = make_net(SIZES)
    with pytest.raises(ValueError, match="unknown preset 'tpu'"):
        SimConfig.preset("tpu", net)
    for npc in (None, 0):
        with pytest.raises(ValueError, match=rf"preset 'spinnaker' needs neurons_per_core >= 1, got {npc!r}"):
            SimConfig.preset("spinnaker", net, neurons_per_core=npc)
    with pytest.raises(ValueError, match="preset 'speck' takes no neurons_per_core"):
        SimConfig.preset("speck", net, neurons_per_core=4)
    with pytest.raises(TypeError, match="layer 0 \\(Conv2d\\)"):
        SimConfig.preset("loihi", nn.Conv2d(1, 1, 3))


def test_uniform_at_with_a_timestep_tensor_equals_per_timestep_draws():
    """rng.uniform_at over (t, b, f) triples at once (input dropout draws at the
    nonzero entries of a whole input) gives the numbers of per-timestep draws and of a
    draw over every feature."""
    from asynctrain import rng
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 5, (200,), generator=g)
    rows = torch.randint(0, 3, (200,), generator=g)
    cols = torch.randint(0, 40, (200,), generator=g)
    got = rng.uniform_at(9, rng.STREAM_INPUT_DROPOUT, t, 0, rows, cols)
    want = torch.stack([rng.uniform_at(9, rng.STREAM_INPUT_DROPOUT, int(ti), 0, r[None], c[None])[0]
                        for ti, r, c in zip(t, rows, cols)])
    assert torch.equal(got, want)
    full = rng.uniform(9, rng.STREAM_INPUT_DROPOUT, 2, 0, torch.arange(40).expand(3, 40))
    at2 = t == 2
    assert torch.equal(got[at2], full[rows[at2], cols[at2]])
    assert rng.uniform_at(9, 1, torch.zeros(0, dtype=torch.int64), 0, torch.zeros(0, dtype=torch.int64),
                          torch.zeros(0, dtype=torch.int64)).numel() == 0
