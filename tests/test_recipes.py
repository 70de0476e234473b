"""Each recipe runs one short epoch end to end on tiny format-faithful fixtures
(tests/fixtures.py), and reports missing data with the files tonic expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures import load_recipe, write_dvs_gesture, write_nmnist, write_shd



def _recipe(name: str):
    return load_recipe(name)


def _nmnist(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    for train, n in ((True, 10), (False, 6)):
        samples = []
        for i in range(n):
            digit = i % 3
            ev = [(int(3 + 8 * digit + rng.integers(0, 4)), int(rng.integers(0, 34)),
                   int(rng.integers(0, 2)), int(t)) for t in sorted(rng.integers(0, 99_000, 80))]
            samples.append((digit, ev))
        write_nmnist(root, samples, train=train)
    return ["--min-files", "6"]


def _shd(root: Path) -> list[str]:
    rng = np.random.default_rng(1)
    for train, n in ((True, 10), (False, 6)):
        samples = []
        for i in range(n):
            label = i % 4
            times = np.sort(rng.uniform(0, 0.3, 60))
            units = (label * 150 + rng.integers(0, 100, 60)) % 700
            samples.append((label, times.tolist(), units.tolist()))
        write_shd(root, samples, train=train)
    return ["--duration-ms", "300"]


def _dvs(root: Path) -> list[str]:
    rng = np.random.default_rng(2)
    for train, users in ((True, (1, 2, 3)), (False, (24, 25))):
        samples = []
        for user in users:
            for label in (0, 5, 10):
                ev = [(int(10 * (label % 4) + rng.integers(0, 30)), int(rng.integers(0, 128)),
                       int(rng.integers(0, 2)), int(t)) for t in sorted(rng.integers(0, 390, 100))]
                samples.append((user, "led", label, ev))
        write_dvs_gesture(root, samples, train=train)
    return ["--min-files", "6", "--duration-ms", "400"]


@pytest.mark.parametrize("name, make, rows", [
    ("nmnist", _nmnist, 4), ("shd", _shd, 4), ("dvs_gesture", _dvs, 4)])
def test_recipe_one_short_epoch(tmp_path, name, make, rows):
    extra = make(tmp_path / "data")
    out = tmp_path / "out"
    rc = _recipe(name).main(["--data-dir", str(tmp_path / "data"), "--out", str(out), "--quick",
                             "--train", "layered", "MS", "--steps-after-output", "0",
                             "--no-progress", "--batch-size", "8", *extra])
    assert rc == 0
    out = out / "quick"  # --quick writes to its own folder
    table = (out / "table.md").read_text().strip().splitlines()
    body = [l for l in table if l.startswith("| ") and not l.startswith("| Training")]
    # layered model under layered, RS, MS; the MS model under MS
    assert [tuple(c.strip() for c in l.split("|")[1:3]) for l in body] == [
        ("Layered", "Layered"), ("Layered", "Async RS"), ("Layered", "Async MS"),
        ("Unlayered MS", "Async MS")][:rows]
    for png in ("latency.png", "accuracy_vs_steps.png", "currents_to_spike.png"):
        assert (out / png).stat().st_size > 1000
    for policy in ("layered", "MS"):
        assert (out / policy / "model.pt").is_file()
        assert json.loads((out / policy / "train.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    res = json.loads((out / "results.json").read_text())
    assert res["extra"]["args"]["epochs"] == 1


def test_recipe_resumes_and_evaluates_other_executions(tmp_path, capsys):
    extra = _nmnist(tmp_path / "data")
    argv = ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quick",
            "--train", "layered", "--no-progress", "--steps-after-output", *extra]
    mod = _recipe("nmnist")
    assert mod.main(argv) == 0
    first = (tmp_path / "out" / "quick" / "layered" / "model.pt").read_bytes()
    capsys.readouterr()
    assert mod.main(argv + ["--eval", "layered", "RS:K=2", "MS:drain"]) == 0
    text = capsys.readouterr().out
    assert "| Layered | Async RS (K=2) |" in text and "| Layered | Async MS (drain) |" in text
    assert (tmp_path / "out" / "quick" / "layered" / "model.pt").read_bytes() == first  # not retrained
    assert "resumed from" in text


@pytest.mark.parametrize("name, expected", [
    ("nmnist", ["NMNIST/train.zip", "NMNIST/Train/<digit>/<id>.bin"]),
    ("shd", ["SHD/shd_train.h5.zip", "SHD/shd_train.h5"]),
    ("dvs_gesture", ["DVSGesture/ibmGestureTrain.tar.gz", "userNN_<lighting>/<label>.npy"]),
])
def test_recipe_missing_data_exits_2_listing_files(tmp_path, capsys, name, expected):
    rc = _recipe(name).main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                             "--quick", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    for part in expected + ["--download"]:
        assert part in err
    assert not (tmp_path / "o").exists()


def test_recipe_rejects_bad_arguments(tmp_path, capsys):
    mod = _recipe("shd")
    with pytest.raises(SystemExit) as ex:
        mod.main(["--eval", "MS:Q=1"])
    assert ex.value.code == 2 and "unknown setting" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--K", "0"])


def test_recipes_have_the_papers_hyper_parameters():
    n, s, d = _recipe("nmnist").HYPER, _recipe("shd").HYPER, _recipe("dvs_gesture").HYPER
    assert (n.hidden, n.dt, n.batch_size, n.epochs, n.lr, n.theta, n.weight_decay, n.tau,
            n.steepness, n.input_dropout, n.K, n.refractory_dropout, n.momentum_noise) == (
        (64, 64, 64), 10.0, 256, 50, 5e-4, 0.3, 1e-5, 1.0, 2.0, 0.25, 8, 0.8, 1e-6)
    assert (s.hidden, s.dt, s.batch_size, s.epochs, s.lr, s.weight_decay, s.tau, s.steepness,
            s.input_dropout, s.momentum_noise) == (
        (128, 128, 128), 10.0, 32, 100, 7e-4, 1e-4, 100.0, 10.0, 0.2, 0.1)
    assert (d.hidden, d.dt, d.epochs, d.lr, d.weight_decay) == ((128, 128, 128), 20.0, 70, 1e-4, 1e-5)
