"""recipes/cifar_vgg7.py on a tiny fake CIFAR-10 written in the real format
(tests/fixtures.py): torchrun with 2 CPU processes (gloo), resume, equal weights on
both ranks, layered training evaluated asynchronously from its checkpoint, and the
errors a user meets first (data folder, files, K).

VGG-7 at width 1/8 (8-8-16-16-32-32 channels, 28,682 neurons): the narrowest width at
which spikes still reach the output layer with the default initialisation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar_vgg7.py"
TINY = ["--width", "0.125", "--batch-size", "2", "--limit-test", "4", "--epochs", "2"]


def _recipe():
    spec = importlib.util.spec_from_file_location("cifar_vgg7", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_per_batch=2)  # 10 training images, 2 test images
    return root


def _torchrun(args, cwd):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "tests")] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(RECIPE), *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_torchrun_two_ranks_resume_and_equal_weights(data, tmp_path):
    out = tmp_path / "run"
    common = ["--K", "64", "--data-dir", str(data), "--out", str(out), "--eval-K", "64", *TINY]
    _torchrun([*common, "--max-steps", "2", "--no-eval"], tmp_path)
    first = torch.load(out / "last.pt", weights_only=False)
    assert first["step"] == 2 and first["world_size"] == 2 and first["batch"] == 2
    log = json.loads((out / "log.json").read_text())
    assert log[0]["train"]["samples"] == 8 and log[-1]["rank_weight_max_abs_diff"] == 0.0
    for key in ("loss", "accuracy", "density", "synops", "forward_steps"):
        assert key in log[0]["train"]
    assert log[0]["train"]["density"] > 0 and log[0]["train"]["forward_steps"] > 0
    r = _torchrun([*common, "--max-steps", "3", "--resume"], tmp_path)
    resumed = torch.load(out / "last.pt", weights_only=False)
    assert resumed["step"] == 3
    assert any(not torch.equal(a, b) for a, b in zip(first["model"].values(), resumed["model"].values()))
    log = json.loads((out / "log.json").read_text())
    assert log[-1]["rank_weight_max_abs_diff"] == 0.0
    assert set(log[-2]["eval"]) == {"layered", "RS K=64"}
    assert "RS K=64" in r.stdout
    # the same three steps without a stop give the same weights
    straight = tmp_path / "straight"
    _torchrun([*common[:-6], "--out", str(straight), "--eval-K", "64", *TINY, "--max-steps", "3",
               "--no-eval"], tmp_path)
    ref = torch.load(straight / "last.pt", weights_only=False)
    for k, v in ref["model"].items():
        assert torch.equal(v, resumed["model"][k]), f"{k} differs after resume"


def test_layered_model_evaluates_async_from_checkpoint(data, tmp_path, capsys):
    rec = _recipe()
    out = tmp_path / "lay"
    rec.main(["--policy", "layered", "--data-dir", str(data), "--out", str(out), "--max-steps", "1",
              "--no-eval", *TINY])
    rec.main(["--eval-only", "--checkpoint", str(out / "last.pt"), "--data-dir", str(data),
              "--out", str(out), "--eval-K", "512,8", *TINY])
    res = json.loads((out / "eval.json").read_text())["eval"]
    assert set(res) == {"layered", "RS K=512", "RS K=8"}
    assert res["RS K=8"]["forward_steps"] > res["RS K=512"]["forward_steps"] >= 1
    assert res["layered"]["forward_steps"] == 7  # one step per layer
    assert "RS K=8" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--K", "0"], "K must be an integer >= 1, got 0"),
    (["--K", "eight"], "K must be an integer >= 1, got 'eight'"),
    (["--eval-K", "64,x"], "K must be an integer >= 1, got 'x'"),
    (["--eval-K", ","], "--eval-K must list integers"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--policy", "ZZ"], "invalid choice: 'ZZ'"),
])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().parse_args(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_missing_data_is_a_clear_error(data, tmp_path):
    rec = _recipe()
    with pytest.raises(SystemExit, match=r"train split.*cifar-10-batches-py: data_batch_1, .*data_batch_5, batches.meta"):
        rec.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *TINY])
    partial = tmp_path / "partial"
    shutil.copytree(data, partial)
    (partial / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(SystemExit, match=r"missing: data_batch_3"):
        rec.main(["--data-dir", str(partial), "--out", str(tmp_path / "o"), *TINY])
    (partial / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"not a pickle")
    shutil.copy(data / "cifar-10-batches-py" / "data_batch_1", partial / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(SystemExit, match=r"data_batch_4.*not a CIFAR-10 python pickle"):
        rec.main(["--data-dir", str(partial), "--out", str(tmp_path / "o"), *TINY])
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint at"):
        rec.main(["--data-dir", str(data), "--out", str(tmp_path / "o"), "--resume", *TINY])
