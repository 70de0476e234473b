"""What a first user meets outside training and the command lines: settings that are
legal but surely not meant are warned about (once, at the user's line), and bad
input to the helpers is named instead of failing deep inside."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import asynctrain as at
from asynctrain import backends, report
from asynctrain.data import collate_time_major


def _net(n_in=20, hidden=10, n_out=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden, bias=False),
                               torch.nn.Linear(hidden, n_out, bias=False))


def test_a_network_that_cannot_fire_is_warned_about_at_the_callers_line():
    with pytest.warns(RuntimeWarning, match=r"sync_threshold=1000 is above what 13 neurons can receive "
                                            r"in a pass \(their fan-in 10\.\.20; layer 1: 10 of 10, "
                                            r"layer 2: 3 of 3\): they can never fire; no output neuron can") as rec:
        snn = at.AsyncSNN(_net(), at.SimConfig(sync_threshold=1000))
    assert Path(rec[0].filename).resolve() == Path(__file__).resolve()  # this line, not ours
    assert snn(torch.ones(2, 3, 20)).sum() == 0
    with pytest.warns(RuntimeWarning, match=r"above what 3 neurons .*layer 2: 3 of 3"):
        snn.cfg = at.SimConfig(sync_threshold=15)  # the outputs' fan-in is 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        at.AsyncSNN(_net(), at.SimConfig(sync_threshold=10))  # reachable: no warning
        at.AsyncSNN(_net(), at.SimConfig(sync_threshold=15, refractory=False))  # no bound
        at.AsyncSNN(_net(), at.SimConfig.preset("loihi", _net()))


def test_the_same_warning_prints_once_per_calling_line():
    import subprocess
    import sys

    code = ("import torch, asynctrain as at\n"
            "net = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2, bias=False))\n"
            "for _ in range(3):\n"
            "    at.AsyncSNN(net, at.SimConfig(sync_threshold=50))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("can never fire") == 1 and "<string>:4: RuntimeWarning" in r.stderr


def test_command_lines_print_warnings_on_one_line():
    import subprocess
    import sys

    code = ("import warnings\nfrom asynctrain import cli\n"
            "def body():\n    warnings.warn('something odd', RuntimeWarning)\n    return 0\n"
            "raise SystemExit(cli.guarded(body, 'rerun'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0
    assert r.stderr == "warning: something odd (RuntimeWarning, <string>:4)\n"  # no echoed source line


def test_triton_interpreter_picked_by_the_environment_is_warned_about(monkeypatch):
    pytest.importorskip("triton")
    from asynctrain.kernels import _triton

    monkeypatch.setattr(backends, "_interpreting", lambda: True)
    monkeypatch.setattr(_triton, "is_interpreted", lambda fn: True)
    with pytest.warns(RuntimeWarning, match=r"TRITON_INTERPRET=1 was set when Triton was imported, so "
                                            r"backend='auto' runs the Triton interpreter"):
        ops = backends.resolve("auto", torch.device("cpu"))
    assert ops.name == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for by name: no warning
        assert backends.resolve("triton", torch.device("cpu")).name == "triton"


def test_an_unwritable_cache_falls_back_to_torch_or_names_the_folder(tmp_path, monkeypatch):
    from asynctrain.kernels import cpu_step

    (tmp_path / "file").write_text("x")  # a folder that cannot be made, even by root
    monkeypatch.setenv("ASYNCTRAIN_CACHE", str(tmp_path / "file" / "cache"))
    cpu_step.load.cache_clear()
    backends._cpu_builds.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"the fused CPU steps cannot be built: .*file.*set "
                                                r"ASYNCTRAIN_CACHE to a writable folder\); using "
                                                r"backend='torch'"):
            assert backends.resolve("auto", torch.device("cpu")).name == "torch"
        with pytest.raises(RuntimeError, match=r"backend='cpu': the fused CPU steps cannot be built"):
            backends.resolve("cpu", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        cpu_step.load.cache_clear()
        backends._cpu_builds.cache_clear()
    assert backends.resolve("auto", torch.device("cpu")).name in ("cpu", "torch")


def test_collating_samples_of_different_length_names_them():
    batch = [(torch.zeros(8, 5), 0), (torch.zeros(8, 5), 1), (torch.zeros(6, 5), 2)]
    with pytest.raises(ValueError, match=r"sample 2 of the batch has frames of shape \(6, 5\), sample 0 "
                                         r"\(8, 5\)"):
        collate_time_major(batch)
    frames, labels = collate_time_major(batch[:2])
    assert frames.shape == (8, 2, 5) and labels.tolist() == [0, 1]


def test_an_empty_report_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no results to report"):
        report.write_report(tmp_path, {})
    with pytest.raises(ValueError, match=r"no results for 'Layered'"):
        report.write_report(tmp_path, {"Layered": {}})
    assert not any(tmp_path.iterdir())
