"""Tables and figures of the paper's results section from `evaluate` results.

    rows = table_rows({"Layered": [res_seed0, res_seed1], "Unlayered RS": [...], ...})
    print(markdown_table(rows, title="digits"))
    write_report("demo-out", {"Layered": [...], ...})   # table.md, results.json, PNGs

Input: ``{training label: one or several (one per seed) {execution name:
ExecutionResult}}`` (what `evaluate` returns, per trained model). Rows are training x
inference, as in the paper's tables 2 and 3; columns are accuracy, density, SOs,
energy (tables 2 and 3) and the decision latency in forward steps and in spikes
processed (section 4.5). With several seeds a cell reads ``mean ± std`` (sample
standard deviation over seeds).

Figures (matplotlib, PNG): latency distribution per model (paper fig. 6), accuracy vs
forward steps allowed after the first output spike (fig. 5), currents-to-spike
histograms (fig. 4, top).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .evaluate import ExecutionResult
from .outdir import saving, write_text

__all__ = ["table_rows", "markdown_table", "plot_latency", "plot_accuracy_vs_steps",
           "plot_currents_to_spike", "write_report", "COLUMNS"]

Results = Mapping[str, "Mapping[str, ExecutionResult] | Sequence[Mapping[str, ExecutionResult]]"]

# (key of a row, header, format of the mean)
COLUMNS = (("accuracy", "Acc.", "{:.3f}"), ("density", "Density", "{:.3f}"),
           ("synops", "SOs", "{:,.0f}"), ("energy", "Energy", "auto"),
           ("latency_steps", "Latency (fwd steps)", "{:.1f}"),
           ("latency_spikes", "Latency (spikes)", "{:,.0f}"),
           ("passes_with_output", "Passes with output", "{:.2f}"))


def _per_seed(results: Results) -> dict[str, list[Mapping[str, ExecutionResult]]]:
    if not results:
        raise ValueError("no results to report: give {training label: {execution: "
                         "ExecutionResult}} (what evaluate returns, per trained model)")
    out = {}
    for train, res in results.items():
        out[train] = [res] if isinstance(res, Mapping) else list(res)
        if not out[train] or not all(out[train]):
            raise ValueError(f"no results for {train!r}")
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; the std of one seed is undefined: None
    (null in results.json), never 0."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def table_rows(results: Results) -> list[dict[str, Any]]:
    """One row per (training, execution), in the given order; every metric of
    `COLUMNS` as ``(mean, std)`` over seeds, plus ``seeds`` and ``energy_unit``."""
    rows = []
    for train, seeds in _per_seed(results).items():
        for name in seeds[0]:
            per = [s[name] for s in seeds if name in s]
            row: dict[str, Any] = dict(train=train, infer=per[0].label, execution=name,
                                       seeds=len(per), energy_unit=per[0].energy_unit)
            for key, _, _ in COLUMNS:
                row[key] = _mean_std([getattr(r, key) for r in per])
            row["capped_passes"] = sum(r.capped_passes for r in per)
            row["passes_with_output"] = _mean_std([r.passes_with_output for r in per])
            rows.append(row)
    return rows


def _cell(value: tuple[float, float], fmt: str, seeds: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "n/a"
    if fmt == "auto":  # energy: any unit, so any magnitude
        fmt = "{:,.0f}" if abs(mean) >= 1000 else "{:.4g}"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if seeds > 1 and std is not None else "")


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """The paper's tables 2 and 3 side by side for one data set (Markdown)."""
    unit = rows[0]["energy_unit"] if rows else ""
    heads = ["Training", "Inference"] + [h if k != "energy" else f"{h} [{unit}]"
                                         for k, h, _ in COLUMNS]
    lines = []
    if title:
        seeds = {r["seeds"] for r in rows}
        note = f" (mean ± std over {seeds.pop()} seeds)" if len(seeds) == 1 and max(
            r["seeds"] for r in rows) > 1 else ""
        lines += [f"**{title}**{note}", ""]
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * len(COLUMNS)) + "|")
    for r in rows:
        cells = [r["train"], r["infer"]] + [_cell(r[k], fmt, r["seeds"]) for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _row_label(train: str, res: ExecutionResult) -> str:
    return f"{train} / {res.label}"


def _integer_bins(values: np.ndarray, most: int = 30) -> np.ndarray:
    """Histogram edges for integer data: every bin spans the same number of integers,
    edges halfway between them (equal-width float bins over integers leave some bins
    that no value can reach, gaps that look like data)."""
    lo, hi = int(np.floor(values.min())), int(np.ceil(values.max()))
    width = max(1, math.ceil((hi - lo + 1) / most))
    return lo - 0.5 + width * np.arange(math.ceil((hi - lo + 1) / width) + 1)


def _legend_below(fig: Any, handles: list, labels: list, axes_height: float, cols: int,
                  title: str | None, ax: Any = None) -> None:
    """Grow `fig` so that its axes keep `axes_height` inches and the legend gets rows of
    its own below them (readable with 20 curves: no squashed axes, nothing cut off);
    the legend belongs to `ax` if given, else to the figure."""
    rows = math.ceil(len(labels) / cols)
    legend_h, axis_h = 0.18 * rows + 0.15, 0.7
    title_h = 0.35 + 0.22 * (title.count("\n") + 1) if title else 0.3
    height = axes_height + legend_h + title_h + axis_h
    fig.set_size_inches(fig.get_size_inches()[0], height)
    fig.subplots_adjust(bottom=(legend_h + axis_h) / height, top=1 - title_h / height)
    (fig if ax is None else ax).legend(handles, labels, loc="lower center", ncol=cols, fontsize=8,
                                       frameon=False, bbox_to_anchor=(0.5, 0.0),
                                       bbox_transform=fig.transFigure)
    if title:
        fig.suptitle(title, fontsize=10)


def plot_latency(results: Results, path: str | os.PathLike, title: str | None = None) -> Path:
    """Distribution over samples of the latency until the decision, in spikes
    processed (left; the paper's figure 6; every execution) and in forward steps
    (right; asynchronous executions only: a layered forward step integrates a whole
    layer, so its count is not comparable and is written in the panel instead); one
    curve per (training, execution), samples of all seeds pooled. Bins are aligned to
    the integers. `title`: the run (data set, input mode)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    curves, layered_steps = {}, {}
    for train, seeds in _per_seed(results).items():
        for name in seeds[0]:
            label = _row_label(train, seeds[0][name])
            curves[label] = {key: np.concatenate([np.asarray(s[name].per_sample[key], float)
                                                  for s in seeds if name in s])
                             for key in ("latency_spikes", "latency_steps")}
            curves[label]["layered"] = name == "layered"
    for ax, key in zip(axes, ("latency_spikes", "latency_steps")):
        shown = {k: c for k, c in curves.items() if key == "latency_spikes" or not c["layered"]}
        if key == "latency_steps":
            layered_steps = {k: float(c[key].mean()) for k, c in curves.items() if c["layered"]}
        if not shown:
            ax.text(0.5, 0.5, "no asynchronous execution evaluated", ha="center",
                    transform=ax.transAxes)
            continue
        bins = _integer_bins(np.concatenate([c[key] for c in shown.values()]))  # shared: comparable
        for label, c in shown.items():
            i = list(curves).index(label)  # one colour and style per curve in both panels
            ax.hist(c[key], bins=bins, histtype="step", linewidth=1.6, label=label,
                    color=f"C{i % 10}", linestyle=_STYLES[(i // 10) % len(_STYLES)],
                    weights=np.full(len(c[key]), 1.0 / len(c[key])))
        ax.set_ylabel("fraction of samples")
    axes[0].set_xlabel("spikes processed until the decision (per sample)")
    axes[1].set_xlabel("forward steps until the decision (per sample)")
    axes[0].set_title("all executions", fontsize=9)
    axes[1].set_title("asynchronous executions" + (" (layered ones: in the legend)"
                                                   if layered_steps else ""), fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    # a layered forward step delivers a whole layer: its count is said, not plotted
    labels = [f"{k} ({layered_steps[k]:.0f} layer steps per sample, not comparable)"
              if k in layered_steps else k for k in labels]
    _legend_below(fig, handles, labels, 3.6, 2 if len(labels) > 6 else 3,
                  "Inference latency" + (f": {title}" if title else ""))
    return _save(fig, path, layout=False)


_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_accuracy_vs_steps(results: Results, path: str | os.PathLike, title: str | None = None) -> Path:
    """Accuracy as a function of the forward steps F allowed after a pass's first
    output spike (the paper's figure 5); "drain" = run until nothing is pending.
    Asynchronous executions only; mean over seeds, the band ± one standard deviation
    over seeds (said in the legend). Curves that coincide are told apart by marker and
    line style and a small sideways offset; the legend sits below the axes, off the
    data. `title`: the run (data set, input mode)."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    keys: list[str] = []
    n_async = 0
    series = []
    for train, seeds in _per_seed(results).items():
        for name in seeds[0]:
            n_async += name != "layered"
            curve = seeds[0][name].accuracy_vs_steps_after_output
            if curve:
                series.append((train, name, seeds, list(curve)))
    banded = 0
    for i, (train, name, seeds, k) in enumerate(series):
        keys = k
        acc = np.array([[s[name].accuracy_vs_steps_after_output[q] for q in keys]
                        for s in seeds if name in s])
        offset = (i - (len(series) - 1) / 2) * min(0.06, 0.3 / max(len(series), 1))
        x = np.arange(len(keys)) + offset
        mean = acc.mean(0)
        ax.plot(x, mean, marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)],
                markersize=6, markerfacecolor="none", color=f"C{i % 10}",
                label=_row_label(train, seeds[0][name]))
        if len(acc) > 1:
            std = acc.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=f"C{i % 10}")
            banded = max(banded, len(acc))
    ax.set_xlabel("forward steps allowed after the first output spike (F)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    heading = "Accuracy vs forward steps after the first output" + (f"\n{title}" if title else "")
    if not keys:
        ax.text(0.5, 0.5, "accuracy-vs-F sweep not run (no --steps-after-output values)"
                if n_async else "no asynchronous execution evaluated", ha="center",
                transform=ax.transAxes)
        fig.suptitle(heading, fontsize=10)
        return _save(fig, path)
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels(keys)
    handles, labels = ax.get_legend_handles_labels()
    if banded:
        handles.append(Patch(color="0.5", alpha=0.3))
        labels.append(f"shaded: ± 1 std over {banded} seeds (lines: the mean)")
    _legend_below(fig, handles, labels, 3.8, 2, heading, ax)
    return _save(fig, path, layout=False)


def plot_currents_to_spike(results: Results, path: str | os.PathLike, title: str | None = None) -> Path:
    """Fraction of spikes emitted after integrating n currents in the pass (the
    paper's figure 4, top); one panel per (training, execution), seeds summed; one
    bar per integer n. Panel titles are wrapped, so 20 panels stay readable."""
    import textwrap

    plt = _pyplot()
    panels = [(train, name, seeds) for train, seeds in _per_seed(results).items()
              for name in seeds[0]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows + (0.5 if title else 0)),
                             squeeze=False)
    for ax, (train, name, seeds) in zip(axes.flat, panels):
        hists = [np.asarray(s[name].currents_to_spike, dtype=float) for s in seeds if name in s]
        n = max(len(h) for h in hists)
        h = sum(np.pad(x, (0, n - len(x))) for x in hists)
        total = h.sum()
        if total > 0:
            ax.bar(np.arange(n), h / total, width=1.0)
            mean = float((np.arange(n) * h).sum() / total)
            ax.axvline(mean, color="k", linestyle="--", linewidth=1)
            lo, hi, beyond = _x_range(h)
            ax.set_xlim(lo - 0.5, hi + 0.5)
            note = f"mean {mean:.1f}" + (f"\n{100 * beyond:.1f}% of spikes beyond {hi}"
                                         if beyond > 0 else "")
            ax.text(0.97, 0.85, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no spikes", ha="center", transform=ax.transAxes)
        ax.set_title("\n".join(textwrap.wrap(_row_label(train, seeds[0][name]), 44)), fontsize=8)
        ax.set_xlabel("currents integrated before the spike", fontsize=8)
        ax.set_ylabel("fraction of spikes", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    height = fig.get_size_inches()[1]
    if title:
        fig.suptitle(f"Currents integrated before a spike: {title}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.5 / height if title else 0)))
    return _save(fig, path, layout=False)


def _x_range(h: np.ndarray, keep: float = 0.995) -> tuple[int, int, float]:
    """x range of a histogram that holds `keep` of its mass: (first bin, last bin,
    fraction beyond the last). The axis spans the data, not the fan-in: a layered
    panel sits at n = fan-in, an asynchronous one below ten."""
    nz = np.flatnonzero(h)
    c = np.cumsum(h) / h.sum()
    hi = int(min(np.searchsorted(c, keep), nz[-1]))
    lo = int(nz[0])
    lo = 0 if lo <= max(10, hi - lo) else lo  # start at 0 unless the data sit far from it
    return lo, max(hi, lo + 1), float(1.0 - c[hi])


def _save(fig: Any, path: str | os.PathLike, layout: bool = True) -> Path:
    path = Path(path)
    if layout:
        fig.tight_layout()
    import matplotlib.pyplot as plt

    try:
        with saving(path, "figure") as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------- files
def write_report(out_dir: str | os.PathLike, results: Results, title: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``table.md``, ``results.json`` (every number, per-sample ones included,
    plus `extra`) and the three figures under `out_dir`; returns their paths."""
    out = Path(out_dir)
    rows = table_rows(results)
    paths = {"table": out / "table.md", "results": out / "results.json"}
    write_text(paths["table"], markdown_table(rows, title), "table")
    payload = dict(title=title, rows=rows, extra=dict(extra or {}),
                   results={train: [{k: r.to_dict() for k, r in s.items()} for s in seeds]
                            for train, seeds in _per_seed(results).items()})
    write_text(paths["results"], json.dumps(payload, indent=1, default=_json_default), "results")
    paths["latency"] = plot_latency(results, out / "latency.png", title)
    paths["accuracy_vs_steps"] = plot_accuracy_vs_steps(results, out / "accuracy_vs_steps.png", title)
    paths["currents_to_spike"] = plot_currents_to_spike(results, out / "currents_to_spike.png", title)
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
