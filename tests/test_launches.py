"""The launch budget and the zero host syncs of the step loops, counted on the CPU
(`asynctrain.traffic`) by benchmarks/launches.py: one training iteration per case with
CUDA's loops (`plan.forced(sync_free=True, stop_every=8)`), backend="triton"
interpreted (a child process started with ``TRITON_INTERPRET=1``), at the small
`launches.TEST_SIZES`.

Demanded, per case (shd-like MLP with the fused steps and with the per-op kernels,
a narrow VGG-7 with listed steps at K = 8 and whole-state steps at K = 64) and phase
(forward; backward: recompute and sweep):

- no host sync per step, besides the stop test: at most one read per 8
  per-op steps (or per launch of fused steps) and one per pass;
- launches per forward step and set-up launches per pass within `launches.BUDGETS`
  (16, 40), or, where a budget is not met yet, within today's counts
  (`launches.CEILINGS`), which may only go down: a count well below its ceiling
  fails too, until the ceiling is lowered to it;
- not vacuous: steps ran, and Triton kernels were among the launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import launches  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys, types, warnings
    sys.path.insert(0, "benchmarks")
    import torch
    torch.set_num_threads(1)
    import launches
    args = types.SimpleNamespace(**launches.TEST_SIZES)
    print(json.dumps([row for name in launches.CASES for row in launches.run_case(name, args)]))
""")

FIELDS = ("launches_per_step", "setup_launches_per_pass")


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_case_and_phase_is_counted(rows):
    assert {(r["case"], r["phase"]) for r in rows} == {(c, p) for c in launches.CASES
                                                       for p in ("forward", "backward")}
    for r in rows:
        assert r["interpreted"] and r["steps"] > 4 and r["launches_per_step"] > 0, ("vacuous", r)
    # the Triton kernels are counted as launches (interpreted, nothing they do inside)
    assert all(r["triton_per_step"] for r in rows), [r["case"] for r in rows if not r["triton_per_step"]]


def test_no_host_sync_in_the_loops(rows):
    for r in rows:
        assert r["host_syncs_per_step"] == 0, (r["case"], r["phase"], r["sync_kinds"])
        # the stop test: one read per pass, then one per 8 per-op steps or per launch of
        # fused steps (at least one step each)
        if r["phase"] == "forward":
            per_op = r["passes"] + r["steps"] / 8 + 1
            assert 0 < r["stop_tests_per_step"] * r["steps"] <= (r["passes"] + r["steps"] if r["fused"] else per_op), r
        else:
            assert r["stop_tests_per_step"] == 0, r


def _limit(case: str, phase: str, field: str) -> float:
    return launches.CEILINGS.get((case, phase), {}).get(field, launches.BUDGETS[field])


def test_launch_budgets_or_todays_ceilings(rows):
    over, stale = [], []
    for r in rows:
        for field in FIELDS:
            limit, got = _limit(r["case"], r["phase"], field), r[field]
            if got > limit:
                over.append(f"{r['case']} {r['phase']} {field}: {got} > {limit}")
            elif limit > launches.BUDGETS[field] and got < limit - max(1.0, 0.1 * limit):
                stale.append(f"{r['case']} {r['phase']} {field}: {got}, ceiling {limit}: lower it")
    assert not over, over
    assert not stale, stale


def test_ceilings_are_only_for_missed_budgets():
    for key, fields in launches.CEILINGS.items():
        assert key[0] in launches.CASES and key[1] in ("forward", "backward"), key
        for field, ceiling in fields.items():
            assert ceiling > launches.BUDGETS[field], (key, field, "the budget is met: drop the ceiling")
