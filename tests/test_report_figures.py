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
    legend = figures[0].legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert "Layered / Layered (8 layer steps per sample, not comparable)" in labels  # T = 4, 2 layers
    assert "layered ones: in the legend" in right.get_title()


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


def test_latency_bins_are_aligned_to_the_integers():
    values = np.array([41, 42, 44, 47, 50, 53, 58, 61, 65, 70, 71])
    edges = report._integer_bins(values)
    assert np.all(edges % 1 == 0.5) and edges[0] < values.min() < values.max() < edges[-1]
    widths = np.diff(edges)
    assert np.all(widths == widths[0]) and widths[0] == int(widths[0])  # whole integers per bin
    assert len(edges) - 1 <= 30
    assert np.array_equal(report._integer_bins(np.array([3, 3, 4])), [2.5, 3.5, 4.5])


def _many(results, n):
    """`n` executions (copies with their own labels), as an audit of 20 rows has."""
    import dataclasses

    base = results["Layered"]["RS"]
    return {"Model": {f"RS:K={k}": dataclasses.replace(base, label=f"Async RS (K={k}, a long label)")
                      for k in range(1, n + 1)}}


@pytest.mark.parametrize("plot", ["plot_latency", "plot_accuracy_vs_steps", "plot_currents_to_spike"])
def test_twenty_executions_stay_readable(results, figures, tmp_path, plot):
    getattr(report, plot)(_many(results, 20), tmp_path / "f.png", "digits, queued input, random order")
    fig = figures[0]
    r = fig.canvas.get_renderer()
    box = fig.bbox
    axes = [a for a in fig.axes if a.get_visible() and a.axison]
    for ax in axes:
        ext = ax.get_window_extent(r)
        assert ext.height >= 1.8 * fig.dpi, "squashed axes"  # at least 1.8 inches tall
        title = ax.title.get_window_extent(r)
        if fig._suptitle is not None:
            assert fig._suptitle.get_window_extent(r).y0 >= title.y1 - 1, "titles overlap"
    legends = fig.legends + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    for legend in legends:
        ext = legend.get_window_extent(r)
        assert ext.y0 >= box.y0 - 1 and ext.x0 >= box.x0 - 1 and ext.x1 <= box.x1 + 1, "cut off"
        assert ext.y1 <= min(a.get_window_extent(r).y0 for a in axes), "legend on the data"
        assert len(legend.get_texts()) >= 20
    assert "queued input" in fig._suptitle.get_text()  # the input mode is named


def test_the_band_is_explained_in_the_legend(results, figures, tmp_path):
    two_seeds = {"Layered": [results["Layered"], results["Layered"]]}
    report.plot_accuracy_vs_steps(two_seeds, tmp_path / "a.png")
    texts = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert "shaded: ± 1 std over 2 seeds (lines: the mean)" in texts
