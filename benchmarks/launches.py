"""Launches, device copies and host syncs per forward step of one training iteration,
by phase, counted on the CPU with CUDA's step loops (`asynctrain.traffic`).

    TRITON_INTERPRET=1 python benchmarks/launches.py                 # every case
    TRITON_INTERPRET=1 python benchmarks/launches.py --cases vgg7-K8 --out counts.jsonl

Runs each case's iteration (forward, checkpointed backward; no optimizer step) with
``plan.forced(sync_free=True, stop_every=8)`` (CUDA's loop: no host read but the stop
test every 8 steps) on backend="triton" (interpreted: ``TRITON_INTERPRET=1`` must be
set before Triton is imported; without it the torch twins run and the Triton
kernels' counts are those of their twins' ops) and prints one JSON line per case and
phase: ``case``, ``K``, ``phase`` ("forward"; "backward": recompute and sweep
together), ``launches_per_step``, ``device_copies_per_step``, ``host_syncs_per_step``
(besides: ``stop_tests_per_step``, ``setup_launches_per_pass``, the steps and
passes, the top launches per step). What counts as a launch, a copy and a sync:
`asynctrain.traffic`. Per step: what runs in the step loops and in a step's replay
and reverse (`traffic.step_methods`), divided by the call's forward steps; set-up: the
rest of the phase, per pass.

The budgets (launches and host syncs per step) are `BUDGETS`; tests/test_launches.py holds
them (where a budget is not met yet it holds `CEILINGS`, today's counts, which may
only go down).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asynctrain as at  # noqa: E402
from asynctrain import plan, traffic  # noqa: E402
from asynctrain.models import mlp, vgg7  # noqa: E402

# The budgets: launches per forward step, per phase, set-up launches per pass, host
# syncs per step (the stop test excepted).
BUDGETS = dict(launches_per_step=16, setup_launches_per_pass=40, host_syncs_per_step=0)
# Where a budget is not met yet: today's counts, per (case, phase) and field, that
# tests/test_launches.py holds as ceilings (lower them as the counts go down).
CEILINGS: dict[tuple[str, str], dict[str, float]] = {
    ("shd-mlp", "forward"): {"setup_launches_per_pass": 54.0},
    ("shd-mlp-per-op", "forward"): {"launches_per_step": 42.9},
    ("shd-mlp-per-op", "backward"): {"launches_per_step": 40.0},
    ("vgg7-K8", "forward"): {"launches_per_step": 21.9},
    ("vgg7-K8", "backward"): {"launches_per_step": 17.5, "setup_launches_per_pass": 43.0},
    ("vgg7-K64", "forward"): {"launches_per_step": 43.9},
    ("vgg7-K64", "backward"): {"launches_per_step": 45.8},
}


def _mlp_case(deterministic: bool, sizes: str, batch: int, T: int, max_steps: int):
    torch.manual_seed(0)
    net = mlp(sizes=[int(n) for n in sizes.split("-")])
    with torch.no_grad():
        for m in net:
            m.weight.mul_(3.0)  # enough gain that spikes reach the output at random init
    n_in = net[0].in_features
    frames = (torch.rand(T, batch, n_in, generator=torch.Generator().manual_seed(1)) < 0.05).float()
    cfg = at.SimConfig(policy="RS", K=8, theta=0.3, tau=100.0, dt=10.0, max_steps=max_steps,
                       refractory_dropout=0.3)
    return at.AsyncSNN(net, cfg, backend="triton", deterministic=deterministic).train(), frames


def _vgg_case(K: int, batch: int, T: int, max_steps: int, width: float, image_size: int):
    torch.manual_seed(0)
    net = vgg7(width=width, image_size=image_size)
    frames = (torch.rand(T, batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
              < 0.3).float()
    cfg = at.SimConfig(policy="MS", K=K, theta=0.2, tau=float("inf"), max_steps=max_steps,
                       refractory_dropout=0.3, momentum_noise=0.1)
    return at.AsyncSNN(net, cfg, backend="triton").train(), frames


# name -> (K, the step mode forced (None: the plan's), make(args) -> (snn, frames)). VGG-7
# at full width runs listed steps at K = 8 and whole-state ones at K = 64 on CUDA
# (`plan.LISTED_BELOW`); a narrow copy's list is relatively longer, so the mode is forced.
CASES = {
    "shd-mlp": (8, None, lambda a: _mlp_case(False, a.mlp, a.batch, a.T, a.max_steps)),         # fused steps
    "shd-mlp-per-op": (8, None, lambda a: _mlp_case(True, a.mlp, a.batch, a.T, a.max_steps)),   # per-op kernels
    "vgg7-K8": (8, "listed", lambda a: _vgg_case(8, a.batch, a.T, a.max_steps, a.width, a.image_size)),
    "vgg7-K64": (64, "whole", lambda a: _vgg_case(64, a.batch, a.T, a.max_steps, a.width, a.image_size)),
}


# The sizes tests/test_launches.py measures (the CEILINGS' sizes): small, the same paths.
TEST_SIZES = dict(batch=2, T=1, max_steps=12, width=1 / 16, image_size=8, mlp="48-32-32-32-10")


def snn_fused(snn) -> bool:
    """The call ran the fused steps (a fused backend, fully connected)."""
    return not snn.deterministic and not snn.graph.image


def run_case(name: str, args) -> list[dict]:
    """One JSON row per phase of case `name`; `args` holds the sizes (`TEST_SIZES`'
    keys, as the command line's options)."""
    K, steps, make = CASES[name]
    snn, frames = make(args)
    t0 = time.perf_counter()
    with plan.forced(sync_free=True, stop_every=8, steps=steps), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "passes reached max_steps", RuntimeWarning)
        warnings.filterwarnings("ignore", "passes reached max_steps", UserWarning)
        phases, tr, _ = traffic.measure(snn, frames, seed=3)
    dt = time.perf_counter() - t0
    rows = []
    for phase, pc in phases.items():
        n = max(pc.steps, 1)
        top = {op: round(c / n, 2) for op, c in pc.step.ops.most_common(12)}
        top_setup = {op: round(c / max(pc.passes, 1), 2) for op, c in pc.setup.ops.most_common(12)}
        kernels = {op: round(c / n, 2) for op, c in pc.step.ops.items() if op.startswith("triton:")}
        rows.append(dict(case=name, K=K, phase=phase, **{k: round(v, 3) for k, v in pc.per_step().items()},
                         steps=pc.steps, passes=pc.passes, sync_kinds=dict(pc.step.sync_kinds + pc.setup.sync_kinds),
                         top_per_step=top, top_setup_per_pass=top_setup,
                         triton_per_step=kernels, fused=snn_fused(snn), seconds=round(dt, 1),
                         interpreted=os.environ.get("TRITON_INTERPRET") == "1"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--T", type=int, default=2, help="passes (frames) per iteration")
    p.add_argument("--max-steps", type=int, default=40, help="forward steps per pass at most (SimConfig.max_steps)")
    p.add_argument("--mlp", default="350-128-128-128-20", help="the MLP's sizes (default: shd-like)")
    p.add_argument("--width", type=float, default=1 / 16, help="VGG-7 channel width factor")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; known: {list(CASES)}")
    for name in names:
        for row in run_case(name, args):
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
