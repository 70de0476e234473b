"""benchmarks/task_study.py: one short run per kind gives a complete JSON line on a
validation split, the held-out task is refused without --held-out, and --summary
tabulates the lines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "task_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("task_study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMALL = {"epochs": 1, "hidden": [8], "batch_size": 200}


def test_hyper_of_a_run(study):
    from asynctrain import tasks

    h, engine, opts = study.make_hyper(tasks.get("order"), "MS", "frame",
                                       {"calib": 0.1, "detach_reset": True, "lr": 1e-3})
    assert (h.tau, h.dt, h.hidden, h.K, h.lr, h.fill_slots) == (30.0, 10.0, (64, 64, 64), 8, 1e-3, True)
    assert h.prioritize_input and engine == {"detach_reset": True} and opts == {"calib": 0.1}
    h, _, _ = study.make_hyper(tasks.get("order"), "MS", "queued", {"base": "hyper"})
    assert h.lr == study.Hyper().lr and not h.prioritize_input
    with pytest.raises(ValueError, match=r"unknown variant key\(s\) \['lr_typo'\]"):
        study.make_hyper(tasks.get("order"), "MS", "queued", {"lr_typo": 1})


def test_runs_and_summary(study, tmp_path):
    rows = [study.run_one("order", "small", dict(SMALL, calib=0.1, gradnorm=True,
                                                 schedule="warmup"), p, "queued", 0)
            for p in ("layered", "RS")]
    lay, rs = rows
    assert set(lay["final"]) == {"layered", "RS", "MS"} and list(rs["final"]) == ["RS", "MS"]
    assert set(lay["final_train"]) == {"layered"} and set(rs["final_train"]) == {"RS"}
    assert rs["split"] == "val" and len(rs["val_acc"]) == 1 and len(rs["calib_scales"]) == 2
    assert rs["init"]["layer_rates"][0] == pytest.approx(0.1, abs=0.02)
    assert len(rs["init"]["grad"]["reached"]) == 1 and 0 <= rs["init"]["passes_with_output"] <= 1
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = study.summary([path])
    assert "| order | queued | small | RS | 1 |" in table and "| order | queued | small | layered | 1 |" in table
    assert "| order | queued | RS |" in study.diagnostics([path], "small")
    assert "| small | " in study.screen([path], reference="small")
    warm = study.run_one("order", "warm", dict(SMALL, warm=True, lr=1e-12), "RS", "queued", 0)
    task = study.tasks.get("order")  # lr ~0: the layered start model itself, run with RS
    h, _, _ = study.make_hyper(task, "RS", "queued", SMALL)
    start = study.build_snn(task.n_inputs, task.n_classes, h, "RS", 0)
    start.net.load_state_dict(study.layered_start("order", "queued", 0, (8,)))
    assert warm["final"]["RS"] == study.evaluate_row(start, study._loader(task.split("val"), 300),
                                                     "RS", 8, own_only=True)["RS"]
    with pytest.raises(ValueError, match="held out"):
        study.run_one("manifold", "small", SMALL, "RS", "queued", 0)
