"""`make demo` in its smoke-run form: trains the three models on a digits subset,
prints the table and the verdict, writes every file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.py"


def test_demo_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for row in ("| Layered | Layered |", "| Layered | Async RS |", "| Layered | Async MS |",
                "| Unlayered RS | Async RS |", "| Unlayered MS | Async MS |"):
        assert row in text
    assert "Verdict RS:" in text and "Verdict MS:" in text and "Wall time" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["shows"]) == {"RS", "MS"} and summary["seeds"] == 1
    assert summary["numbers"]["layered_RS"][0] == summary["table"][1]["accuracy"][0]
    for name in ("table.md", "results.json", "latency.png", "accuracy_vs_steps.png",
                 "currents_to_spike.png", "seed0/MS/model.pt", "seed0/RS/train.jsonl"):
        assert (tmp_path / name).is_file(), name
