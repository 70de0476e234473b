"""benchmarks/unlayered_study.py: one short run gives a complete JSON line on the
validation split (never the test split), and --summary tabulates it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "unlayered_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("unlayered_study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variant_parsing(study):
    assert study.parse_variant("fill") == ("fill", {"fill_slots": True})
    name, ch = study.parse_variant("fill_slots=true,hidden=[8,8],loss=rate")
    assert ch == {"fill_slots": True, "hidden": [8, 8], "loss": "rate"}


def test_splits_are_disjoint_parts_of_the_training_split(study):
    train, val = study.splits(0)
    assert len(val) == study.N_VAL and len(train) + len(val) == 1347
    assert not set(train.indices) & set(val.indices)


def test_one_run_and_summary(study, tmp_path):
    row = study.run_one("fill", {"fill_slots": True, "epochs": 1, "hidden": (8,)}, "MS",
                        "queued", 0, 1, tmp_path, 1)
    assert row["changes"]["input_order"] == "random" and row["epochs"] == 1
    assert 0 <= row["val_acc"][0] <= 1 and 0 <= row["train_inference_acc"] <= 1
    assert len(row["grad_after"]["reached"]) == 1
    assert set(row["final"]) == {"own", "MS8"} == set(row["final_train"])
    assert 0 <= row["final"]["MS8"]["vote"] <= 1
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    table = study.summary([path])
    assert "| fill | queued | s0 1 ep | MS |" in table


def test_round2_keys_and_schedule(study, tmp_path):
    row = study.run_one("r2", {"epochs": 2, "hidden": (8,), "K": 4, "infer_K": 8, "T": 4,
                               "schedule": "step"}, "RS", "queued", 0, 2, tmp_path, 1)
    assert row["changes"]["infer_K"] == 8 and row["changes"]["T"] == 4
    sched = study.lr_schedule("cosine", 4)
    assert [round(sched.factor(e), 3) for e in range(5)] == [1.0, 0.854, 0.5, 0.146, 0.0]
    assert study.lr_schedule("step", 3).factor(2) == 0.1 == study.lr_schedule("step", 3).factor(3)
    assert study.lr_schedule("step", 3).factor(1) == 1.0
    with pytest.raises(ValueError, match="linear"):
        study.lr_schedule("linear", 3)
    # fit sets Adam's lr at the start of every epoch from train.scheduled_lr: the
    # schedule must act there (an lr set on Adam between epochs is overwritten)
    from asynctrain import train

    with study.lr_schedule("step", 3):
        assert train.scheduled_lr(1.0, None, 2, 3) == 0.1 and train.scheduled_lr(1.0, None, 1, 3) == 1.0
    with study.lr_schedule("warmup_cosine", 6):
        assert [round(train.scheduled_lr(2.0, None, e, 6), 3) for e in (0, 3)] == [0.667, 1.707]
    assert train.scheduled_lr(2.0, None, 0, 6) == 2.0
