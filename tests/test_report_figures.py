"""Figures and numbers of the report as a reader sees them: curves that coincide stay
visible, legends off the data, axes that span the data, layered and asynchronous
forward steps not on one axis, no std for one seed, a short SimConfig repr."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asynctrain as at
from asynctrain import report
from asynctrain.data import collate_time_major
from asynctrain.evaluate import evaluate


@pytest.fixture(scope="module")
def results():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 16, bias=False), torch.nn.Linear(16, 3, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(3.0)
    snn = at.AsyncSNN(net, at.SimConfig(theta=0.3, forward_group_size=3))
    g = torch.Generator().manual_seed(1)
    frames = (torch.rand(24, 4, 20, generator=g) < 0.3).float()
    dl = DataLoader(TensorDataset(frames, torch.arange(24) % 3), batch_size=12,
                    collate_fn=collate_time_major)
    one = evaluate(snn, dl, ["layered", "RS", "MS"], steps_after_output=[0, 1])
    # two trainings with identical curves: they must both stay visible
    return {"Layered": one, "Unlayered RS": {"RS": one["RS"]}}


@pytest.fixture
def figures(monkeypatch):
    kept = []
    save = report._save

    def keep(fig, path, layout=True):
        kept.append(fig)
        fig.canvas.draw()
        return save(fig, path, layout)

    monkeypatch.setattr(report, "_save", keep)
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *a: None)
    return kept


def test_coinciding_curves_stay_visible_and_legend_is_off_the_data(results, figures, tmp_path):
    report.plot_accuracy_vs_steps(results, tmp_path / "a.png")
    ax = figures[0].axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3
    xs = [tuple(l.get_xdata()) for l in lines]
    assert len(set(xs)) == 3  # offset sideways
    assert len({(l.get_marker(), l.get_linestyle()) for l in lines}) == 3
    legend = ax.get_legend()
    r = figures[0].canvas.get_renderer()
    assert legend.get_window_extent(r).y1 <= ax.get_window_extent(r).y0  # below the axes


def test_no_sweep_says_so(results, figures, tmp_path):
    plain = {"Layered": {k: v for k, v in results["Layered"].items()}}
    import copy

    plain = copy.deepcopy(plain)
    for r in plain["Layered"].values():
        r.accuracy_vs_steps_after_output = {}
    report.plot_accuracy_vs_steps(plain, tmp_path / "a.png")
    texts = [t.get_text() for t in figures[0].axes[0].texts]
    assert texts == ["accuracy-vs-F sweep not run (no --steps-after-output values)"]


def test_latency_keeps_layered_forward_steps_off_the_async_axis(results, figures, tmp_path):
    report.plot_latency(results, tmp_path / "l.png")
    left, right = figures[0].axes[:2]
    assert len(left.patches) == 4 and len(right.patches) == 3  # layered only on the left
    assert "Layered / Layered" in right.get_title() and "not comparable" in right.get_title()


def test_currents_axis_spans_the_data_not_the_fan_in(results, figures, tmp_path):
    report.plot_currents_to_spike(results, tmp_path / "c.png")
    axes = figures[0].axes
    h = np.asarray(results["Layered"]["RS"].currents_to_spike)
    assert axes[1].get_xlim()[1] <= np.flatnonzero(h)[-1] + 0.5
    assert axes[1].get_xlim()[1] < 20  # the fan-in is 20 / 16; async data sit lower
    lay = np.flatnonzero(results["Layered"]["layered"].currents_to_spike)
    assert set(lay) <= {16, 20} and axes[0].get_xlim()[0] > 10


def test_one_seed_has_no_std_and_passes_with_output_is_shown(results, tmp_path):
    paths = report.write_report(tmp_path, results, "t")
    rows = json.loads(paths["results"].read_text())["rows"]
    assert all(r["accuracy"][1] is None for r in rows)
    assert "Passes with output" in paths["table"].read_text()


def test_simconfig_repr_summarises_per_neuron_tensors():
    cfg = at.SimConfig(theta=torch.full((100_000,), 0.2), tau=torch.linspace(1, 2, 100_000))
    text = repr(cfg)
    assert "theta=per-neuron [100000], all 0.2" in text and "tau=per-neuron [100000] in [1, 2]" in text
    assert len(text) < 600 and "tensor(" not in text
