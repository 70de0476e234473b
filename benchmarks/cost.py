"""End-to-end cost of one training iteration (forward + backward + Adam).

Models (input Bernoulli spikes, xavier init, the paper's hyper-parameters, SPEC 10):
  shd-like     350 -> 128-128-128 -> 20, batch 32, T=20, p=0.03 (SHD settings)
  shd700-like  the same with 700 inputs (time per step vs network width)
  nmnist-like  2312 -> 64-64-64 -> 10, batch 64, T=10, p=0.02 (N-MNIST settings)
  tiny         20 -> 16-16 -> 5, batch 2, T=2 (a smoke test: `gpu_check.sh --dry-run`)
Implementations: `layered` (AsyncSNN policy="layered"), `engine` (AsyncSNN, RS/MS at
several K, default backend: on a CPU the fused C steps of backend="cpu"),
`engine-torch` (the same with backend="torch", per-op tensor ops, at K=8),
`engine-fill` / `engine-torch-fill` (the same with ``fill_slots=True``: the cost of
slot filling, SPEC 8; `--fill-slots` measures only those against their plain
points) and `dense` (benchmarks/dense_baseline.py: the paper's per-step algorithm, batched: a
dense matmul over the whole network and a full argsort per step).

Each point runs in two fresh subprocesses, one thread. Time: the median of --repeat
iterations after one warm-up. Memory (a second process, so peak memory is its own):
the peak resident set during two iterations minus the resident set of the built
model and data; there glibc is told to return freed blocks at once, so RSS follows
live tensors -- that slows small allocations, so time is never measured in it. Prints one
JSON line per point, then a table of ratios measured in this run.

    python benchmarks/cost.py                 # all points (~5 min on 2 cores)
    python benchmarks/cost.py --quick         # fewer points
    python benchmarks/cost.py --fill-slots    # fill_slots=True against plain, shd-like
    python benchmarks/cost.py --device cuda   # on a GPU (peak = max_memory_allocated)
    python benchmarks/cost.py --points shd:layered:-:1,shd:engine:MS:8 --width-pairs 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

MODELS = {
    "shd": dict(sizes=[350, 128, 128, 128, 20], batch=32, T=20, p=0.03,
                cfg=dict(theta=0.3, tau=100.0, dt=10.0, surrogate_steepness=10.0, input_dropout=0.2,
                         refractory_dropout=0.8, momentum_noise=0.1), lr=7e-4, wd=1e-4),
    "shd700": dict(sizes=[700, 128, 128, 128, 20], batch=32, T=20, p=0.015,
                   cfg=dict(theta=0.3, tau=100.0, dt=10.0, surrogate_steepness=10.0, input_dropout=0.2,
                            refractory_dropout=0.8, momentum_noise=0.1), lr=7e-4, wd=1e-4),
    "nmnist": dict(sizes=[2312, 64, 64, 64, 10], batch=64, T=10, p=0.02,
                   cfg=dict(theta=0.3, tau=1.0, dt=10.0, surrogate_steepness=2.0, input_dropout=0.25,
                            refractory_dropout=0.8, momentum_noise=1e-6), lr=5e-4, wd=1e-5),
    "tiny": dict(sizes=[20, 16, 16, 5], batch=2, T=2, p=0.3,
                 cfg=dict(theta=0.3, tau=100.0, dt=10.0, refractory_dropout=0.5, momentum_noise=0.1), lr=1e-3,
                 wd=0.0),
}
IMPLS = ("layered", "engine", "engine-torch", "engine-fill", "engine-torch-fill", "dense")


def parse_points(text: str) -> list[tuple[str, str, str, int]]:
    """``model:impl:policy:K,...`` (policy ``-`` for layered) -> point tuples."""
    pts = []
    for item in text.split(","):
        parts = item.split(":")
        ok = len(parts) == 4 and parts[0] in MODELS and parts[1] in IMPLS and parts[3].isdigit() \
            and int(parts[3]) >= 1 and (parts[2] in ("RS", "MS") or parts[1] == "layered")
        if not ok:
            raise ValueError(f"--points entries are model:impl:policy:K with model in {sorted(MODELS)}, impl "
                             f"in {IMPLS}, policy RS or MS (- for layered), K >= 1; got {item!r}")
        pts.append((parts[0], parts[1], parts[2], int(parts[3])))
    return pts


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_point(model: str, impl: str, policy: str, k: int, repeat: int, device: str,
              what: str = "time") -> dict:
    """One measurement, in this process."""
    import torch

    import asynctrain as at
    sys.path.insert(0, str(HERE))
    from dense_baseline import DenseSNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = MODELS[model]
    sizes = spec["sizes"]
    net = torch.nn.Sequential(*[torch.nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:])])
    for m in net:
        torch.nn.init.xavier_uniform_(m.weight)
    net = net.to(device)
    fill = impl.endswith("-fill")
    cfg = at.SimConfig(forward_group_size=k, policy="layered" if impl == "layered" else policy,
                       fill_slots=fill, **spec["cfg"])
    backend = "torch" if impl.startswith("engine-torch") else "auto"
    mod = DenseSNN(net, cfg) if impl == "dense" else at.AsyncSNN(net, cfg, backend=backend)
    mod.train()
    opt = torch.optim.Adam(net.parameters(), lr=spec["lr"], weight_decay=spec["wd"])
    frames = (torch.rand(spec["T"], spec["batch"], sizes[0]) < spec["p"]).float().to(device)
    labels = torch.randint(0, sizes[-1], (spec["batch"],)).to(device)
    cuda = device.startswith("cuda")

    def iteration(seed: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = mod(frames, seed=seed)
        loss = torch.nn.functional.cross_entropy(out.sum(0), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if what == "memory":
        for i in range(2):
            iteration(i)
        peak = torch.cuda.max_memory_allocated() if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return dict(mem_growth_mb=(peak - base) / 2**20)
    times = [iteration(i) for i in range(repeat + 1)][1:]
    steps = mod.stats["forward_steps"]
    batch_steps = int(steps.max(1).values.sum())  # the batch advances until its slowest sample
    med = statistics.median(times)
    if impl.startswith("engine"):
        backend = at.backends.resolve(backend, frames.device).name
    return dict(model=model, impl=impl, backend=backend if impl != "dense" else "-",
                policy="layered" if impl == "layered" else policy, K=k,
                time_s=med, time_p20_s=sorted(times)[max(0, len(times) // 5)],
                time_p80_s=sorted(times)[min(len(times) - 1, (4 * len(times)) // 5)],
                steps_per_pass=float(steps.float().mean()),
                batch_steps=batch_steps, time_per_step_ms=1e3 * med / batch_steps,
                repeat=repeat, device=device)


def points(quick: bool, fill: bool = False) -> list[tuple[str, str, str, int]]:
    if fill:  # fill_slots against the plain engine (fused C steps), and on the torch ops
        pts = [("shd", impl, pol, k) for pol in ("RS", "MS") for k in (64, 8)
               for impl in ("engine", "engine-fill")]
        return pts + [("shd", "engine-torch", "MS", 8), ("shd", "engine-torch-fill", "MS", 8)]
    ks = (64, 8) if quick else (64, 32, 16, 8)
    pts = []
    for model in ("shd", "nmnist"):
        pts.append((model, "layered", "-", 1))
        for pol in ("RS", "MS"):
            pts += [(model, "engine", pol, k) for k in ks]
        pts.append((model, "engine-torch", "MS", 8))
        pts.append((model, "dense", "MS", 8))
    pts += [("shd", "engine-torch", "RS", 8), ("shd", "dense", "RS", 8), ("shd", "dense", "MS", 64),
            ("shd700", "engine", "MS", 8), ("shd700", "dense", "MS", 8)]
    return pts


def meta() -> dict:
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), commit=commit)


def ratios(rows: list[dict]) -> list[tuple[str, float | None]]:
    def get(model, impl, policy, k):
        for r in rows:
            if (r["model"], r["impl"], r["policy"], r["K"]) == (model, impl, policy, k):
                return r
        return None

    out = []

    def add(name, a, b, key):
        out.append((name, a[key] / b[key] if a and b and b[key] else None))

    for pol in ("MS", "RS"):
        add(f"shd {pol} K=8: dense / engine time (target >= 5)", get("shd", "dense", pol, 8),
            get("shd", "engine", pol, 8), "time_s")
        add(f"shd {pol} K=8 / K=64 engine memory (target <= 1.5)", get("shd", "engine", pol, 8),
            get("shd", "engine", pol, 64), "mem_growth_mb")
        add(f"shd {pol} K=8 engine / layered time", get("shd", "engine", pol, 8),
            get("shd", "layered", "layered", 1), "time_s")
        add(f"shd {pol} K=8: backend torch / default time", get("shd", "engine-torch", pol, 8),
            get("shd", "engine", pol, 8), "time_s")
    add("nmnist MS K=8: dense / engine time", get("nmnist", "dense", "MS", 8),
        get("nmnist", "engine", "MS", 8), "time_s")
    add("nmnist MS K=8: backend torch / default time", get("nmnist", "engine-torch", "MS", 8),
        get("nmnist", "engine", "MS", 8), "time_s")
    add("nmnist MS K=8 / K=64 engine memory", get("nmnist", "engine", "MS", 8),
        get("nmnist", "engine", "MS", 64), "mem_growth_mb")
    add("shd MS dense memory K=8 / K=64 (paper's doubling)", get("shd", "dense", "MS", 8),
        get("shd", "dense", "MS", 64), "mem_growth_mb")
    add("engine time/step 700 / 350 inputs (target < 1.3)", get("shd700", "engine", "MS", 8),
        get("shd", "engine", "MS", 8), "time_per_step_ms")
    add("dense time/step 700 / 350 inputs", get("shd700", "dense", "MS", 8),
        get("shd", "dense", "MS", 8), "time_per_step_ms")
    for pol, k, impl in (("RS", 64, "engine"), ("RS", 8, "engine"), ("MS", 64, "engine"), ("MS", 8, "engine"),
                         ("MS", 8, "engine-torch")):
        if get("shd", impl + "-fill", pol, k) is None:
            continue
        for key, what in (("time_s", "time"), ("mem_growth_mb", "memory")):
            add(f"shd {pol} K={k} {impl}: fill_slots / plain {what}", get("shd", impl + "-fill", pol, k),
                get("shd", impl, pol, k), key)
    return out


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", choices=("mlp", "vgg7"), default="mlp")
    chosen, rest = pre.parse_known_args()
    if chosen.model == "vgg7":  # VGG-7 / CIFAR-10: its own points and options (cost_vgg7.py)
        import cost_vgg7
        sys.argv = [cost_vgg7.__file__, *rest]
        cost_vgg7.main()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mlp", "vgg7"), default="mlp",
                    help="mlp: the models below; vgg7: benchmarks/cost_vgg7.py (see its --help)")
    ap.add_argument("--quick", action="store_true", help="K in {64, 8} only")
    ap.add_argument("--points", help="only these points: model:impl:policy:K,... (overrides --quick)")
    ap.add_argument("--fill-slots", action="store_true",
                    help="only fill_slots=True against plain (shd-like, K in {64, 8}); no width pairs")
    ap.add_argument("--repeat", type=int, default=5, help="timed iterations per point (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    ap.add_argument("--width-pairs", type=int, default=5,
                    help="alternating shd/shd700 engine timings for the width ratio (median)")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # model:impl:policy:K, run in-process
    ap.add_argument("--what", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {a.repeat}")
    if a.width_pairs < 0:
        ap.error(f"--width-pairs must be >= 0, got {a.width_pairs}")
    try:
        chosen_points = parse_points(a.points) if a.points else points(a.quick, a.fill_slots)
    except ValueError as e:
        ap.error(str(e))
    if a.point:
        model, impl, policy, k = a.point.split(":")
        print(json.dumps(run_point(model, impl, policy, int(k), a.repeat, a.device, a.what)))
        return
    info = meta()
    env_time = dict(os.environ, OMP_NUM_THREADS="1")
    env_mem = dict(env_time, MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")
    rows = []

    def emit(record: dict) -> None:  # one JSON line on stdout and, with --out, in the file
        line = json.dumps(record)
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    if a.fill_slots:
        a.width_pairs = 0
    for model, impl, policy, k in chosen_points:
        row = dict(info)
        for what, env in (("time", env_time), ("memory", env_mem)):
            r = subprocess.run([sys.executable, __file__, "--point", f"{model}:{impl}:{policy}:{k}",
                                "--repeat", str(a.repeat), "--device", a.device, "--what", what],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"point {model}:{impl}:{policy}:{k} ({what}) failed:\n{r.stderr}")
            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
        rows.append(row)
        emit(row)
    # Time per step vs input width: the two engine points again, alternating, so that
    # both see the same machine load; the median of the per-pair ratios is reported.
    pair_ratios = []
    for _ in range(a.width_pairs):
        per = {}
        for model in ("shd", "shd700"):
            r = subprocess.run([sys.executable, __file__, "--point", f"{model}:engine:MS:8", "--repeat",
                                str(a.repeat), "--device", a.device], capture_output=True, text=True,
                               env=env_time)
            if r.returncode:
                sys.exit(f"width pair point {model} failed:\n{r.stderr}")
            per[model] = json.loads(r.stdout.strip().splitlines()[-1])["time_per_step_ms"]
        pair_ratios.append(per["shd700"] / per["shd"])
        emit(dict(info, width_pair=True, shd_ms_per_step=per["shd"], shd700_ms_per_step=per["shd700"],
                  ratio=pair_ratios[-1]))
    print(f"\n{'model':8} {'impl':12} {'backend':7} {'policy':8} {'K':>4} {'time s':>8} {'mem MB':>8} "
          f"{'steps/pass':>10} {'ms/step':>8}")
    for r in rows:
        print(f"{r['model']:8} {r['impl']:12} {r['backend']:7} {r['policy']:8} {r['K']:>4} {r['time_s']:8.3f} "
              f"{r['mem_growth_mb']:8.1f} {r['steps_per_pass']:10.2f} {r['time_per_step_ms']:8.2f}")
    print()
    for name, v in ratios(rows):
        if a.fill_slots and v is None:
            continue
        print(f"{name:60} {'n/a' if v is None else f'{v:.2f}'}")
    if pair_ratios:
        print(f"{'engine time/step 700 / 350, median of ' + str(len(pair_ratios)) + ' alternating pairs':60} "
              f"{statistics.median(pair_ratios):.2f}  ({', '.join(f'{x:.2f}' for x in pair_ratios)})")


if __name__ == "__main__":
    main()
