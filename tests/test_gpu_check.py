"""`bash benchmarks/gpu_check.sh --dry-run` keeps working: every stage on the CPU under
TRITON_INTERPRET=1 at tiny sizes, with a bare python like the GPU machine's (torch,
triton, numpy, pytest importable, nothing installed: no asynctrain on its path, so the
script must import the package from the checkout).

The bare python is a fresh venv (no pip) that sees only torch, triton, numpy, pytest
and what they require (links to their installed files in one folder, named by the
venv's one .pth): no asynctrain, and none of the optional packages (tqdm, tonic,
scikit-learn, matplotlib, h5py) that a stage must not need.
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
STAGES = ["env", "pytest-fused", "pytest-kernels", "profile", "cost", "kernels", "vgg7"]


def _closure(roots) -> list:
    """The installed distributions `roots` need (requirements without extras, markers
    evaluated for this interpreter)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    seen, todo, dists = set(), list(roots), []
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        dists.append(dist)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return dists


def _bare_python(where: Path) -> str:
    lib = where / "lib-bare"
    lib.mkdir(parents=True)
    for dist in _closure(["torch", "triton", "numpy", "pytest"]):
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__" or (lib / top).exists():
                continue
            src = Path(dist.locate_file(top))
            if src.exists():
                (lib / top).symlink_to(src)
    assert not (lib / "asynctrain").exists() and not (lib / "tqdm").exists(), sorted(p.name for p in lib.iterdir())
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True, timeout=120)
    py = where / "venv" / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "zz_bare.pth").write_text(f"{lib}\n")
    return str(py)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_check_dry_run_with_a_bare_python(tmp_path):
    py = _bare_python(tmp_path / "bare")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHON")}
    for missing in ("asynctrain", "tqdm"):
        probe = subprocess.run([py, "-c", f"import torch, triton, numpy, pytest; import {missing}"], cwd=tmp_path,
                               capture_output=True, text=True, env=env)
        assert f"No module named '{missing}'" in probe.stderr, \
            f"the bare python must have torch etc. but no {missing}:\n{probe.stderr[-2000:]}"
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                       env=dict(env, PYTHON=py, OUT=str(out), OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}\nfailed: {summary['failed']}"
    assert [s["stage"] for s in summary["stages"]] == STAGES and summary["failed"] == []
    assert summary["dry_run"] is True and summary["running"] == ""
    assert sum(s["limit_s"] + 5 for s in summary["stages"]) < 480  # all stages under 8 minutes
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    log = (out / "stages.log").read_text()
    assert f"asynctrain from {ROOT}/asynctrain/__init__.py" in log and f"kernels from {ROOT}/kernels/" in log
    for name in ("profile.jsonl", "cost.jsonl", "kernels.jsonl", "vgg7.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert rows and not any("error" in row for row in rows), name
    cost = {(row["impl"], row["K"]) for row in map(json.loads, (out / "cost.jsonl").read_text().splitlines())}
    assert cost == {("engine", 8)}
