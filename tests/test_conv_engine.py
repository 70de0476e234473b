"""Convolutional networks end to end: `AsyncSNN` (sparse conv delivery, checkpointed
backward) against the dense oracle run on the networks' dense equivalents
(tests/conv_oracle.py), and the SPEC equivalences on tiny conv nets.

Spikes and stats exact; potentials and weight gradients within the fp32 tolerance of
conftest (the engine sums a step's currents in another order than the dense matmul).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asynctrain import AsyncSNN, SimConfig
from asynctrain.models import mlp, vgg7
from asynctrain.network import Network
from conftest import BASE, TOL, assert_close, assert_stats_equal, loss_weights
from conv_oracle import conv_weights, run_conv_oracle


def conv_net(kind: str, seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    """Tiny conv nets with enough gain that spikes reach the output."""
    g = torch.Generator().manual_seed(seed)
    if kind == "pool":      # 2x6x6 -> conv 3 -> pool -> conv 4 (3x3) -> flatten -> 5
        layers = [nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(2),
                  nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(),
                  nn.Linear(36, 5, bias=False)]
        shape = (2, 6, 6)
    elif kind == "odd":     # 2x5x7: the pooling floor drops a row and a column
        layers = [nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Conv2d(3, 4, 3, padding=1, bias=False),
                  nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 3, 6, bias=False)]
        shape = (2, 5, 7)
    elif kind == "deep":    # conv, pool, conv, flatten, fc, fc
        layers = [nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.AvgPool2d(2),
                  nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.Flatten(),
                  nn.Linear(27, 7, bias=False), nn.Linear(7, 4, bias=False)]
        shape = (1, 6, 6)
    else:
        raise ValueError(kind)
    net = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for m in net:
            if hasattr(m, "weight"):
                fan_in = m.weight[0].numel()
                m.weight.copy_((0.9 * torch.randn(m.weight.shape, generator=g, dtype=torch.float64)
                                + 0.35) * (3.0 / fan_in) ** 0.5)
    net.input_shape = shape
    return net


def image_frames(T, B, shape, *, p=0.5, analog=False, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(T, B, *shape, generator=g)
    return (x * (x < p) if analog else (x < p).float()).to(dtype)


def run_engine(net, cfg, frames, *, seed=3, training=False, checkpoint_every=None):
    snn = AsyncSNN(net, cfg, checkpoint_every=checkpoint_every)
    snn.train(training)
    out = snn(frames, seed=seed)
    ws = conv_weights(net)
    if out.requires_grad:
        gs = torch.autograd.grad((out * loss_weights(out.shape, out.dtype)).sum(), ws, allow_unused=True)
        gs = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, gs)]
    else:
        gs = [torch.zeros_like(w) for w in ws]
    return out.detach(), snn.stats, gs


def run_oracle(net, cfg, frames, *, seed=3, training=False):
    n_out = conv_weights(net)[-1].shape[0]
    cot = loss_weights((frames.shape[0], frames.shape[1], n_out), frames.dtype)
    return run_conv_oracle(net, cfg, frames, net.input_shape, seed=seed, training=training,
                           cotangent=cot)


def assert_match(eng, ora, readout="counts"):
    (out_e, st_e, g_e), (out_o, st_o, g_o) = eng, ora
    if readout == "counts":
        assert torch.equal(out_e, out_o), "output spike counts differ"
    else:
        assert_close(out_e, out_o, "output potentials")
    assert_stats_equal(st_e, st_o)
    assert_close(st_e["final_v"], st_o["final_v"], "final potentials")
    for l, (a, b) in enumerate(zip(g_e, g_o)):
        assert_close(a, b, f"weight gradient of layer {l}")


CASES = {
    "ms-k4": dict(policy="MS", forward_group_size=4),
    "rs-k3": dict(policy="RS", forward_group_size=3),
    "ms-k1-prio": dict(policy="MS", forward_group_size=1, prioritize_input=True),
    "rs-k16-prio-potential": dict(policy="RS", forward_group_size=16, prioritize_input=True,
                                  readout="potential"),
    "ms-k7-norefr": dict(policy="MS", forward_group_size=7, refractory=False, max_steps=60),
    "rs-k5-output-stop": dict(policy="RS", forward_group_size=5, stop="output"),
    "ms-k6-sync2-barrier": dict(policy="MS", forward_group_size=6, sync_threshold=2,
                                barrier_messages=True),
}


@pytest.mark.filterwarnings("ignore:.*reached max_steps")  # the no-refractory case runs away
@pytest.mark.parametrize("kind", ["pool", "odd", "deep"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_engine_matches_oracle(kind, name):
    net = conv_net(kind)
    cfg = SimConfig(**BASE, **CASES[name])
    frames = image_frames(2, 3, net.input_shape, analog=cfg.prioritize_input)
    eng = run_engine(net, cfg, frames)
    ora = run_oracle(net, cfg, frames)
    assert_match(eng, ora, cfg.readout)
    assert int(eng[1]["hidden_spikes"].sum()) > 0


@pytest.mark.parametrize("kind", ["pool", "deep"])
@pytest.mark.parametrize("policy", ["RS", "MS"])
@pytest.mark.parametrize("ck", [None, 0, 2])
def test_conv_engine_matches_oracle_in_training(kind, policy, ck):
    """Refractory dropout, momentum noise, input and network dropout; checkpointing
    adaptive, off and every 2 ops."""
    net = conv_net(kind, seed=4)
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=5, refractory_dropout=0.5,
                    momentum_noise=0.05, input_dropout=0.1, network_dropout=0.1)
    frames = image_frames(2, 2, net.input_shape, seed=6)
    assert_match(run_engine(net, cfg, frames, training=True, checkpoint_every=ck),
                 run_oracle(net, cfg, frames, training=True))


@pytest.mark.parametrize("readout", ["counts", "potential"])
def test_conv_layered_matches_oracle(readout):
    net = conv_net("odd")
    cfg = SimConfig(**BASE, policy="layered", readout=readout)
    frames = image_frames(3, 4, net.input_shape, analog=True, p=0.8)
    assert_match(run_engine(net, cfg, frames), run_oracle(net, cfg, frames), readout)


def test_conv_fp64():
    # RS: the engine ranks MS keys in float32 (kernels/select.py), the oracle in the
    # run's dtype, so fp64 MS runs with near-tied pre-spike potentials may order them
    # differently (same spikes, other gradient paths).
    net = conv_net("pool", dtype=torch.float64)
    cfg = SimConfig(**BASE, policy="RS", forward_group_size=3)
    frames = image_frames(2, 2, net.input_shape, dtype=torch.float64)
    eng, ora = run_engine(net, cfg, frames), run_oracle(net, cfg, frames)
    assert torch.equal(eng[0], ora[0])
    for a, b in zip(eng[2], ora[2]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


# --- SPEC equivalences on conv nets ----------------------------------------------------
@pytest.mark.parametrize("kind", ["pool", "odd", "deep"])
@pytest.mark.parametrize("readout", ["counts", "potential"])
def test_barrier_preset_equals_layered_conv(kind, readout):
    """Loihi preset (K = widest layer, sync = fan-in per neuron -- fewer at borders --,
    barriers, prioritized input) gives the layered spikes, potentials and gradients."""
    net = conv_net(kind, seed=2)
    frames = image_frames(2, 3, net.input_shape, analog=True, p=0.7, seed=3)
    base = dict(BASE, readout=readout)
    lay = run_engine(net, SimConfig(**base, policy="layered"), frames)
    for policy in ("MS", "RS"):
        cfg = SimConfig.preset("loihi", net, policy=policy, **base)
        assert torch.equal(cfg.sync_threshold, Network.from_module(net).fan_in_per_neuron())
        eng = run_engine(net, cfg, frames)
        if readout == "counts":
            assert torch.equal(eng[0], lay[0])
        else:
            assert_close(eng[0], lay[0], "potentials")
        assert_close(eng[1]["final_v"], lay[1]["final_v"], "final potentials")
        assert torch.equal(eng[1]["hidden_spikes"], lay[1]["hidden_spikes"])
        for a, b in zip(eng[2], lay[2]):
            assert_close(a, b, "weight gradient")


@pytest.mark.parametrize("kind", ["pool", "odd"])
@pytest.mark.parametrize("policy", ["RS", "MS"])
def test_large_k_gives_layered_spikes_conv(kind, policy):
    """Refractory, K >= number of pending outboxes: the layered spikes (not gradients)."""
    net = conv_net(kind, seed=5)
    frames = image_frames(3, 3, net.input_shape, seed=7)
    lay = run_engine(net, SimConfig(**BASE, policy="layered"), frames)
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=10_000)
    eng = run_engine(net, cfg, frames)
    assert torch.equal(eng[0], lay[0])
    assert torch.equal(eng[1]["hidden_spikes"], lay[1]["hidden_spikes"])
    assert torch.equal(eng[1]["synops"].sum(0), lay[1]["synops"].sum(0))


def test_image_and_flat_frames_agree_and_shapes_checked():
    net = conv_net("pool")
    frames = image_frames(2, 2, net.input_shape)
    snn = AsyncSNN(net, SimConfig(**BASE, forward_group_size=4))
    a = snn(frames, seed=1)
    b = snn(frames.flatten(2), seed=1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"frames must be \[T, B, 2, 6, 6\]"):
        snn(torch.zeros(1, 2, 2, 6, 5))
    with pytest.raises(ValueError, match=r"frames must be \[T, B, 72\]"):
        snn(torch.zeros(1, 2, 71))
    del net.input_shape
    with pytest.raises(ValueError, match=r"input_shape=\(C, H, W\)"):
        AsyncSNN(net)
    AsyncSNN(net, input_shape=(2, 6, 6))


def test_checkpointed_backward_equals_plain_autograd_conv():
    net = conv_net("deep", seed=8)
    cfg = SimConfig(**BASE, policy="RS", forward_group_size=2, refractory_dropout=0.3)
    frames = image_frames(2, 3, net.input_shape, seed=9)
    ref = run_engine(net, cfg, frames, training=True, checkpoint_every=0)
    for ck in (None, 1, 5):
        got = run_engine(net, cfg, frames, training=True, checkpoint_every=ck)
        assert torch.equal(got[0], ref[0])
        for a, b in zip(got[2], ref[2]):
            assert_close(a, b, "checkpointed gradient")


# --- models -----------------------------------------------------------------------------
def test_vgg7_layout_loads_in_asyncsnn_and_runs_layered():
    net = vgg7()
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv2d", "Conv2d", "AvgPool2d", "Conv2d", "Conv2d", "AvgPool2d", "Conv2d",
                     "Conv2d", "AvgPool2d", "Flatten", "Linear"]
    assert [m.out_channels for m in net if isinstance(m, nn.Conv2d)] == [64, 64, 128, 128, 256, 256]
    g = Network.from_module(net)
    assert g.layer_sizes == (3072, 65536, 65536, 32768, 32768, 16384, 16384, 10)
    assert g.image and net[-1].in_features == 4096
    tiny = vgg7(width=1 / 16)
    snn = AsyncSNN(tiny, SimConfig(policy="layered", tau=float("inf"), theta=0.2, readout="potential"))
    out = snn(torch.rand(1, 2, 3, 32, 32))
    assert out.shape == (1, 2, 10)
    with pytest.raises(ValueError, match="width"):
        vgg7(width=0)


def test_mlp_models_by_name():
    assert [m.out_features for m in mlp("nmnist")] == [64, 64, 64, 10]
    assert mlp("shd")[0].in_features == 350 and mlp("dvs_gesture")[-1].out_features == 11
    assert Network.from_module(mlp(sizes=[5, 4, 3])).layer_sizes == (5, 4, 3)
    for bad in (dict(name="cifar"), dict(), dict(name="shd", sizes=[2, 3]), dict(sizes=[3])):
        with pytest.raises(ValueError):
            mlp(**bad)


def test_frame_gradient_through_prioritized_conv_input():
    """Analog frames with requires_grad (an encoder in front): the checkpointed sweep's
    frame gradient equals plain autograd's."""
    net = conv_net("pool", seed=2)
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=4, prioritize_input=True,
                    readout="potential")
    base = 2 * image_frames(2, 2, net.input_shape, analog=True, p=1.0, seed=4)
    grads = []
    for ck in (0, None):
        frames = base.clone().requires_grad_()
        out = AsyncSNN(net, cfg, checkpoint_every=ck)(frames, seed=2)
        (out * loss_weights(out.shape, out.dtype)).sum().backward()
        grads.append(frames.grad)
    assert grads[0].abs().sum() > 0
    assert_close(grads[1], grads[0], "frame gradient")


class _Op(int):
    """Stands for a state in the checkpoint-count tests (Checkpoints keeps st.pack())."""

    def pack(self, sync_free=False, share=False):
        return self


def test_adaptive_checkpoints_keep_sqrt_ops_times_ratio():
    from asynctrain.timeline import Checkpoints
    for ratio, n in ((1.0, 4096), (0.25, 4096), (1 / 64, 4096 * 64)):
        ck = Checkpoints(None, ratio)
        for i in range(n):
            ck.offer(i, _Op(i))
        kept = len(ck.saved)
        assert kept <= ck.c * ratio + 1
        assert (n * ratio) ** 0.5 / 2 <= kept <= 2 * (n * ratio) ** 0.5 + 1, (ratio, kept, ck.c)


@pytest.mark.parametrize("o_density", [0.0, 0.05, 0.9])
@pytest.mark.parametrize("n_max", [3, 2**15, 2**20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_state_round_trip(o_density, n_max, dtype):
    """Checkpoints keep a packed copy: sparse outboxes under half full, int16 counts
    when they fit; unpacking gives the state back exactly, and later in-place updates
    of the state do not reach the copy."""
    from asynctrain.state import State
    g = torch.Generator().manual_seed(1)
    b, w = 3, 50
    o = torch.rand(b, w, generator=g, dtype=dtype)
    o = o * (torch.rand(b, w, generator=g) < o_density)
    st = State(torch.randn(b, w, generator=g, dtype=dtype), o, torch.rand(b, 4, generator=g, dtype=dtype),
               torch.rand(b, w, generator=g) < 0.3,
               torch.randint(0, n_max, (b, w), generator=g, dtype=torch.int32))
    packed = st.pack()
    assert (packed.o_at is not None) == (2 * int((o != 0).sum()) < o.numel())
    assert packed.n_in.dtype == (torch.int16 if n_max <= 2**15 else torch.int32)
    ref = st.clone()
    st.v.add_(1.0), st.o.add_(1.0), st.n_in.add_(1), st.refr.logical_not_()
    back = packed.unpack()
    for f in ("v", "o", "acc", "refr", "n_in"):
        a, r = getattr(back, f), getattr(ref, f)
        assert a.dtype == r.dtype and torch.equal(a, r), f


def test_nested_checkpoints_keep_cube_root_of_ops_times_ratio():
    """Nested (conv): about (ops r)^(1/3) states kept, each segment ~ ops^(2/3) r^(-1/3)
    ops long, which the backward splits into ~sqrt(C / r)-op parts."""
    from asynctrain.timeline import Checkpoints
    for ratio, n in ((1.0, 4096), (1 / 32, 20000), (1 / 64, 4096 * 64)):
        ck = Checkpoints(None, ratio, nested=True)
        for i in range(n):
            ck.offer(i, _Op(i))
        kept, cube = len(ck.saved), (n * ratio) ** (1 / 3)
        assert cube / 2 <= kept <= 2 * cube + 1, (ratio, kept, ck.c)
        assert kept <= (ck.c * ratio) ** 0.5 + 1


@pytest.mark.parametrize("steps", ["whole", "receivers"])
@pytest.mark.parametrize("policy", ["RS", "MS"])
def test_steps_at_receivers_or_whole_state_match_oracle(steps, policy):
    """Conv steps without autograd run at their receivers (in place) or, when most
    columns received, over the whole state: every step forced one way or the other
    (`plan.forced`), both match the dense oracle, in training (with barrier messages,
    dropout, noise) and in evaluation."""
    from asynctrain import plan
    net = conv_net("odd", seed=3)
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=4, refractory_dropout=0.3,
                    momentum_noise=0.05, network_dropout=0.1, barrier_messages=True)
    frames = image_frames(2, 2, net.input_shape, seed=5)
    for training in (True, False):
        with plan.forced(steps=steps):
            eng = run_engine(net, cfg, frames, training=training)
        assert_match(eng, run_oracle(net, cfg, frames, training=training))
        assert int(eng[1]["hidden_spikes"].sum()) > 0


@pytest.mark.parametrize("steps", ["whole", "receivers"])
def test_full_and_compact_records_backward_equals_plain_autograd_conv(steps):
    """Every conv step's backward record full ([B, W] masks, the whole-state mode;
    VGG-7 at large K), or every one compact (receivers only): gradients equal plain
    autograd's."""
    from asynctrain import plan
    net = conv_net("deep", seed=8)
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=3, refractory_dropout=0.3,
                    momentum_noise=0.05, readout="potential")
    frames = image_frames(2, 3, net.input_shape, seed=9)
    ref = run_engine(net, cfg, frames, training=True, checkpoint_every=0)
    with plan.forced(steps=steps):
        got = run_engine(net, cfg, frames, training=True)
    assert torch.equal(got[0], ref[0])
    assert any(g.abs().sum() > 0 for g in ref[2])
    for a, b in zip(got[2], ref[2]):
        assert_close(a, b, "checkpointed gradient")


def test_nested_segments_backward_equals_plain_autograd_conv(monkeypatch):
    """Conv nets split long segments again in the backward (one more recompute, inner
    states instead of records): gradients equal plain autograd's, and equal exactly
    the unsplit sweep's (the recompute is deterministic)."""
    from asynctrain.loop import CallLoop
    from asynctrain.plan import Plan
    net = conv_net("deep", seed=8)
    cfg = SimConfig(**BASE, policy="RS", forward_group_size=1, refractory_dropout=0.3)
    frames = image_frames(2, 3, net.input_shape, seed=9)
    splits = []
    real = CallLoop.replay

    def counting(*args, states_every=None):
        if states_every is not None:
            splits.append(states_every)
        return real(*args, states_every=states_every)

    monkeypatch.setattr(CallLoop, "replay", counting)
    nested = run_engine(net, cfg, frames, training=True)
    assert splits and min(splits) >= 2  # some segments were split
    ref = run_engine(net, cfg, frames, training=True, checkpoint_every=0)
    assert torch.equal(nested[0], ref[0])
    for a, b in zip(nested[2], ref[2]):
        assert_close(a, b, "nested checkpointed gradient")
    monkeypatch.setattr(Plan, "sub_segment", lambda self, n: None)  # two levels only
    flat = run_engine(net, cfg, frames, training=True)
    for a, b in zip(nested[2], flat[2]):
        assert torch.equal(a, b)


def test_currents_to_spike_histogram_conv_barrier_equals_layered():
    """Border neurons integrate fewer currents: the histogram has several fan-in bins."""
    net = conv_net("odd", seed=2)
    frames = image_frames(2, 3, net.input_shape, analog=True, p=0.7, seed=3)
    hists = []
    for cfg in (SimConfig.preset("loihi", net, **BASE), SimConfig(policy="layered", **BASE)):
        snn = AsyncSNN(net, cfg, record_currents=True)
        snn(frames, seed=1)
        hists.append(snn.stats["currents_to_spike"])
    assert torch.equal(hists[0], hists[1]) and hists[1].sum() > 0
    fan_ins = set(Network.from_module(net).fan_in_per_neuron().tolist())
    assert set(hists[1].nonzero().flatten().tolist()) <= fan_ins
    assert len(hists[1].nonzero()) > 2


def test_flatten_then_linear_stays_on_the_table_path():
    """nn.Flatten + nn.Linear on image frames is a plain MLP: same results as the
    Linear stack on flat frames, without the conv machinery."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(18, 7, bias=False), nn.Linear(7, 4, bias=False))
    with torch.no_grad():
        for m in lin:
            m.weight.mul_(3.0).add_(0.2)
    img = nn.Sequential(nn.Flatten(), *lin)
    g = Network.from_module(img, (2, 3, 3))
    assert not g.image and g.layer_sizes == (18, 7, 4) and g.input_shape == (2, 3, 3)
    frames = image_frames(2, 3, (2, 3, 3), seed=2)
    for policy in ("MS", "layered"):
        cfg = SimConfig(**BASE, policy=policy, forward_group_size=3)
        a = AsyncSNN(img, cfg, input_shape=(2, 3, 3))(frames, seed=1)
        b = AsyncSNN(lin, cfg)(frames.flatten(2), seed=1)
        assert torch.equal(a, b)


def test_retain_stores_keep_copies():
    from asynctrain.retain import ChunkStore, FlatStore
    small, flat = ChunkStore(per_chunk=3), FlatStore(min_chunk=5)
    xs = [torch.full((2, 2), float(i)) for i in range(7)]
    kept = [small.keep(x) for x in xs]
    for x in xs:
        x.zero_()  # the originals may be reused: the copies must not change
    assert all(torch.equal(k, torch.full((2, 2), float(i))) for i, k in enumerate(kept))
    parts = [torch.arange(n) + 10 * n for n in (2, 4, 1, 9)]
    kept = [flat.keep(p) for p in parts]
    assert all(torch.equal(k, p) for k, p in zip(kept, parts))
