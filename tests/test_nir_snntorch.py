"""snnTorch's NIR exporter and importer against ours: spikes compared exactly, both
directions; snnTorch models we cannot run exactly are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")
snn_lib = pytest.importorskip("snntorch")

from asynctrain import AsyncSNN, SimConfig  # noqa: E402
from asynctrain import nir as anir  # noqa: E402

torch.set_num_threads(1)


def _snntorch_net(reset="zero", reset_delay=True, seed=0):
    torch.manual_seed(seed)
    Leaky = snn_lib.Leaky
    net = nn.Sequential(
        nn.Linear(40, 30, bias=False),
        Leaky(beta=0.8, threshold=0.5, init_hidden=True, reset_mechanism=reset,
              reset_delay=reset_delay),
        nn.Linear(30, 20, bias=False),
        Leaky(beta=torch.rand(20) * 0.9 + 0.05, threshold=torch.rand(20) * 0.5 + 0.3,
              init_hidden=True, reset_mechanism=reset, reset_delay=reset_delay),
        nn.Linear(20, 10, bias=False),
        Leaky(beta=0.95, threshold=0.4, init_hidden=True, output=True, reset_mechanism=reset,
              reset_delay=reset_delay))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return net


def _snntorch_counts(net, frames):
    for m in net:
        if isinstance(m, snn_lib.Leaky):
            m.reset_mem()
    out = []
    with torch.no_grad():
        for t in range(frames.shape[0]):
            spk, _ = net(frames[t])
            out.append(spk)
    return torch.stack(out)


@pytest.mark.parametrize("reset_delay", [True, False])
def test_snntorch_export_reproduced_exactly(reset_delay):
    net = _snntorch_net(reset_delay=reset_delay)
    frames = (torch.rand(20, 64, 40, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    ours, graph = anir.from_snntorch(net, frames[0, :1], SimConfig(policy="layered"),
                                     backend="torch")
    ref = _snntorch_counts(net, frames)
    assert ref.sum() > 100 and (ref.sum(0) > 0).float().mean() > 0.3
    with torch.no_grad():
        got = ours(frames)
    assert torch.equal(got, ref)  # every spike of every pass, not only the totals
    # the convention: per-neuron tau = -dt / ln(beta), beta = 1 - dt / tau_nir
    lif = graph.nodes["1"]
    beta = 1 - 1e-4 / np.asarray(lif.tau, dtype=np.float64)
    np.testing.assert_allclose(ours.cfg.tau[:30].numpy(), -0.1 / np.log(beta), rtol=1e-12)
    assert torch.equal(torch.exp(-0.1 / ours.cfg.tau[:30]).float(), torch.full((30,), 0.8))
    assert ours.cfg.dt == anir.SNNTORCH_DT_MS
    # the other reading, decay exp(-dt / tau_nir), is a different model
    tau_nir = np.concatenate([np.asarray(n.tau, dtype=np.float64).reshape(-1)
                              for n in graph.nodes.values() if isinstance(n, nir.LIF)])
    alt = AsyncSNN(ours.net, ours.cfg.replace(tau=torch.from_numpy(tau_nir * 1000.0)),
                   backend="torch")
    with torch.no_grad():
        differ = (alt(frames).sum(0) != ref.sum(0)).double().mean().item()
    assert differ > 0.2  # 0.40 on this network (the figure in asynctrain/nir.py)


def test_snntorch_graph_without_our_wrapper_needs_dt():
    from snntorch.export_nir import export_to_nir

    net = _snntorch_net()
    width = None
    for m in net:  # snnTorch 1.0's exporter types its graph only with per-neuron values
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif m.beta.numel() == 1:
            m.beta = torch.full((width,), float(m.beta))
            m.threshold = torch.full((width,), float(m.threshold))
    frames = (torch.rand(10, 16, 40, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    graph = export_to_nir(net, frames[0, :1], ignore_dims=[0])
    with pytest.raises(ValueError, match="pass cfg=SimConfig"):
        anir.from_nir(graph)
    ours = anir.from_nir(graph, SimConfig(dt=anir.SNNTORCH_DT_MS, policy="layered"), backend="torch")
    with torch.no_grad():
        assert torch.equal(ours(frames), _snntorch_counts(net, frames))


@pytest.mark.parametrize("reset", ["subtract", "none"])
def test_snntorch_other_resets_refused(reset):
    net = _snntorch_net(reset=reset)
    with pytest.raises(ValueError, match=r"layer '1' \(Leaky\): reset_mechanism = '" + reset):
        anir.from_snntorch(net, torch.zeros(1, 40))


@pytest.mark.parametrize("neuron", ["Synaptic", "RLeaky", "DeltaLeaky"])
def test_snntorch_other_neurons_refused(neuron):
    make = {"Synaptic": lambda: snn_lib.Synaptic(alpha=0.5, beta=0.5, init_hidden=True, output=True),
            "RLeaky": lambda: snn_lib.RLeaky(beta=0.5, linear_features=3, init_hidden=True,
                                             output=True, reset_mechanism="zero"),
            "DeltaLeaky": lambda: snn_lib.DeltaLeaky(beta=0.5, init_hidden=True, output=True,
                                                     reset_mechanism="zero")}
    net = nn.Sequential(nn.Linear(4, 3, bias=False), make[neuron]())
    with pytest.raises(ValueError, match=rf"layer '1' \({neuron}\): only snn.Leaky"):
        anir.from_snntorch(net, torch.zeros(1, 4))


def test_snntorch_bias_refused():
    net = _snntorch_net()
    net[2] = nn.Linear(30, 20, bias=True)
    with pytest.raises(ValueError, match=r"node '2' \(Affine\): bias must be 0"):
        anir.from_snntorch(net, torch.zeros(1, 40))


def test_snntorch_conv_reproduced_exactly():
    """Conv2d -> Leaky -> AvgPool2d -> Flatten -> Linear -> Leaky, scalar beta and
    threshold (expanded to the layer shapes before snnTorch's exporter runs)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False),
                        snn_lib.Leaky(beta=0.7, threshold=0.3, init_hidden=True,
                                      reset_mechanism="zero"),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 4, bias=False),
                        snn_lib.Leaky(beta=0.8, threshold=0.3, init_hidden=True, output=True,
                                      reset_mechanism="zero"))
    with torch.no_grad():
        net[0].weight.mul_(2).add_(0.1)
        net[4].weight.mul_(3).add_(0.2)
    frames = (torch.rand(10, 32, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    ours, graph = anir.from_snntorch(net, frames[0, :1], SimConfig(policy="layered"),
                                     backend="torch")
    assert graph.nodes["1"].tau.shape == (2, 8, 8)
    assert ours.graph.input_shape == (1, 8, 8)
    ref = _snntorch_counts(net, frames)
    assert ref.sum() > 100
    with torch.no_grad():
        assert torch.equal(ours(frames), ref)
    # the user's module is untouched: its scalar beta stays scalar
    assert net[1].beta.numel() == 1


def test_our_export_read_by_snntorch_importer_exactly():
    """The other direction: snnTorch's own importer runs our graph with our spikes
    (its importer fixes dt = 0.1 ms and wants one threshold per layer)."""
    import warnings

    from snntorch.import_nir import import_from_nir

    g = torch.Generator().manual_seed(0)
    sizes = [40, 30, 20, 10]
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for m in net:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 0.1)
    tau = torch.rand(60, generator=g, dtype=torch.float64) * 2 + 0.05  # ms, per neuron
    ours = AsyncSNN(net, SimConfig(policy="layered", dt=anir.SNNTORCH_DT_MS, tau=tau, theta=0.4),
                    backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = import_from_nir(anir.to_nir(ours))
    frames = (torch.rand(20, 64, 40, generator=g) < 0.3).float()
    with torch.no_grad():
        mine = ours(frames)
        for m in theirs.modules():
            if isinstance(m, snn_lib.Leaky):
                m.reset_mem()
        ref = torch.stack([theirs(frames[t])[0] for t in range(frames.shape[0])])
    assert mine.sum() > 100
    assert torch.equal(mine, ref)


def test_snntorch_leading_flatten_keeps_the_image_shape():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6, bias=False),
                        snn_lib.Leaky(beta=0.6, threshold=0.3, init_hidden=True,
                                      reset_mechanism="zero"),
                        nn.Linear(6, 3, bias=False),
                        snn_lib.Leaky(beta=0.6, threshold=0.3, init_hidden=True, output=True,
                                      reset_mechanism="zero"))
    with torch.no_grad():
        for m in (net[1], net[3]):
            m.weight.add_(0.3)
    frames = (torch.rand(6, 16, 1, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    ours, graph = anir.from_snntorch(net, frames[0, :1], SimConfig(policy="layered"),
                                     backend="torch")
    assert ours.graph.input_shape == (1, 4, 4) and isinstance(graph.nodes["0"], nir.Flatten)
    ref = _snntorch_counts(net, frames)
    assert ref.sum() > 10
    with torch.no_grad():
        assert torch.equal(ours(frames), ref)
