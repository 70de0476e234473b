"""Microbenchmarks: each per-step kernel against its torch twin (the twins the tests use).

Grid: forward group size K in {1, 8, 64, 512} x fan-out F in {64, 1024, 4096} for
deliver (forward, backward with atomics, backward deterministic); K for select (F
plays no part); the keyed select on a VGG-7-wide row, staged against streamed;
one point per width for LIF (forward, backward) and the counter-hash uniforms
(neither sees K nor F). Batch B (default 32) and width W = N + 1 (default
8193) are flags. Conv networks: conv deliver (forward, backward with atomics, backward
deterministic) at K for two VGG-7-like maps (128x32x32 -> 128 channels; 128x32x32
pooled -> 256 channels at 16x16) and rows deliver for a pooled 256x8x8 -> 1024 linear
map; their entries are B x K sources of the one map, and W is the map's own width.

On CUDA: `triton.testing.do_bench` quantiles (median, p20, p80, ms), the effective
bandwidth (the bytes a kernel must move at least, over the median time) against the
device's DRAM peak, and the peak memory of one call above what its inputs hold. Each
Triton point is also checked against the twin (`check`: selections equal, else the
max |diff|), so a GPU run doubles as a correctness smoke test at sizes the
interpreter cannot reach. On CPU only the twins run (the kernels need CUDA):
repeated wall-clock medians, one thread pool as torch sets it.

`fused_steps` (CUDA only): a whole no-grad call of an shd-like MLP on the fused
Triton steps, with the persistent forward kernel's launches per forward step.

One JSON line per point (stdout, and appended to --out), each with torch/triton
versions, device name, git commit and date.

    python benchmarks/kernels.py                       # CUDA if available, else CPU twins
    python benchmarks/kernels.py --device cpu --quick  # small grid, a few seconds
    python benchmarks/kernels.py --device cuda --out results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from asynctrain.kernels.conv_deliver import (conv_deliver_backward_torch,  # noqa: E402
                                             conv_deliver_backward_triton, conv_deliver_torch,
                                             conv_deliver_triton)
from asynctrain.kernels.deliver import (deliver_backward_torch, deliver_backward_triton,  # noqa: E402
                                        deliver_torch, deliver_triton)
from asynctrain.kernels.lif import lif_backward_torch, lif_backward_triton, lif_torch, lif_triton  # noqa: E402
from asynctrain.kernels.rows_deliver import (rows_deliver_backward_torch,  # noqa: E402
                                             rows_deliver_backward_triton, rows_deliver_torch,
                                             rows_deliver_triton)
from asynctrain.kernels.rng_triton import uniform_at_torch, uniform_at_triton  # noqa: E402
from asynctrain.kernels import select_keyed  # noqa: E402
from asynctrain.kernels.select import select_torch, select_triton  # noqa: E402

KS = (1, 8, 64, 512)
FANOUTS = (64, 1024, 4096)
# (C_in, H, W, C_out, pool): VGG-7-like conv maps; (C, H, W, M, pool): its first linear map
CONV_MAPS = ((128, 32, 32, 128, False), (128, 32, 32, 256, True))
ROWS_MAPS = ((256, 8, 8, 1024, True),)


def meta(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(bench="kernels", torch=torch.__version__, triton=triton_version, device=name,
                git_commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def dram_peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        from triton.testing import get_dram_gbps
        return float(get_dram_gbps(device.index or 0))
    except Exception:  # driver utils unavailable: report bandwidth without a peak
        return None


# --- inputs -------------------------------------------------------------------------------
def select_inputs(b, w, dev, g):
    pending = torch.rand(b, w, device=dev, generator=g) < 0.3
    pending[:, -1] = False
    return pending, torch.rand(b, w, device=dev, generator=g)


def deliver_inputs(b, k, w, f, dev, g):
    table = torch.randn(w, f, device=dev, generator=g)
    targets = torch.randint(0, w - 1, (w, f), device=dev, generator=g)
    sel = torch.randint(0, w - 1, (b, k), device=dev, generator=g)
    vals = torch.randn(b, k, device=dev, generator=g)
    vals[torch.rand(b, k, device=dev, generator=g) < 0.25] = 0.0
    grad = torch.randn(b, w, device=dev, generator=g)
    return vals, sel, table, targets, grad


def image_inputs(b, k, n_src, n_out, dev, g):
    """B x K entries of one source layer (about a quarter zero-valued), a fresh-buffer
    forward caller, and a [B, width] gradient; targets start at n_src."""
    e = b * k
    sample = torch.arange(b, device=dev).repeat_interleave(k)
    src = torch.randint(0, n_src, (e,), device=dev, generator=g)
    vals = torch.randn(e, device=dev, generator=g)
    vals[torch.rand(e, device=dev, generator=g) < 0.25] = 0.0
    width = n_src + n_out + 1
    grad = torch.randn(b, width, device=dev, generator=g)

    def forward(fn, weight, in_shape, pool):
        current = torch.zeros(b, width, device=dev)
        counts = torch.zeros(b, width, dtype=torch.int32, device=dev)
        fn(vals, sample, src, weight, in_shape, pool, n_src, current, counts)
        return current, counts
    return vals, sample, src, grad, width, forward


def lif_inputs(b, w, dev, g):
    v, cur, gvn, gs = (torch.randn(b, w, device=dev, generator=g) for _ in range(4))
    refr, recv, gate = (torch.rand(b, w, device=dev, generator=g) < p for p in (0.2, 0.7, 0.6))
    theta = torch.full((w,), 0.3, device=dev)
    return v, cur, refr, recv, gate, theta, gvn, gs


# --- points ------------------------------------------------------------------------------
def points(a, dev):
    """Yield (kernel, params, bytes, {impl: fn}, check) per point; fns take no args."""
    g = torch.Generator(device=dev).manual_seed(0)
    b, w = a.batch, a.width
    ks, fans = ((1, 8, 64), (64, 1024)) if a.quick else (KS, FANOUTS)
    ks, fans = a.ks or ks, a.fanouts or fans
    pending, keys = select_inputs(b, w, dev, g)
    for k in ks:
        kk = min(k, w)
        fns = {"torch": lambda k=k: select_torch(pending, keys, k),
               "triton": lambda k=k: select_triton(pending, keys, k)}
        yield "select", dict(B=b, W=w, K=k), b * w * 5 + b * kk * 8, fns, _check_select
    for k in ks:
        for f in fans:
            params = dict(B=b, W=w, K=k, F=f)
            if dev.type == "cpu" and max(b * k * f, w * f) > a.max_cpu_elems:
                yield "deliver", dict(params, skipped=f"B*K*F or W*F > --max-cpu-elems {a.max_cpu_elems}"), \
                    0, {}, None
                continue
            vals, sel, table, targets, grad = deliver_inputs(b, k, w, f, dev, g)
            gathered = b * k * f * (4 + 8)  # a weight and a target per fan-out entry
            yield "deliver", params, b * k * 12 + gathered + b * k * f * 4 + b * w * 4, {
                "torch": lambda: deliver_torch(vals, sel, table, targets),
                "triton": lambda: deliver_triton(vals, sel, table, targets)}, _check_close
            yield "deliver_backward", params, b * k * 12 + gathered + b * k * f * 8 + b * w * 4, {
                "torch": lambda: deliver_backward_torch(grad, vals, sel, table, targets),
                "triton": lambda: deliver_backward_triton(grad, vals, sel, table, targets),
                "triton_deterministic": lambda: deliver_backward_triton(grad, vals, sel, table, targets,
                                                                        deterministic=True)}, _check_close
            del vals, sel, table, targets, grad
    yield from keyed_points(a, dev, g)
    yield from image_points(a, dev, g, ks)
    v, cur, refr, recv, gate, theta, gvn, gs = lif_inputs(b, w, dev, g)
    yield "lif", dict(B=b, W=w), b * w * (4 * 2 + 3 + 4 * 3), {
        "torch": lambda: lif_torch(v, cur, refr, recv, gate, theta),
        "triton": lambda: lif_triton(v, cur, refr, recv, gate, theta)}, _check_close
    v_pre = lif_torch(v, cur, refr, recv, gate, theta)[2]
    yield "lif_backward", dict(B=b, W=w), b * w * (4 * 3 + 3 + 4 * 2), {
        "torch": lambda: lif_backward_torch(gvn, gs, v_pre, refr, recv, gate, theta, 2.0, False),
        "triton": lambda: lif_backward_triton(gvn, gs, v_pre, refr, recv, gate, theta, 2.0, False)}, _check_close
    rows = torch.arange(b, device=dev)[:, None]
    cols = torch.arange(w, device=dev)[None, :]
    yield "uniform_at", dict(B=b, W=w), b * w * 4, {
        "torch": lambda: uniform_at_torch(1, 2, 3, 4, rows, cols),
        "triton": lambda: uniform_at_triton(1, 2, 3, 4, rows, cols)}, _check_close


def _streamed(pending, values, is_input, k):
    """The keyed select as it was before the staged path (one program per row, an
    int64 scratch row re-read per radix round): the baseline of the same run."""
    cap = select_keyed._STAGED_MAX_KK
    select_keyed._STAGED_MAX_KK = 0
    try:
        return select_keyed.select_keyed_triton(pending, values, is_input, k, 1, 2, 3, policy_ms=True)
    finally:
        select_keyed._STAGED_MAX_KK = cap


def keyed_points(a, dev, g):
    """The keyed select (MS keys computed in the kernel) on a whole-state row
    (default: VGG-7's 229,387 columns, batch 64, 30 % pending): the staged path
    ("triton") against the streamed one ("triton_streamed") and the twin. Bytes: the
    flags and potentials read once, the selection written."""
    b, w = a.keyed_batch, a.keyed_width
    pending, values = select_inputs(b, w, dev, g)
    is_input = torch.zeros(w, dtype=torch.bool, device=dev)
    is_input[:w // 100] = True
    for k in a.keyed_ks:
        kk = min(k, w)
        call = dict(policy_ms=True)
        yield "select_keyed", dict(B=b, W=w, K=k, staged=select_keyed.staged_plan(w, kk) is not None), \
            b * w * 5 + b * kk * 8, {
                "torch": lambda k=k: select_keyed.select_keyed_torch(pending, values, is_input, k, 1, 2, 3, **call),
                "triton": lambda k=k: select_keyed.select_keyed_triton(pending, values, is_input, k, 1, 2, 3,
                                                                       **call),
                "triton_streamed": lambda k=k: _streamed(pending, values, is_input, k)}, _check_select


def image_points(a, dev, g, ks):
    """Conv and rows deliver points (see the module doc). Bytes: per reached target a
    weight read and a current and a count read-modify-write (forward), a gradient and a
    weight read and a weight-gradient read-modify-write (backward); per entry its value
    and indices; the forward's fresh [B, W] buffers."""
    b = a.batch
    maps = [("conv", m) for m in CONV_MAPS] + [("rows", m) for m in ROWS_MAPS]
    impls = {"conv": (conv_deliver_torch, conv_deliver_triton, conv_deliver_backward_torch,
                      conv_deliver_backward_triton),
             "rows": (rows_deliver_torch, rows_deliver_triton, rows_deliver_backward_torch,
                      rows_deliver_backward_triton)}
    for kind, (c, h, w, n, pool) in maps:
        hp, wp = (h // 2, w // 2) if pool else (h, w)
        if kind == "conv":
            weight = torch.randn(n, c, 3, 3, device=dev, generator=g) * 0.05
            n_out, per_entry = n * hp * wp, n * 9
        else:
            weight = torch.randn(n, c * hp * wp, device=dev, generator=g) * 0.05
            n_out, per_entry = n, n
        fwd_t, fwd_x, bwd_t, bwd_x = impls[kind]
        for k in ks:
            params = dict(B=b, K=k, C_in=c, H=h, W_map=w, out=n, pool=pool)
            if dev.type == "cpu" and b * k * per_entry > a.max_cpu_elems:
                yield f"{kind}_deliver", dict(params, skipped=f"B*K*targets > --max-cpu-elems {a.max_cpu_elems}"), \
                    0, {}, None
                continue
            vals, sample, src, grad, width, forward = image_inputs(b, k, c * h * w, n_out, dev, g)
            args = (vals, sample, src, weight, (c, h, w), pool)
            targets, entries = b * k * per_entry, b * k * (4 + 8 + 8)
            yield f"{kind}_deliver", dict(params, W=width), entries + targets * 20 + b * width * 8, {
                "torch": lambda f=fwd_t, args=args: forward(f, *args[3:]),
                "triton": lambda f=fwd_x, args=args: forward(f, *args[3:])}, _check_close
            yield f"{kind}_deliver_backward", dict(params, W=width), entries + targets * 16, {
                "torch": lambda f=bwd_t, args=args: f(grad, *args, width - n_out - 1),
                "triton": lambda f=bwd_x, args=args: f(grad, *args, width - n_out - 1),
                "triton_deterministic": lambda f=bwd_x, args=args: f(grad, *args, width - n_out - 1,
                                                                     deterministic=True)}, _check_close
            del vals, sample, src, grad


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check_select(got, want):
    same = [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]
    return "equal" if same else "DIFFERENT"


def _check_close(got, want):
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(_as_tuple(got), _as_tuple(want)))


# --- timing ------------------------------------------------------------------------------
def time_cuda(fn) -> tuple[dict, int]:
    from triton.testing import do_bench
    fn()  # compile / warm caches
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80), peak


def time_cpu(fn, repeat: int) -> dict:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
    return dict(median_ms=statistics.median(ts), p20_ms=q[1], p80_ms=q[7])


def fused_rows(a, dev) -> list[dict]:
    """The persistent forward kernel (kernels/steps_triton.py) inside a whole call:
    an shd-like MLP [350, 128, 128, 128, 20], T = 5 frames, no grad, MS at K in
    {8, 64}. Reports the wall-clock median of the call, the forward steps it took
    (per pass, the most any sample took), the forward launches of the fused kernel
    and their ratio (target: >= 10 steps per launch), and whether the output counts
    equal backend='torch'. CUDA only (the interpreter says nothing about speed)."""
    if dev.type != "cuda":
        return [dict(kernel="fused_steps", impl="triton", skipped="needs CUDA")]
    from asynctrain import AsyncSNN, SimConfig
    from asynctrain.kernels import steps_triton

    g = torch.Generator().manual_seed(0)
    sizes = [350, 128, 128, 128, 20]
    net = torch.nn.Sequential(*[torch.nn.Linear(n, m, bias=False) for n, m in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for m in net:
            # multiples of 2**-10: backend='torch' adds currents with float atomics on CUDA
            # (scatter_add_), in an order that changes; dyadic sums are exact in any order,
            # so `check` (equal counts) is not a matter of luck
            w = 0.3 * torch.randn(m.weight.shape, generator=g) + 0.05
            m.weight.copy_(torch.round(w * 1024) / 1024)
    net = net.to(dev)
    frames = (torch.rand(5, a.batch, sizes[0], generator=g) < 0.05).float().to(dev)
    rows = []
    for k in (8, 64):
        cfg = SimConfig(policy="MS", forward_group_size=k, theta=0.3, tau=100.0, dt=10.0)
        launches = [0]
        orig = steps_triton.TritonSteps.forward_steps

        def counted(self, *args, _orig=orig):
            launches[0] += 1
            return _orig(self, *args)

        snn = AsyncSNN(net, cfg, backend="triton").eval()
        ref = AsyncSNN(net, cfg, backend="torch").eval()
        with torch.no_grad():
            want = ref(frames, seed=1)
            steps_triton.TritonSteps.forward_steps = counted
            try:
                def call():
                    out = snn(frames, seed=1)
                    torch.cuda.synchronize()
                    return out
                got = call()
                n_launch = launches[0]
                timing = time_cpu(call, a.repeat)
            finally:
                steps_triton.TritonSteps.forward_steps = orig
        steps = int(snn.stats["forward_steps"].max(1).values.sum())
        rows.append(dict(kernel="fused_steps", impl="triton", B=a.batch, K=k, sizes=sizes, T=5, **timing,
                         forward_steps=steps, launches=n_launch,
                         steps_per_launch=round(steps / max(1, n_launch), 2),
                         check=bool(torch.equal(got, want))))
    return rows


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints >= 1, got {text!r}")
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=8193, help="W = N + 1 (neurons and inputs, plus the dump)")
    ap.add_argument("--quick", action="store_true", help="K in {1, 8, 64}, F in {64, 1024}")
    ap.add_argument("--ks", type=_int_list, help="K values (overrides --quick), e.g. 8,512")
    ap.add_argument("--fanouts", type=_int_list, help="deliver fan-outs F (overrides --quick), e.g. 1024,4096")
    ap.add_argument("--keyed-batch", type=int, default=64, help="batch of the keyed select points")
    ap.add_argument("--keyed-width", type=int, default=229_387,
                    help="row width of the keyed select points (default: VGG-7's whole state)")
    ap.add_argument("--keyed-ks", type=_int_list, default=[8, 64], help="K of the keyed select points")
    ap.add_argument("--repeat", type=int, default=5, help="CPU: timed calls per point")
    ap.add_argument("--max-cpu-elems", type=int, default=2**24,
                    help="CPU: skip deliver points with B*K*F (the twin gathers [B, K, F]) or the "
                         "[W, F] tables above this")
    ap.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    a = ap.parse_args()
    if a.batch < 1 or a.width < 2 or a.repeat < 1 or a.keyed_batch < 1 or a.keyed_width < 2:
        ap.error(f"need --batch, --keyed-batch >= 1, --width, --keyed-width >= 2, --repeat >= 1; got "
                 f"{a.batch}, {a.keyed_batch}, {a.width}, {a.keyed_width}, {a.repeat}")
    if a.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    info = meta(dev)
    peak_gbps = dram_peak_gbps(dev)
    out = open(a.out, "a") if a.out else None
    failures = 0
    for kernel, params, nbytes, fns, check in points(a, dev):
        impls = fns if dev.type == "cuda" else {k: v for k, v in fns.items() if k == "torch"}
        if not impls:
            impls = {"torch": None}
        want = fns["torch"]() if (dev.type == "cuda" and "torch" in fns) else None
        for impl, fn in impls.items():
            row = dict(info, kernel=kernel, impl=impl, **params)
            if fn is not None:
                try:
                    if dev.type == "cuda":
                        timing, peak = time_cuda(fn)
                        row.update(timing, peak_mem_bytes=peak)
                        if impl != "torch":
                            row["check"] = check(fn(), want)
                    else:
                        row.update(time_cpu(fn, a.repeat), peak_mem_bytes=None)
                    gbps = nbytes / (row["median_ms"] * 1e-3) / 1e9
                    row.update(min_bytes=nbytes, gbps=round(gbps, 2), peak_gbps=peak_gbps,
                               frac_of_peak=round(gbps / peak_gbps, 4) if peak_gbps else None)
                except Exception as e:  # one failing point must not hide the others
                    failures += 1
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
        del want
    try:
        fused = fused_rows(a, dev)
    except Exception as e:  # one failing point must not hide the others
        failures += 1
        fused = [dict(kernel="fused_steps", impl="triton", error=f"{type(e).__name__}: {e}"[:500])]
    for row in fused:
        line = json.dumps(dict(info, **row))
        print(line, flush=True)
        if out:
            out.write(line + "\n")
    if out:
        out.close()
    if failures:
        sys.exit(f"{failures} point(s) failed (see the 'error' fields)")


if __name__ == "__main__":
    main()
