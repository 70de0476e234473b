"""Cost of one VGG-7 / CIFAR-10 training iteration (forward + backward + Adam) at
several K, against the dense per-step baseline (`dense_baseline.py`).

Model and settings: `asynctrain.models.vgg7` (229,386 neurons), the recipe's
configuration (recipes/cifar_vgg7.py: IF neurons, theta 0.2, steepness 2, refractory
dropout 0.7, prioritized analog input, potential readout, RS), batch 8 on CPU.
Inputs are smooth random 32x32x3 images in [0, 1] (bilinear upsampling of 8x8 noise:
no CIFAR-10 on the benchmark machine); the spike density they cause with the default
initialisation is reported with each point.

Each point runs in two processes, as in cost.py: one timed with the default
allocator, one for memory (peak = growth of the process's maximum resident set during
the iteration, with glibc returning freed blocks at once, which slows it down; on
CUDA, ``max_memory_allocated``). ``--single`` measures both in one process with the
default allocator (for the long points: at K = 8 a VGG-7 pass takes ~17,000 forward
steps); its peak also counts what glibc keeps but does not reuse, an upper bound. One
iteration per point: the first, so the engine's per-network tables are built inside
it (a few ms against seconds per iteration).

    python benchmarks/cost_vgg7.py                      # engine K=512,64,8 + dense K=512
    python benchmarks/cost_vgg7.py --points engine:512,engine:64 --batch 4
    python benchmarks/cost_vgg7.py --width 0.25         # a narrower VGG-7 (quick look)
    python benchmarks/cost_vgg7.py --width 0.0625 --image-size 8 --points engine:8 --single  # smoke test

Target: peak memory at K=8 at most 2x that at K=512.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_POINTS = "engine:512,engine:64,engine:8,dense:512"
CIFAR_TRAIN = 50_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_point(impl: str, k: int, batch: int, width: float, device: str, seed: int,
              image_size: int = 32) -> dict:
    import torch

    import asynctrain as at
    from asynctrain.models import vgg7
    sys.path.insert(0, str(HERE))
    from dense_baseline import DenseSNN

    warnings.simplefilter("ignore", RuntimeWarning)  # capped passes are reported below
    torch.manual_seed(seed)
    net = vgg7(width=width, image_size=image_size).to(device)
    graph = at.Network.from_module(net)
    theta = torch.full((graph.n_neurons,), 0.2)
    theta[-graph.n_outputs:] = 1e9  # the recipe's non-spiking readout
    cfg = at.SimConfig(forward_group_size=k, policy="RS", prioritize_input=True, stop="spiking_done",
                       max_steps=math.ceil(2 * (graph.n_neurons + graph.n_inputs) / k) + 10,
                       refractory=True, refractory_dropout=0.7, tau=math.inf, theta=theta, dt=1.0,
                       surrogate_steepness=2.0, readout="potential")
    mod = DenseSNN(net, cfg) if impl == "dense" else at.AsyncSNN(net, cfg)
    mod.train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(seed)
    frames = torch.nn.functional.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=image_size,
                                             mode="bilinear").reshape(1, batch, -1).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    t0 = time.perf_counter()
    out = mod(frames, seed=seed)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(out[-1], labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = mod.stats["forward_steps"]
    row = dict(impl=impl, K=k, batch=batch, width=width, image_size=image_size, device=device,
               time_s=t2 - t0, forward_s=t1 - t0, backward_s=t2 - t1,
               peak_mem_mb=(peak - base) / 2**20, steps_per_pass=float(steps.float().mean()),
               batch_steps=int(steps.max(1).values.sum()), n_neurons=graph.n_neurons)
    if impl == "engine":
        st = mod.stats
        row.update(density=float(st["hidden_spikes"].float().mean()) / graph.n_hidden,
                   synops_per_sample=float(st["synops"].float().sum(0).mean()),
                   capped_passes=int(st["capped_passes"]))
    row["epoch_estimate_h"] = row["time_s"] * CIFAR_TRAIN / batch / 3600
    return row


def meta(device: str) -> dict:
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else \
        (platform.processor() or platform.machine())
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                machine=name, cpus=os.cpu_count(), threads=torch.get_num_threads(), commit=commit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=DEFAULT_POINTS, help="impl:K list, impl in {engine, dense}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=float, default=1.0, help="VGG-7 channel multiplier")
    ap.add_argument("--image-size", type=int, default=32, help="image side (a multiple of 8; CIFAR-10: 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--single", action="store_true",
                    help="one process per point, default allocator (peak RSS is an upper bound)")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # impl:K, run in-process
    a = ap.parse_args()
    if a.batch < 1 or a.width <= 0:
        ap.error("--batch must be >= 1 and --width > 0")
    if a.point:
        impl, k = a.point.split(":")
        print(json.dumps(run_point(impl, int(k), a.batch, a.width, a.device, a.seed, a.image_size)))
        return
    points = []
    for p in a.points.split(","):
        impl, _, k = p.partition(":")
        if impl not in ("engine", "dense") or not k.isdigit() or int(k) < 1:
            ap.error(f"--points entries are engine:K or dense:K with K >= 1, got {p!r}")
        points.append((impl, int(k)))
    env_mem = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")
    info = meta(a.device)
    rows = []
    for impl, k in points:
        row = dict(info, single_process=a.single)
        for what, env in (("time", os.environ),) if a.single else (("time", os.environ), ("memory", env_mem)):
            r = subprocess.run([sys.executable, __file__, "--point", f"{impl}:{k}", "--batch", str(a.batch),
                                "--width", str(a.width), "--device", a.device, "--seed", str(a.seed),
                                "--image-size", str(a.image_size)],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"point {impl}:{k} ({what}) failed:\n{r.stderr[-4000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            if what == "memory" and not a.single:
                res = dict(peak_mem_mb=res["peak_mem_mb"])
            row.update(res)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    print(f"\n{'impl':7} {'K':>4} {'time s':>8} {'fwd s':>8} {'bwd s':>8} {'peak MB':>9} {'steps':>7} "
          f"{'density':>8} {'epoch h':>8}")
    for r in rows:
        print(f"{r['impl']:7} {r['K']:>4} {r['time_s']:8.1f} {r['forward_s']:8.1f} {r['backward_s']:8.1f} "
              f"{r['peak_mem_mb']:9.0f} {r['steps_per_pass']:7.0f} {r.get('density', float('nan')):8.3f} "
              f"{r['epoch_estimate_h']:8.1f}")
    by = {(r["impl"], r["K"]): r for r in rows}
    e512, e8, d512 = by.get(("engine", 512)), by.get(("engine", 8)), by.get(("dense", 512))
    if e512 and e8:
        ratio = e8["peak_mem_mb"] / e512["peak_mem_mb"]
        print(f"engine peak memory K=8 / K=512: {ratio:.2f} (target <= 2)")
    if e512 and d512:
        print(f"dense / engine at K=512: time {d512['time_s'] / e512['time_s']:.2f}, "
              f"memory {d512['peak_mem_mb'] / e512['peak_mem_mb']:.2f}")


if __name__ == "__main__":
    main()
