"""`make demo` in its smoke-run form: trains the three models on a digits subset (the
layered one once, the unlayered ones per input mode), prints both tables and the
verdicts, writes every file."""

from __future__ import annotations

import json

from fixtures import load_recipe


def test_demo_quick(tmp_path, capsys):
    demo = load_recipe("demo", "demo")
    assert demo.main(["--quick", "--out", str(tmp_path.parent / tmp_path.name), "--no-progress"]) == 0
    tmp_path = tmp_path / "quick"  # --quick writes to its own folder
    text = capsys.readouterr().out
    for row in ("| Layered | Layered |", "| Layered | Async RS |", "| Layered | Async MS |",
                "| Unlayered RS | Async RS |", "| Unlayered MS | Async MS |"):
        assert text.count(row) == 2, row  # one table per input mode
    for mode in demo.MODES.values():
        assert f"[{mode}]" in text
    assert text.count("Verdict RS:") == 2 and "Training accuracy" in text and "Wall time" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["modes"]) == {"frame", "queued"} and summary["seeds"] == 1
    for mode, m in summary["modes"].items():
        assert set(m["shows"]) == {"RS", "MS"}
        assert m["numbers"]["layered_RS"][0] == m["table"][1]["accuracy"][0]
        assert 0 <= m["numbers"]["train_accuracy_MS"][0] <= 1
        assert m["hyper"]["MS"]["prioritize_input"] == (mode == "frame")
        for name in ("table.md", "results.json", "latency.png", "accuracy_vs_steps.png",
                     "currents_to_spike.png", "seed0/MS/model.pt", "seed0/RS/train.jsonl"):
            assert (tmp_path / mode / name).is_file(), name
        assert not (tmp_path / mode / "seed0" / "layered").exists()
    # the layered model is trained once and evaluated in both modes
    log = (tmp_path / "layered" / "seed0" / "layered" / "train.jsonl").read_text()
    assert log.count('"event": "start"') == 1 and log.count('"event": "epoch"') == 1
    frame, queued = (summary["modes"][m]["table"][0] for m in ("frame", "queued"))
    assert frame["infer"] == queued["infer"] == "Layered" and frame["accuracy"] == queued["accuracy"]
