"""The recipes' command line validates everything before loading data: each bad
input below used to end in a traceback after loading (or training); now argparse (or
the checks right after it) names the option and the value. Also: --help shows every
default, --quick has its own folder, --eval-only rebuilds the model from the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asynctrain.checkpoint import save_model
from fixtures import load_recipe
from test_recipes import _nmnist



def _recipe(name: str):
    return load_recipe(name, f"cli_{name}")


@pytest.fixture
def no_data(monkeypatch):
    """Recipes whose data loading fails the test: checks must come first."""
    mods = {}
    for name in ("nmnist", "shd", "dvs_gesture"):
        mod = _recipe(name)
        monkeypatch.setattr(mod.SPEC, "load", lambda *a: pytest.fail("data loaded before the check"))
        mods[name] = mod
    return mods


BAD = [
    ("nmnist", ["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    ("nmnist", ["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
    ("nmnist", ["--duration-ms", "0"], "--duration-ms: expected a number > 0"),
    ("nmnist", ["--duration-ms", "15"], "--duration-ms: duration_ms=15.0 is not a whole number"),
    ("nmnist", ["--min-files", "0"], "--min-files: expected an integer > 0, got '0'"),
    ("nmnist", ["--max-train", "0"], "--max-train: expected an integer > 0"),
    ("nmnist", ["--max-test", "-3"], "--max-test: expected an integer > 0"),
    ("nmnist", ["--device", "foo"], "--device: expected auto, cpu, cuda or cuda:N, got 'foo'"),
    ("nmnist", ["--workers", "-1"], "--workers: expected an integer >= 0, got '-1'"),
    ("nmnist", ["--threads", "-2"], "--threads: expected an integer in [1,"),
    ("nmnist", ["--epochs", "0"], "--epochs: expected an integer > 0, got '0'"),
    ("nmnist", ["--batch-size", "0"], "--batch-size: expected an integer > 0"),
    ("nmnist", ["--K", "0"], "--K: expected an integer > 0"),
    ("nmnist", ["--seed", "-1"], "--seed: expected an integer >= 0"),
    ("shd", ["--steps-after-output", "-1"], "--steps-after-output: expected an integer >= 0"),
    ("shd", ["--energy-per-so", "-1"], "--energy-per-so: expected a number >= 0"),
    ("shd", ["--eval", "paper", "RS:K=4"], "'paper' stands for table 2's rows and cannot be combined"),
    ("shd", ["--eval", "MS:K=4:K=8"], "K and K both set forward_group_size"),
    ("shd", ["--eval", "MS:Q=1"], "unknown setting 'Q'"),
    ("dvs_gesture", ["--min-files", "x"], "--min-files: expected an integer > 0, got 'x'"),
    ("dvs_gesture", ["--eval-only", "nope.pt"], "--eval-only: no checkpoint file at nope.pt"),
]


@pytest.mark.parametrize("name, argv, needle", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_arguments_fail_before_data(no_data, capsys, name, argv, needle):
    with pytest.raises(SystemExit) as ex:
        no_data[name].main(argv)
    assert ex.value.code == 2
    assert needle in capsys.readouterr().err


def test_out_under_a_file_fails_before_data(no_data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        no_data["shd"].main(["--out", str(tmp_path / "f" / "run")])
    assert "is a file, so no folder can be made there" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nmnist", "shd", "dvs_gesture"])
def test_help_shows_defaults_and_units(name, capsys):
    with pytest.raises(SystemExit):
        _recipe(name).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("Adam learning rate (default:", "in ms", "(default: 0.26)", "no progress bars",
                  "docs/semantics.md", "Exit status"):
        assert piece in text, piece
    assert text.count("0.26") == 1  # the energy default once, not twice
    assert "SPEC.md" not in text.replace("docs/semantics.md", "")


def _args(tmp_path):
    return ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--train",
            "layered", "--no-progress", "--steps-after-output", *_nmnist(tmp_path / "data")]


def test_quick_and_full_runs_do_not_share_checkpoints(tmp_path, capsys):
    mod = _recipe("nmnist")
    assert mod.main(_args(tmp_path) + ["--quick"]) == 0
    assert (tmp_path / "out" / "quick" / "layered" / "model.pt").is_file()
    assert not (tmp_path / "out" / "layered").exists()
    # a changed data subset is named, with --fresh
    assert mod.main(_args(tmp_path) + ["--quick", "--max-train", "5"]) == 2
    err = capsys.readouterr().err
    assert "--max-train 5 (the checkpoint has 64)" in err and "--fresh" in err
    # a changed training setting is named by fit, with --fresh
    assert mod.main(_args(tmp_path) + ["--quick", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 (the checkpoint has 0.0005)" in err and "--fresh" in err
    # not given: taken from the checkpoint, and said so
    assert mod.main(_args(tmp_path) + ["--K", "4"]) == 0  # a full run in <out>
    capsys.readouterr()
    assert mod.main(_args(tmp_path)) == 0
    assert "with its settings: --K 4" in capsys.readouterr().out
    # a garbage checkpoint where a run would resume: named, with --fresh
    (tmp_path / "out" / "layered" / "model.pt").write_bytes(b"junk")
    assert mod.main(_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "out/layered/model.pt: not a readable torch file" in err and "--fresh" in err


def test_eval_only_rebuilds_the_model_from_the_checkpoint(tmp_path, capsys):
    mod = _recipe("nmnist")
    assert mod.main(_args(tmp_path) + ["--quick"]) == 0
    ck = tmp_path / "out" / "quick" / "layered" / "model.pt"
    capsys.readouterr()
    base = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "ev"), "--no-progress",
            "--min-files", "6", "--max-test", "6", "--steps-after-output"]
    assert mod.main(base + ["--eval-only", str(ck), "--eval", "layered", "RS:K=2"]) == 0
    out = capsys.readouterr().out
    assert "| Layered (" in out and "| Async RS (K=2) |" in out
    assert (tmp_path / "ev" / "eval" / "table.md").is_file()
    # a flag that contradicts the stored model: both values named
    assert mod.main(base + ["--eval-only", str(ck), "--K", "3"]) == 2
    assert "--K 3 (the checkpoint has 8)" in capsys.readouterr().err
    # unusable files: named, exit 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert mod.main(base + ["--eval-only", str(bad)]) == 2
    assert f"checkpoint {bad}: not a readable torch file" in capsys.readouterr().err
    # a model of another data set
    torch.manual_seed(0)
    import asynctrain as at
    from asynctrain.models import mlp

    save_model(tmp_path / "shd.pt", at.AsyncSNN(mlp("shd")))
    assert mod.main(base + ["--eval-only", str(tmp_path / "shd.pt")]) == 2
    assert "N-MNIST needs 2312 inputs and 10 outputs" in capsys.readouterr().err


# ----------------------------------------------------- one run per folder, no raw failure
def _lock(folder: Path, pid: int) -> Path:
    import json
    import socket

    from asynctrain.outdir import LOCK_NAME

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(dict(pid=pid, host=socket.gethostname(),
                                                   started="2026-01-01 00:00:00",
                                                   command="shd.py --quick --K 8")))
    return folder / LOCK_NAME


def test_quick_keeps_the_options_given(tmp_path, capsys):
    assert _recipe("nmnist").main(_args(tmp_path) + ["--quick", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "--quick: --max-train 64, --max-test 64, --batch-size 16" in out and "--epochs" not in \
        out.split("--quick:")[1].splitlines()[0]
    from asynctrain.checkpoint import read_checkpoint
    assert read_checkpoint(tmp_path / "out" / "quick" / "layered" / "model.pt")["meta"]["epoch"] == 2


def test_a_folder_in_use_by_a_live_run_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    import os

    mod = _recipe("nmnist")
    monkeypatch.setattr(mod.SPEC, "load", lambda *a: pytest.fail("data loaded while the folder is busy"))
    lock = _lock(tmp_path / "out" / "quick", os.getppid())  # a live process, not this one
    assert mod.main(_args(tmp_path) + ["--quick"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'out' / 'quick'} is in use by another run (pid {os.getppid()}" in err
    assert "`shd.py --quick --K 8`" in err and lock.is_file()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, capsys):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = _lock(tmp_path / "out" / "quick", gone.pid)
    assert _recipe("nmnist").main(_args(tmp_path) + ["--quick"]) == 0
    assert "was locked by a run that is gone" in capsys.readouterr().err and not lock.exists()


def test_ctrl_c_prints_one_line_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    from asynctrain import recipe

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "run_models", interrupted)
    assert _recipe("nmnist").main(_args(tmp_path) + ["--quick"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"interrupted (Ctrl-C); rerun the same command to resume: finished epochs are kept "
                   f"in {tmp_path / 'out' / 'quick'}"]
    assert not any((tmp_path / "out" / "quick").glob(".asynctrain.lock"))


def test_a_full_disk_names_the_file_and_exits_2(tmp_path, capsys, monkeypatch):
    import errno

    from asynctrain import run_files

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_files, "open", full, raising=False)  # the training log's append
    assert _recipe("nmnist").main(_args(tmp_path) + ["--quick"]) == 2
    err = capsys.readouterr().err
    assert f"error: could not write the training log {tmp_path / 'out' / 'quick' / 'layered' / 'train.jsonl'}" \
        f": [Errno 28] No space left on device" in err and "Traceback" not in err
