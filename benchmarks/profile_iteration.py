"""One profiled training iteration per case: wall time, time per forward step, the GPU's
busy fraction and launches per forward step from torch.profiler, the top kernels.

    python benchmarks/profile_iteration.py --device cuda --out profile.jsonl        # gpu_check.sh's profile stage
    python benchmarks/profile_iteration.py --device cuda --cases vgg7-K8 --max-steps 300
    TRITON_INTERPRET=1 python benchmarks/profile_iteration.py --device cpu --tiny   # the dry run (CPU, tiny sizes)

Cases: the shd-like MLP (350-128-128-128-20, batch 32, T = 20, RS, K = 8),
a wide MLP (700-1024-1024-1024-20, batch 256, T = 20, RS, K = 8) and VGG-7 (batch 64,
one analog frame, the CIFAR recipe's settings) at K = 512, 64 and 8. Passes are capped
(``--max-steps``, SimConfig.max_steps; default 200 steps for VGG-7 at K <= 64, whose
full passes take ~2,000 and ~17,000 steps at random initialisation) so that every
case fits its stage; the per-step figures do not need whole passes.

Each case runs one warm-up iteration (a short one: max_steps 16, so every kernel is
compiled before the profile), then one iteration (forward, checkpointed backward,
Adam step) timed and profiled. One JSON line per case: ``wall_s``, ``forward_steps``
(the batch's steps: each pass advances until its slowest sample), ``ms_per_step``
(wall time / steps: forward + recompute + backward), ``gpu_busy`` (the union of the
device's kernel, memcpy and memset intervals over the wall time; CUDA only),
``kernels_per_step`` (device kernels run per forward step), ``launch_calls_per_step``
(the host's kernel-launch API calls: CUDA runtime and driver, Triton's included),
``top_kernels`` (by total device time). A case that fails writes its error and the
next one runs. On the CPU (the dry run) the profiler sees no device: the GPU fields
are null, the rest is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MLP_CFG = dict(theta=0.3, tau=100.0, dt=10.0, surrogate_steepness=10.0, input_dropout=0.2, refractory_dropout=0.8,
               momentum_noise=0.1)
CASES = {
    "shd-mlp": dict(sizes=[350, 128, 128, 128, 20], batch=32, T=20, p=0.03, K=8),
    "wide-mlp": dict(sizes=[700, 1024, 1024, 1024, 20], batch=256, T=20, p=0.015, K=8),
    "vgg7-K512": dict(vgg=True, batch=64, K=512),
    "vgg7-K64": dict(vgg=True, batch=64, K=64, max_steps=200),
    "vgg7-K8": dict(vgg=True, batch=64, K=8, max_steps=200),
}
TINY = dict(sizes=[20, 16, 16, 5], batch=2, T=2, p=0.3, width=1 / 16, image_size=8, max_steps=8)
_LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaLaunchCooperativeKernel")


def _build(name: str, spec: dict, device: str, tiny: bool, max_steps: int | None):
    import torch

    import asynctrain as at
    from asynctrain.models import mlp, vgg7
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if spec.get("vgg"):
        width, size = (TINY["width"], TINY["image_size"]) if tiny else (1.0, 32)
        batch = TINY["batch"] if tiny else spec["batch"]
        net = vgg7(width=width, image_size=size)
        graph = at.Network.from_module(net)
        theta = torch.full((graph.n_neurons,), 0.2)
        theta[-graph.n_outputs:] = 1e9  # the recipe's non-spiking readout
        full = math.ceil(2 * (graph.n_neurons + graph.n_inputs) / spec["K"]) + 10
        cap = max_steps or (TINY["max_steps"] if tiny else spec.get("max_steps"))
        cfg = at.SimConfig(forward_group_size=spec["K"], policy="RS", prioritize_input=True, stop="spiking_done",
                           max_steps=min(full, cap) if cap else full, refractory=True, refractory_dropout=0.7,
                           tau=math.inf, theta=theta, dt=1.0, surrogate_steepness=2.0, readout="potential")
        frames = torch.nn.functional.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=size,
                                                 mode="bilinear").reshape(1, batch, -1)
        n_out = 10
    else:
        sizes = TINY["sizes"] if tiny else spec["sizes"]
        batch, T = (TINY["batch"], TINY["T"]) if tiny else (spec["batch"], spec["T"])
        net = mlp(sizes=sizes)
        for m in net:
            torch.nn.init.xavier_uniform_(m.weight)
        cap = max_steps or (TINY["max_steps"] if tiny else None)
        cfg = at.SimConfig(forward_group_size=spec["K"], policy="RS", **MLP_CFG,
                           **(dict(max_steps=cap) if cap else {}))
        frames = (torch.rand(T, batch, sizes[0], generator=g) < (TINY["p"] if tiny else spec["p"])).float()
        n_out = sizes[-1]
    net = net.to(device)
    labels = torch.randint(0, n_out, (frames.shape[1],), generator=g).to(device)
    return net, cfg, frames.to(device), labels


def _busy_us(events) -> float:
    """Length of the union of [start, end) intervals (us)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def run_case(name: str, device: str, tiny: bool, max_steps: int | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import asynctrain as at
    spec = CASES[name]
    net, cfg, frames, labels = _build(name, spec, device, tiny, max_steps)
    snn = at.AsyncSNN(net, cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    cuda = device.startswith("cuda")

    def iteration(snn_, seed):
        out = snn_(frames, seed=seed)
        logits = out[-1] if cfg.readout == "potential" else out.sum(0)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warnings.simplefilter("ignore", RuntimeWarning)  # capped passes: on purpose
    with snn.configured(max_steps=min(16, cfg.max_steps)):  # compile every kernel outside the profile
        iteration(snn, 1)
    if cuda:
        torch.cuda.synchronize()
    # CUDA: the device's kernels and the host's launch calls (no per-op CPU events:
    # hundreds of thousands in a VGG-7 iteration, slow to collect)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        iteration(snn, 2)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    steps = int(snn.stats["forward_steps"].max(1).values.sum())
    row = dict(case=name, K=spec["K"], device=device, tiny=tiny, batch=int(frames.shape[1]),
               max_steps=int(cfg.max_steps), capped_passes=int(snn.stats["capped_passes"]), wall_s=round(wall, 4),
               forward_steps=steps, ms_per_step=round(1e3 * wall / max(steps, 1), 4),
               gpu_busy=None, kernels_per_step=None, launch_calls_per_step=None, top_kernels=None)
    events = prof.events()
    calls = sum(1 for e in events if e.name in _LAUNCH_CALLS)
    if cuda:
        dev = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in dev if not e.name.startswith(("Memcpy", "Memset"))]
        totals: dict[str, list] = {}
        for e in kernels:
            t = totals.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.end - e.time_range.start
        top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:10]
        row.update(gpu_busy=round(_busy_us(dev) / (wall * 1e6), 4),
                   kernels_per_step=round(len(kernels) / max(steps, 1), 2),
                   launch_calls_per_step=round(calls / max(steps, 1), 2),
                   top_kernels=[dict(name=n[:80], count=c, ms=round(us / 1e3, 3)) for n, (c, us) in top])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every pass at this many forward steps")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"unknown cases {bad}; known: {list(CASES)}")
    failed = 0
    for name in names:
        try:
            row = run_case(name, args.device, args.tiny, args.max_steps)
        except Exception as e:  # the next case still runs
            failed += 1
            row = dict(case=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
