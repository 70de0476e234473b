"""What the sync-free step loop (CUDA's mode, `plan.SYNC_FREE_DEVICES`) costs in work,
measured on the CPU with the mode forced on (`plan.forced`): one VGG-7 training
iteration (forward, checkpointed backward) in three modes of the torch backend,
alternating, in one process:

- ``default``: the CPU mode (pending entries and receivers listed with host reads);
- ``dense``: sync-free, conv steps over the whole [B, W] state (``steps="whole"``);
- ``listed``: sync-free, conv steps at their fixed-size receiver list when it is short
  enough (`plan.LISTED_BELOW`, the default; `receivers.ListedReceivers`).

All three give bitwise the same outputs and gradients (tests/test_listed_steps.py,
tests/test_no_sync.py); the output checks that here too. The CPU reads for free, so this
measures the extra work of computing without reads, not GPU time (unmeasured).
Prints one JSON line per mode and repeat, then one with the medians and ratios to
``default``.

    python benchmarks/sync_free_cost.py                       # width 0.25, 16x16, batch 4, K = 8
    python benchmarks/sync_free_cost.py --width 0.125 --image-size 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
import warnings


def _iteration(snn, frames, seed):
    import torch
    out = snn(frames, seed=seed)
    grads = torch.autograd.grad(out.sum(), [p for p in snn.parameters() if p.requires_grad])
    return out.detach(), grads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.25, help="VGG-7 channel multiplier")
    ap.add_argument("--image-size", type=int, default=16, help="image side, a multiple of 8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--max-steps", type=int, default=100_000,
                    help="forward steps per pass at most (a full-width VGG-7 pass at K = 8 takes ~17,000)")
    args = ap.parse_args(argv)
    for name in ("width", "batch", "K", "repeats", "threads", "max_steps"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")

    import torch

    import asynctrain as at
    from asynctrain import engine, plan
    from asynctrain.models import vgg7

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = vgg7(width=args.width, image_size=args.image_size)
    cfg = at.SimConfig(policy="RS", K=args.K, theta=0.2, tau=float("inf"), surrogate_steepness=2.0,
                       refractory_dropout=0.7, readout="potential", fill_slots=True,
                       max_steps=args.max_steps)
    g = torch.Generator().manual_seed(1)
    small = torch.rand(1, args.batch, 3, args.image_size // 4, args.image_size // 4, generator=g)
    frames = torch.nn.functional.interpolate(small[0], size=args.image_size, mode="bilinear")[None]
    modes = {"default": dict(sync_free=False), "dense": dict(sync_free=True, steps="whole"),
             "listed": dict(sync_free=True)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    ref = None
    made = []  # the engines built, to report whether the listed steps ran
    init = engine.Engine.__init__

    def recording_init(self, *a, **kw):
        init(self, *a, **kw)
        made.append(self)

    engine.Engine.__init__ = recording_init
    for r in range(args.repeats):
        for mode, choices in modes.items():
            snn = at.AsyncSNN(net, cfg, backend="torch").train()
            with warnings.catch_warnings(), plan.forced(**choices):
                warnings.simplefilter("ignore", RuntimeWarning)
                t0 = time.perf_counter()
                out, grads = _iteration(snn, frames, seed=3)
                dt = time.perf_counter() - t0
            used = any(e.plan.steps == "listed" for e in made)
            made.clear()
            if ref is None:
                ref = (out, grads)
            same = torch.equal(out, ref[0]) and all(torch.equal(a, b) for a, b in zip(grads, ref[1]))
            times[mode].append(dt)
            print(json.dumps(dict(mode=mode, repeat=r, seconds=round(dt, 3), same_as_default=same, listed=used,
                                  forward_steps=int(snn.stats["forward_steps"].sum()))), flush=True)
    engine.Engine.__init__ = init
    med = {m: statistics.median(v) for m, v in times.items()}
    print(json.dumps(dict(summary=True, date=datetime.date.today().isoformat(), machine=platform.processor()
                          or platform.machine(), threads=args.threads, width=args.width,
                          image_size=args.image_size, batch=args.batch, K=args.K,
                          max_steps=args.max_steps, median_seconds={m: round(v, 3) for m, v in med.items()},
                          ratio_to_default={m: round(v / med["default"], 2) for m, v in med.items()})))


if __name__ == "__main__":
    main()
