"""NIR export / import (asynctrain.nir): exact round trips, files, every refusal, and
snnTorch's own exporter reproduced spike for spike."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")

from asynctrain import AsyncSNN, SimConfig  # noqa: E402
from asynctrain import nir as anir  # noqa: E402
from asynctrain.models.vgg7 import vgg7  # noqa: E402

torch.set_num_threads(1)
STAT_KEYS = ("forward_steps", "synops", "first_output_step", "capped", "hidden_spikes",
             "spikes_processed", "spikes_to_first_output", "final_v")


def _fc_snn(policy: str) -> AsyncSNN:
    g = torch.Generator().manual_seed(0)
    sizes = [12, 10, 8, 4]
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for m in net:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.6 + 0.15)
    # per-neuron tau (an IF layer in the middle) and theta: every parameter travels
    tau = torch.cat([torch.rand(10, generator=g, dtype=torch.float64) * 40 + 2,
                     torch.full((8,), math.inf, dtype=torch.float64),
                     torch.rand(4, generator=g, dtype=torch.float64) * 40 + 2])
    theta = torch.rand(22, generator=g, dtype=torch.float64) * 0.3 + 0.2
    cfg = SimConfig(policy=policy, K=3, tau=tau, theta=theta, dt=10.0, surrogate_steepness=2.0,
                    momentum_noise=0.01 if policy == "MS" else 0.0, seed=5,
                    refractory_dropout=0.3 if policy != "layered" else 0.0,
                    sync_threshold=torch.tensor([1] * 10 + [2] * 8 + [1] * 4))
    return AsyncSNN(net, cfg, backend="torch")


def _conv_snn(policy: str) -> AsyncSNN:
    torch.manual_seed(1)
    net = vgg7(num_classes=3, width=1 / 32, image_size=8)
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0).add_(0.1)
    cfg = SimConfig(policy=policy, K=5, tau=30.0, theta=0.25, dt=10.0, surrogate_steepness=2.0,
                    seed=2)
    return AsyncSNN(net, cfg, backend="torch")


def _run(snn: AsyncSNN, frames: torch.Tensor) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    snn.train()
    for p in snn.parameters():
        p.grad = None
    out = snn(frames, seed=11)
    (out.sum(0) * torch.arange(1, out.shape[-1] + 1, dtype=out.dtype)).sum().backward()
    return out.detach(), snn.stats, [p.grad.clone() for p in snn.parameters()]


def _same(a: AsyncSNN, b: AsyncSNN, frames: torch.Tensor) -> None:
    out_a, st_a, g_a = _run(a, frames)
    out_b, st_b, g_b = _run(b, frames)
    assert out_a.sum() > 0, "the test network must spike at its outputs"
    assert torch.equal(out_a, out_b)
    for k in STAT_KEYS:
        assert torch.equal(st_a[k], st_b[k]), k
    assert st_a["capped_passes"] == st_b["capped_passes"]
    assert len(g_a) == len(g_b)
    for x, y in zip(g_a, g_b):
        assert x.abs().sum() > 0
        assert torch.equal(x, y)


@pytest.mark.parametrize("policy", ["layered", "RS", "MS"])
def test_round_trip_fc_exact(policy):
    snn = _fc_snn(policy)
    back = anir.from_nir(anir.to_nir(snn), backend="torch")
    assert back.cfg.policy == policy and back.cfg.K == 3 and back.cfg.seed == 5
    assert back.cfg.refractory_dropout == snn.cfg.refractory_dropout
    assert torch.equal(back.cfg.sync_threshold.double(), snn.cfg.sync_threshold.double())
    assert back.cfg.dt == 10.0
    # the per-step decay the engine uses is the same float32 number
    d_a = torch.exp(-10.0 / snn.cfg.tau).float()
    d_b = torch.exp(-10.0 / back.cfg.tau).float()
    assert torch.equal(d_a, d_b)
    assert torch.equal(snn.cfg.theta.float(), back.cfg.theta.float())
    frames = (torch.rand(4, 3, 12, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    _same(snn, back, frames)


@pytest.mark.parametrize("policy", ["layered", "RS", "MS"])
def test_round_trip_conv_exact(policy):
    snn = _conv_snn(policy)
    graph = anir.to_nir(snn)
    assert isinstance(graph.nodes["neurons0"], nir.LIF)
    assert graph.nodes["neurons0"].tau.shape == (2, 8, 8)
    back = anir.from_nir(graph, backend="torch")
    assert [type(m) for m in back.net] == [type(m) for m in snn.net]
    frames = (torch.rand(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    _same(snn, back, frames)


def test_file_written_and_read_back(tmp_path):
    snn = _fc_snn("MS")
    path = tmp_path / "sub" / "model.nir"
    anir.write(path, snn)
    graph = anir.read(path)
    assert graph.metadata["source"] == "asynctrain"
    back = anir.from_nir(path, backend="torch")
    assert back.cfg == anir.from_nir(anir.to_nir(snn), backend="torch").cfg
    frames = (torch.rand(3, 2, 12, generator=torch.Generator().manual_seed(8)) < 0.5).float()
    _same(snn, back, frames)
    # a conv model through a file as well (image input shape kept)
    conv = _conv_snn("layered")
    anir.write(tmp_path / "conv.nir", conv)
    back = anir.from_nir(tmp_path / "conv.nir", backend="torch")
    assert back.graph.input_shape == (3, 8, 8)
    with pytest.raises(FileNotFoundError, match="nothing.nir"):
        anir.read(tmp_path / "nothing.nir")


def test_image_frames_into_linear_layers_round_trip():
    """An MLP fed (C, H, W) frames: the export says the flattening, the import keeps
    the image shape so the same frames run."""
    for flatten in (False, True):
        layers = [nn.Flatten()] if flatten else []
        net = nn.Sequential(*layers, nn.Linear(8, 5, bias=False), nn.Linear(5, 3, bias=False))
        with torch.no_grad():
            for m in net[-2:]:
                m.weight.uniform_(0.0, 1.0)
        snn = AsyncSNN(net, SimConfig(policy="RS", K=2, seed=1), backend="torch",
                       input_shape=(2, 2, 2))
        graph = anir.to_nir(snn)
        assert isinstance(graph.nodes[graph.edges[1][0]], nir.Flatten)
        back = anir.from_nir(graph, backend="torch")
        assert back.graph.input_shape == (2, 2, 2)
        frames = (torch.rand(3, 4, 2, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.6).float()
        with torch.no_grad():
            a, b = snn(frames, seed=3), back(frames, seed=3)
        assert a.sum() > 0 and torch.equal(a, b)


def test_dt_restored_exactly():
    snn = _fc_snn("layered")
    snn.cfg = snn.cfg.replace(dt=3.97)  # 3.97 / 1000 * 1000 != 3.97 in floating point
    assert 3.97 / 1000 * 1000 != 3.97
    assert anir.from_nir(anir.to_nir(snn), backend="torch").cfg.dt == 3.97


def test_if_layer_exported_as_if_and_lif_r():
    graph = anir.to_nir(_fc_snn("layered"))
    assert isinstance(graph.nodes["neurons1"], nir.IF)
    np.testing.assert_allclose(graph.nodes["neurons1"].r, 100.0)  # 1 / dt, dt = 0.01 s
    lif = graph.nodes["neurons0"]
    np.testing.assert_allclose(lif.r * 0.01 / lif.tau, 1.0, rtol=1e-12)  # input scale 1
    assert graph.metadata["dt"] == 0.01


def test_mixed_if_lif_layer_refused():
    snn = _fc_snn("layered")
    tau = snn.cfg.tau.clone()
    tau[0] = math.inf
    snn.cfg = snn.cfg.replace(tau=tau)
    with pytest.raises(ValueError, match="neuron layer 0 mixes IF"):
        anir.to_nir(snn)


# ------------------------------------------------------------------- refusals
def _lif(n, **kw):
    p = dict(tau=np.full(n, 0.02), r=np.full(n, 2.0), v_leak=np.zeros(n),
             v_threshold=np.full(n, 0.5), v_reset=np.zeros(n))
    p.update(kw)
    return nir.LIF(**p)


def _graph(nodes, edges=None, dt=0.01):
    names = list(nodes)
    edges = edges if edges is not None else list(zip(names[:-1], names[1:]))
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt": dt} if dt else {},
                        type_check=False)


def _chain_nodes(**over):
    w = np.ones((3, 4), dtype=np.float32) * 0.1
    nodes = {"input": nir.Input(input_type={"input": np.array([4])}),
             "fc": nir.Linear(weight=w), "lif": _lif(3),
             "output": nir.Output(output_type={"output": np.array([3])})}
    nodes.update(over)
    return nodes


def test_plain_graph_imports_with_scale_folded():
    snn = anir.from_nir(_graph(_chain_nodes()))
    # r dt / tau = 2 * 0.01 / 0.02 = 1: weights unchanged; beta = 1 - 0.01 / 0.02 = 0.5
    assert torch.equal(snn.net[0].weight, torch.full((3, 4), 0.1))
    np.testing.assert_allclose(torch.exp(-10.0 / snn.cfg.tau).numpy(), 0.5)
    snn = anir.from_nir(_graph(_chain_nodes(lif=_lif(3, r=np.full(3, 6.0)))))
    np.testing.assert_allclose(snn.net[0].weight.detach().numpy(), 0.3, rtol=1e-6)


@pytest.mark.parametrize("case, match", [
    ("affine_bias", r"node 'fc' \(Affine\): bias must be 0"),
    ("v_leak", r"node 'lif' \(LIF\): v_leak must be 0"),
    ("v_reset", r"node 'lif' \(LIF\): v_reset must be 0"),
    ("cuba", r"node 'lif'.*CubaLIF"),
    ("recurrent", r"recurrent edge 'rec' -> 'lif'"),
    ("self_edge", r"recurrent edge 'lif' -> 'lif'"),
    ("subgraph", r"node 'rnn' is a sub-graph"),
    ("kernel", r"node 'conv' \(Conv2d\): kernel size must be 3x3"),
    ("stride", r"node 'conv' \(Conv2d\): stride must be 1"),
    ("pool", r"node 'pool' \(AvgPool2d\): kernel_size must be 2"),
    ("branch", r"not a chain: node 'input' has 2 outgoing"),
    ("off_path", r"not a chain: node\(s\) \['extra'\]"),
    ("no_dt", r"needs the discretization step"),
    ("tau_short", r"node 'lif' \(LIF\): tau = 0.001 s is shorter than dt"),
    ("tau_inf", r"node 'lif' \(LIF\): tau = inf .* write such neurons as an IF node"),
    ("reset_meta", r"node 'lif' \(LIF\): reset_mechanism = 'subtract'"),
    ("unsupported", r"node 'fc': Scale is not supported"),
    ("threshold_node", r"node 'lif': Threshold after a weight layer"),
])
def test_refusals_name_node_and_parameter(case, match):
    n3 = np.zeros(3)
    dt = 0.01
    edges = None
    if case == "affine_bias":
        nodes = _chain_nodes(fc=nir.Affine(weight=np.ones((3, 4)), bias=np.array([0.0, 0.1, 0.0])))
    elif case == "v_leak":
        nodes = _chain_nodes(lif=_lif(3, v_leak=n3 + 0.2))
    elif case == "v_reset":
        nodes = _chain_nodes(lif=_lif(3, v_reset=n3 - 0.1))
    elif case == "cuba":
        nodes = _chain_nodes(lif=nir.CubaLIF(tau_syn=n3 + 0.02, tau_mem=n3 + 0.02, r=n3 + 1,
                                             v_leak=n3, v_threshold=n3 + 1))
    elif case == "recurrent":  # snnTorch's RLeaky, flattened: lif -> w_rec -> lif
        nodes = _chain_nodes(rec=nir.Linear(weight=np.eye(3)))
        edges = [("input", "fc"), ("fc", "lif"), ("lif", "rec"), ("rec", "lif"), ("lif", "output")]
    elif case == "self_edge":
        nodes = _chain_nodes()
        edges = [("input", "fc"), ("fc", "lif"), ("lif", "lif"), ("lif", "output")]
    elif case == "subgraph":
        inner = _graph(_chain_nodes())
        nodes = {"input": nir.Input(input_type={"input": np.array([4])}), "rnn": inner,
                 "output": nir.Output(output_type={"output": np.array([3])})}
    elif case in ("kernel", "stride", "pool"):
        k = 5 if case == "kernel" else 3
        conv = nir.Conv2d(input_shape=(4, 4), weight=np.ones((2, 1, k, k)),
                          stride=2 if case == "stride" else 1, padding=1, dilation=1, groups=1,
                          bias=np.zeros(2))
        nodes = {"input": nir.Input(input_type={"input": np.array([1, 4, 4])}), "conv": conv,
                 "lif": _lif(1), "pool": nir.AvgPool2d(kernel_size=np.array([3, 3]),
                                                       stride=np.array([3, 3]),
                                                       padding=np.array([0, 0])),
                 "output": nir.Output(output_type={"output": np.array([2, 1, 1])})}
        if case != "pool":
            nodes.pop("pool")
    elif case == "branch":
        nodes = _chain_nodes(fc2=nir.Linear(weight=np.ones((3, 4))))
        edges = [("input", "fc"), ("input", "fc2"), ("fc", "lif"), ("lif", "output")]
    elif case == "off_path":
        nodes = _chain_nodes(extra=nir.Linear(weight=np.ones((3, 3))))
        edges = [("input", "fc"), ("fc", "lif"), ("lif", "output")]
    elif case == "no_dt":
        nodes, dt = _chain_nodes(), None
    elif case == "tau_short":
        nodes = _chain_nodes(lif=_lif(3, tau=n3 + 0.001))
    elif case == "tau_inf":
        nodes = _chain_nodes(lif=_lif(3, tau=n3 + np.inf))
    elif case == "reset_meta":
        lif = _lif(3)
        lif.metadata = {"reset_mechanism": "subtract"}
        nodes = _chain_nodes(lif=lif)
    elif case == "unsupported":
        nodes = _chain_nodes(fc=nir.Scale(scale=np.ones(4)))
    elif case == "threshold_node":
        nodes = _chain_nodes(lif=nir.Threshold(threshold=n3 + 1))
    with pytest.raises(ValueError, match=match):
        anir.from_nir(_graph(nodes, edges, dt))


def test_dt_from_cfg_when_graph_has_none():
    g = _graph(_chain_nodes(), dt=None)
    snn = anir.from_nir(g, SimConfig(dt=5.0, K=2))
    assert snn.cfg.dt == 5.0 and snn.cfg.K == 2
    np.testing.assert_allclose(torch.exp(-5.0 / snn.cfg.tau).numpy(), 1 - 0.005 / 0.02)


def test_cfg_overrides_our_settings_but_not_dt():
    snn = _fc_snn("MS")
    graph = anir.to_nir(snn)
    with pytest.warns(UserWarning, match="cfg.dt = 5 ms is ignored"):
        back = anir.from_nir(graph, SimConfig(K=7, policy="RS", dt=5.0), backend="torch")
    assert back.cfg.K == 7 and back.cfg.policy == "RS" and back.cfg.dt == 10.0
    # every stored setting comes back when no cfg is given
    back = anir.from_nir(graph, backend="torch")
    for f in ("forward_group_size", "policy", "stop", "refractory", "refractory_dropout",
              "momentum_noise", "surrogate_steepness", "readout", "seed", "dt"):
        assert getattr(back.cfg, f) == getattr(snn.cfg, f), f


def test_settings_of_a_newer_version_warn_and_are_dropped():
    graph = anir.to_nir(_fc_snn("MS"))
    import json
    settings = json.loads(graph.metadata["asynctrain_config"])
    settings["future_knob"] = 3
    graph.metadata["asynctrain_config"] = json.dumps(settings)
    with pytest.warns(UserWarning, match=r"\['future_knob'\]"):
        back = anir.from_nir(graph, backend="torch")
    assert back.cfg.K == 3




# ------------------------------------------------- what a first user hits
def test_nan_weights_are_refused_on_import_naming_the_node():
    w = np.ones((3, 4), dtype=np.float32) * 0.1
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"node 'fc' \(Linear\): weight holds 1 NaN/inf value\(s\) of 12"):
        anir.from_nir(_graph(_chain_nodes(fc=nir.Linear(weight=w))))


def test_dt_unit_is_honoured_and_an_unknown_one_named():
    g = _graph(_chain_nodes(), dt=None)
    g.metadata = {"dt": 10.0, "dt_unit": "ms"}
    assert anir.from_nir(g).cfg.dt == 10.0  # not 10 s
    g.metadata = {"dt": 0.01, "dt_unit": "s"}
    assert anir.from_nir(g).cfg.dt == 10.0
    g.metadata = {"dt": 10.0, "dt_unit": "fortnights"}
    with pytest.raises(ValueError, match=r"'dt_unit' is 'fortnights'; known units: s, ms, us"):
        anir.from_nir(g)


def test_settings_that_are_not_json_name_the_file(tmp_path):
    graph = anir.to_nir(_fc_snn("MS"))
    graph.metadata["asynctrain_config"] = "{not json"
    nir.write(tmp_path / "bad.nir", graph)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.nir'}: graph metadata 'asynctrain_config' "
                                         r"is not JSON"):
        anir.from_nir(tmp_path / "bad.nir")


def test_a_batch_axis_on_the_input_node_is_dropped(tmp_path):
    nodes = _chain_nodes(input=nir.Input(input_type={"input": np.array([1, 4])}))
    snn = anir.from_nir(_graph(nodes))
    assert snn.graph.n_inputs == 4 and snn(torch.ones(2, 3, 4)).shape == (2, 3, 3)
    nir.write(tmp_path / "b.nir", _graph(nodes))
    assert anir.from_nir(tmp_path / "b.nir").graph.n_inputs == 4


def test_writing_onto_a_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder: give a file name such as .*model\.nir"):
        anir.write(tmp_path, _fc_snn("MS"))
    anir.write(tmp_path / "m.nir", _fc_snn("MS"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.nir"]  # no temporary file left
