"""recipes/cifar_vgg7.py on a tiny fake CIFAR-10 written in the real format
(tests/fixtures.py): torchrun with 2 CPU processes (gloo), resume, equal weights on
both ranks, layered training evaluated asynchronously from its checkpoint, and the
errors a user meets first (data folder, files, K).

VGG-7 at width 1/8 (8-8-16-16-32-32 channels, 28,682 neurons): the narrowest width at
which spikes still reach the output layer with the default initialisation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asynctrain.checkpoint import read_checkpoint
from fixtures import load_recipe, write_cifar10

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar_vgg7.py"
TINY = ["--width", "0.125", "--batch-size", "2", "--max-test", "4", "--epochs", "2"]


def _recipe():
    return load_recipe("cifar_vgg7", "cifar_vgg7")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_per_batch=2)  # 10 training images, 2 test images
    return root


def _ck(path):
    """Run state and weights of a checkpoint (asynctrain.checkpoint format)."""
    ck = read_checkpoint(path)
    return dict(ck["meta"], model=ck["weights"])


def _log(out):
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def _torchrun(args, cwd):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    # the checkout first: the processes import this asynctrain, not an installed one
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(RECIPE), *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_torchrun_two_ranks_resume_and_equal_weights(data, tmp_path):
    out = tmp_path / "run"
    common = ["--K", "64", "--data-dir", str(data), "--out", str(out), "--eval", "layered", "RS:K=64",
              *TINY]
    _torchrun([*common, "--max-steps", "2", "--no-eval"], tmp_path)
    first = _ck(out / "last.pt")
    # 10 images, 2 ranks, batch 2 per rank: 2 steps are the first epoch
    assert (first["step"], first["epoch"], first["batch"]) == (2, 1, 0)
    stop = _log(out)[-1]
    assert stop["event"] == "epoch" and stop["samples"] == 8  # summed over both ranks
    for key in ("loss", "train_accuracy", "density", "synops_per_sample", "forward_steps_per_pass"):
        assert key in stop
    assert stop["density"] > 0 and stop["forward_steps_per_pass"] > 0
    assert json.loads((out / "summary.json").read_text())["rank_weight_max_abs_diff"] == 0.0
    r = _torchrun([*common, "--max-steps", "3", "--resume"], tmp_path)
    resumed = _ck(out / "last.pt")
    assert (resumed["step"], resumed["epoch"], resumed["batch"]) == (3, 1, 1)
    assert _log(out)[-1]["event"] == "stop"  # inside epoch 2
    assert any(not torch.equal(a, b) for a, b in zip(first["model"].values(), resumed["model"].values()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rank_weight_max_abs_diff"] == 0.0 and summary["world_size"] == 2
    assert set(summary["eval"]) == {"layered", "RS:K=64"}
    assert summary["eval"]["RS:K=64"]["samples"] == 2  # one test image per rank, merged
    assert "| Async RS (K=64) |" in r.stdout
    # the same three steps without a stop give the same weights
    straight = tmp_path / "straight"
    _torchrun([*common[:-8], "--out", str(straight), *TINY, "--max-steps", "3", "--no-eval"], tmp_path)
    ref = _ck(straight / "last.pt")
    for k, v in ref["model"].items():
        assert torch.equal(v, resumed["model"][k]), f"{k} differs after resume"


def test_layered_model_evaluates_async_from_checkpoint(data, tmp_path, capsys):
    rec = _recipe()
    out = tmp_path / "lay"
    rec.main(["--policy", "layered", "--data-dir", str(data), "--out", str(out), "--max-steps", "1",
              "--no-eval", *TINY])
    with pytest.warns(FutureWarning, match="--checkpoint is deprecated"):
        rec.main(["--eval-only", "--checkpoint", str(out / "last.pt"), "--data-dir", str(data),
                  "--out", str(out), "--eval-K", "512,8", *TINY])
    res = json.loads((out / "eval.json").read_text())["runs"][0]["eval"]
    assert set(res) == {"layered", "RS:K=512", "RS:K=8"}
    assert res["RS:K=8"]["latency_steps"] > res["RS:K=512"]["latency_steps"] >= 1
    assert res["layered"]["latency_steps"] == 7  # one step per layer
    assert "| Async RS (K=8) |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--K", "0"], "K must be an integer >= 1, got 0"),
    (["--K", "eight"], "K must be an integer >= 1, got 'eight'"),
    (["--eval-K", "64,x"], "K must be an integer >= 1, got 'x'"),
    (["--eval-K", ","], "--eval-K must list integers"),
    (["--eval-only"], "--eval-only needs a checkpoint"),
    (["--policy", "ZZ"], "invalid choice: 'ZZ'"),
])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().parse_args(argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def _exit(rec, argv, capsys, code=2):
    try:
        rc = rec.main(argv)
    except SystemExit as ex:
        rc = ex.code
    assert rc == code
    return capsys.readouterr().err


def test_missing_data_is_a_clear_error(data, tmp_path, capsys):
    rec = _recipe()
    err = _exit(rec, ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *TINY],
                capsys)
    assert re.search(r"train split.*cifar-10-batches-py: data_batch_1, .*data_batch_5, "
                     r"batches.meta", err)
    partial = tmp_path / "partial"
    shutil.copytree(data, partial)
    (partial / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "missing: data_batch_3" in _exit(rec, ["--data-dir", str(partial), "--out",
                                                  str(tmp_path / "o"), *TINY], capsys)
    (partial / "cifar-10-batches-py" / "data_batch_4").write_bytes(b"not a pickle")
    shutil.copy(data / "cifar-10-batches-py" / "data_batch_1", partial / "cifar-10-batches-py" / "data_batch_3")
    assert re.search(r"data_batch_4.*not a CIFAR-10 python pickle",
                     _exit(rec, ["--data-dir", str(partial), "--out", str(tmp_path / "o"), *TINY], capsys))
    assert "--resume: no checkpoint at" in _exit(
        rec, ["--data-dir", str(data), "--out", str(tmp_path / "o"), "--resume", *TINY], capsys)


@pytest.mark.parametrize("argv, match", [
    (["--lr", "-1"], "--lr: expected a number > 0, got '-1'"),
    (["--weight-decay", "-1"], "--weight-decay: expected a number >= 0, got '-1'"),
    (["--momentum-noise", "-1"], "--momentum-noise: expected a number >= 0, got '-1'"),
    (["--refractory-dropout", "2"], "--refractory-dropout: expected a probability in [0, 1]"),
    (["--epochs", "0"], "--epochs: expected an integer > 0, got '0'"),
    (["--device", "foo"], "--device: expected auto, cpu, cuda or cuda:N, got 'foo'"),
    (["--workers", "-1"], "--workers: expected an integer >= 0, got '-1'"),
    (["--max-steps", "-1"], "--max-steps: expected an integer >= 0"),
    (["--output-threshold", "-3"], "--output-threshold: expected a number > 0, got '-3'"),
    (["--eval-only", "nope.pt"], "--eval-only: no checkpoint file at nope.pt"),
    (["--resume", "--fresh"], "--resume and --fresh contradict each other"),
])
def test_more_bad_arguments_fail_before_data(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        _recipe().parse_args(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_out_under_a_file_and_help(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--out", str(tmp_path / "f" / "run")])
    assert "is a file, so no folder can be made there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _recipe().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "SPEC.md" not in text and "docs/semantics.md" in text
    assert text.count("(default:") >= 28 and "Adam learning rate (default: 0.0002)" in text
    for old in ("--limit-train", "--eval-K", "--checkpoint"):  # deprecated spellings: hidden
        assert old not in text


def test_checkpoints_rebuild_the_model_and_refuse_contradictions(data, tmp_path, capsys):
    rec = _recipe()
    out = tmp_path / "run"
    base = ["--data-dir", str(data), "--out", str(out), "--no-progress"]
    rec.main([*base, "--policy", "layered", "--max-steps", "1", "--no-eval", "--theta", "0.3", *TINY])
    ck = out / "last.pt"
    assert _log(out)[-1]["epoch"] == 1  # epochs count from 1
    # --eval-only CKPT alone: width and theta come from the file (no size-mismatch traceback,
    # no silently different numbers)
    rec.main(["--eval-only", str(ck), "--data-dir", str(data), "--out", str(tmp_path / "e1"),
              "--max-test", "4", "--eval", "layered", "RS:K=64", "--no-progress"])
    rec.main(["--eval-only", str(ck), "--data-dir", str(data), "--out", str(tmp_path / "e2"),
              "--max-test", "4", "--eval", "layered", "RS:K=64", "--no-progress", "--width", "0.125",
              "--theta", "0.3"])
    a = json.loads((tmp_path / "e1" / "eval.json").read_text())["runs"][0]["eval"]
    b = json.loads((tmp_path / "e2" / "eval.json").read_text())["runs"][0]["eval"]
    assert a == b
    err = _exit(rec, ["--eval-only", str(ck), "--data-dir", str(data), "--width", "0.25"], capsys)
    assert "--width 0.25 (the checkpoint has 0.125)" in err
    err = _exit(rec, ["--eval-only", str(ck), "--data-dir", str(data), "--theta", "0.2"], capsys)
    assert "--theta 0.2 (the checkpoint has 0.3)" in err
    # garbage, empty and fit()-of-an-MLP checkpoints: named, exit 2
    for content in (b"", b"garbage"):
        (tmp_path / "bad.pt").write_bytes(content)
        err = _exit(rec, ["--eval-only", str(tmp_path / "bad.pt"), "--data-dir", str(data)], capsys)
        assert f"checkpoint {tmp_path / 'bad.pt'}: " in err
    import asynctrain as at
    from asynctrain.checkpoint import save_model
    from asynctrain.models import mlp

    save_model(tmp_path / "mlp.pt", at.AsyncSNN(mlp(sizes=[4, 3, 2])), epoch=1)
    err = _exit(rec, ["--eval-only", str(tmp_path / "mlp.pt"), "--data-dir", str(data)], capsys)
    assert "CIFAR-10 needs 3072 inputs" in err
    # an existing run is neither overwritten nor resumed silently
    err = _exit(rec, [*base, "--policy", "layered", "--no-eval", *TINY], capsys)
    assert "last.pt exists: --resume to continue it, --fresh to start over" in err
    # resume: a changed setting names both values and --fresh; no flags: taken from the file
    err = _exit(rec, [*base, "--resume", "--lr", "0.1"], capsys)
    assert "--lr 0.1 (the checkpoint has 0.0002)" in err and "--fresh" in err
    rec.main([*base, "--resume", "--max-steps", "2", "--no-eval", "--epochs", "2"])
    assert f"resumed from {ck} at epoch 0, batch 1" in capsys.readouterr().out
    meta = read_checkpoint(ck)["meta"]
    assert meta["step"] == 2 and meta["args"]["policy"] == "layered" and meta["args"]["theta"] == 0.3


def test_nan_weights_stop_the_recipe_naming_the_tensor(data, tmp_path, capsys, monkeypatch):
    rec = _recipe()
    build = rec.build

    def poisoned(args, device):
        net, snn = build(args, device)
        with torch.no_grad():
            net[0].weight[0, 0, 0, 0] = float("nan")
        return net, snn

    monkeypatch.setattr(rec, "build", poisoned)  # a broken model: refused before a step
    err = _exit(rec, ["--data-dir", str(data), "--out", str(tmp_path / "n"), "--no-progress",
                      "--no-eval", *TINY], capsys, code=2)
    assert "weight net.0.weight holds 1 NaN/inf value(s)" in err
    assert not (tmp_path / "n" / "last.pt").exists()
    monkeypatch.undo()
    step = torch.optim.Adam.step

    def diverging(self, *a, **k):  # training that diverges in its first step
        out = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", diverging)
    err = _exit(rec, ["--data-dir", str(data), "--out", str(tmp_path / "d"), "--no-progress",
                      "--no-eval", *TINY], capsys, code=1)
    assert re.search(r"weight net\.0\.weight holds 1 of \d+ NaN/inf values at epoch 1, batch 1", err)
    assert "last.pt holds the last saved state" in err and not (tmp_path / "d" / "last.pt").exists()


def test_quick_run_and_a_busy_folder(data, tmp_path, capsys):
    import os

    rec = _recipe()
    out = tmp_path / "q"
    assert rec.main(["--quick", "--data-dir", str(data), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "--quick: --width 0.125, --max-train 64, --max-test 32, --epochs 1, --batch-size 8" in text
    summary = json.loads((out / "quick" / "summary.json").read_text())
    assert set(summary["eval"]) == {"layered", "RS:K=64"} and (out / "quick" / "epoch001.pt").is_file()
    from asynctrain.outdir import LOCK_NAME
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_NAME).write_text(json.dumps(dict(pid=os.getppid(), host=os.uname()[1],
                                                           started="t", command="cifar_vgg7.py")))
    err = _exit(rec, ["--data-dir", str(data), "--out", str(tmp_path / "b"), "--no-progress", *TINY],
                capsys)
    assert "is in use by another run" in err


def test_resume_from_an_unusable_checkpoint_names_it(data, tmp_path, capsys):
    rec = _recipe()
    bad = tmp_path / "bad.pt"
    for content in (b"", b"\x80\x02garbage"):
        bad.write_bytes(content)
        err = _exit(rec, ["--data-dir", str(data), "--out", str(tmp_path / "o"), "--resume",
                          str(bad), *TINY], capsys)
        assert f"checkpoint {bad}: " in err
