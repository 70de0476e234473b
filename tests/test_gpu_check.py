"""`bash benchmarks/gpu_check.sh --dry-run` keeps working: every stage on the CPU under
TRITON_INTERPRET=1 at tiny sizes, with a bare python like the GPU machine's (torch,
triton, numpy, pytest importable, nothing installed: no asynctrain on its path, so the
script must import the package from the checkout).

The bare python is a fresh venv (no pip) whose one .pth names the site-packages
folders that hold torch, triton, numpy and pytest; .pth files inside those folders
are not run, so an editable install of asynctrain there stays invisible.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["env", "pytest-fused", "pytest-kernels", "cost", "kernels", "vgg7"]


def _bare_python(where: Path) -> str:
    import numpy
    import torch
    import triton
    dirs = []
    for mod in (torch, triton, numpy, pytest):
        d = str(Path(mod.__file__).resolve().parent.parent)
        if d not in dirs:
            dirs.append(d)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz_bare.pth").write_text("\n".join(dirs) + "\n")
    return str(py)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_with_a_bare_python(tmp_path):
    py = _bare_python(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHON")}
    probe = subprocess.run([py, "-c", "import torch, triton, numpy, pytest; import asynctrain"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert "No module named 'asynctrain'" in probe.stderr, \
        f"the bare python must have torch etc. but no asynctrain:\n{probe.stderr[-2000:]}"
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                       env=dict(env, PYTHON=py, OUT=str(out), OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}\nfailed: {summary['failed']}"
    assert [s["stage"] for s in summary["stages"]] == STAGES and summary["failed"] == []
    assert summary["dry_run"] is True and summary["running"] == ""
    assert sum(s["limit_s"] + 5 for s in summary["stages"]) < 420
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    log = (out / "stages.log").read_text()
    assert f"asynctrain from {ROOT}/asynctrain/__init__.py" in log and f"kernels from {ROOT}/kernels/" in log
    for name in ("cost.jsonl", "kernels.jsonl", "vgg7.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert rows and not any("error" in row for row in rows), name
    cost = {(row["impl"], row["K"]) for row in map(json.loads, (out / "cost.jsonl").read_text().splitlines())}
    assert cost == {("engine", 8)}
