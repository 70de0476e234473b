"""`evaluate` runs inference, whoever calls it: no training-only setting (dropouts,
noise, fillers, gradient-fill barrier messages) reaches it; executions are parsed
strictly; the progress bar counts batches of every pass over the data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asynctrain as at
from asynctrain.data import collate_time_major
from asynctrain.evaluate import Execution, evaluate, inference_config


def _loader(n=16, T=3, n_in=8):
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(n, T, n_in, generator=g) < 0.4).float()
    return DataLoader(TensorDataset(frames, torch.arange(n) % 2), batch_size=8,
                      collate_fn=collate_time_major)


def _snn(**cfg):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(12, 2, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(2.0)
    return at.AsyncSNN(net, at.SimConfig(forward_group_size=2, theta=0.3, **cfg))


def _numbers(res):
    return {k: (r.accuracy, r.synops, r.latency_steps, r.density) for k, r in res.items()}


def test_gradient_fill_and_regularisers_do_not_reach_evaluate():
    trained = dict(barrier_messages=True, input_dropout=0.5, network_dropout=0.5,
                   refractory_dropout=0.5, momentum_noise=0.3)
    if "fill_slots" in {f.name for f in dataclasses.fields(at.SimConfig)}:
        trained["fill_slots"] = True
    execs = ["RS", "MS", "layered"]
    plain = evaluate(_snn(), _loader(), execs, steps_after_output=[0])
    snn = _snn(**trained)
    got = evaluate(snn, _loader(), execs, steps_after_output=[0])
    assert _numbers(got) == _numbers(plain)
    assert snn.cfg.barrier_messages and snn.cfg.input_dropout == 0.5  # restored afterwards
    # barrier messages under the barrier preset (sync threshold = fan-in) are execution,
    # not training: they stay
    cfg = at.SimConfig.preset("barrier", snn.net)
    assert inference_config(cfg).barrier_messages


@pytest.mark.parametrize("spec, needle", [
    ("MS:K=4:K=8", "K and K both set forward_group_size"),
    ("RS:drain:stop=output", "both set stop"),
    ("MS:K=0", "K must be an integer >= 1"),
    ("MS:K=four", "K must be an integer >= 1, got 'four'"),
    ("MS:F=-1", "F must be an integer >= 0"),
    ("RS:stop=never", "stop must be output or spiking_done"),
    ("RS:carry_pending=maybe", "must be true or false"),
    ("layered:K=4", "layered execution takes no settings"),
])
def test_execution_strings_are_parsed_strictly(spec, needle):
    with pytest.raises(ValueError, match=needle):
        Execution.parse(spec)


def test_progress_bar_counts_batches_of_every_pass(capsys):
    evaluate(_snn(), _loader(), ["layered", "RS"], steps_after_output=[0, 1], progress=True)
    err = capsys.readouterr().err
    # layered: 1 pass; RS: main + F=0 + F=1 + drain = 4 passes; 2 batches each
    assert "10/10" in err and "5 passes over the data" in err


def test_silent_network_is_warned_about():
    snn = _snn()
    with torch.no_grad():
        snn.net[1].weight.zero_()
    with pytest.warns(RuntimeWarning, match=r"no output spike in 100% of passes"):
        evaluate(snn, _loader(), ["RS"], steps_after_output=None)


def test_evaluate_refuses_batch_first_loaders_and_labels_beyond_the_outputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 3, bias=False))
    snn = at.AsyncSNN(net, at.SimConfig(forward_group_size=2))
    frames = (torch.rand(8, 8, 6) < 0.5).float()  # [B = T = 8, T, F]: the shape alone cannot tell
    labels = torch.arange(8) % 3
    with pytest.raises(ValueError, match=r"default collate"):  # B == T: the loader tells
        evaluate(snn, DataLoader(TensorDataset(frames, labels), batch_size=8), ["RS"])
    with pytest.raises(ValueError, match=r"batch 1: frames \(8, 5, 6\) look batch-first"):
        evaluate(snn, [(frames[:, :5], labels)], ["RS"])
    with pytest.raises(ValueError, match=r"batch 1: label 5 is outside 0\.\.2 \(the model has 3 outputs"):
        evaluate(snn, [(frames.transpose(0, 1), labels.clamp(max=2).index_fill(0, torch.tensor([3]), 5))],
                 ["RS"])
    with pytest.raises(ValueError, match=r"got a tuple of 3 items"):
        evaluate(snn, [(frames.transpose(0, 1), labels, labels)], ["RS"])
