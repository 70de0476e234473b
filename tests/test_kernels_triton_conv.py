"""Triton conv/rows deliver kernels against their torch twins, and a conv network on
backend="triton" against backend="torch" (twins; the 2x tolerance rule).

Where the tests run: as in tests/test_kernels_triton.py (tests/interpreter_child.py);
``test_cuda_*`` run the compiled kernels on a GPU at VGG-7-like sizes and skip with
the reason when there is none (`make gpu-check` runs them with ``-k cuda``).

Comparison rules:
- received counts and whole-model spike counts and stats: exact;
- currents and gradients: fp64 within 1e-12; fp32 within 2x the error of the twin
  against an fp64 evaluation, plus a floor of 8 ulp of the largest magnitude (the
  kernel and the twin sum a target's contributions in different orders);
- whole model (fp32): weight gradients within 1e-5 x max(1, |grad|) of the torch
  backend's (measured: at most 1.2e-7).

Cases: odd map sizes (5x7, 1x1, pooled 5x7 -> 2x3 whose last row and column reach
nobody, 2x2 -> 1x1), channels in/out 1, 3, 8 and 130 (three channel-out blocks), entries
at every corner, overlapping windows and duplicate sources in one sample, zero values
(counted, no current), a sample with no entry, several entry blocks, empty entry
lists, int32 indices, float32 and float64, buffers that already hold currents.
Segments (the sync-free path): tests/test_kernels_triton_segments.py.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from asynctrain.kernels import conv_deliver as conv_mod  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from conftest import dyadic_  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402
from asynctrain.kernels.conv_deliver import (conv_deliver_backward_torch,  # noqa: E402
                                             conv_deliver_backward_triton, conv_deliver_torch,
                                             conv_deliver_triton)
from asynctrain.kernels.rows_deliver import (rows_deliver_backward_torch,  # noqa: E402
                                             rows_deliver_backward_triton, rows_deliver_torch,
                                             rows_deliver_triton)

F32, F64 = torch.float32, torch.float64
INTERPRETED = is_interpreted(conv_mod._conv_deliver_kernel)




def assert_fp(tri: torch.Tensor, twin: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """fp64: 1e-12; fp32: within 2x the twin's error against fp64 (+ 8 ulp floor)."""
    assert tri.dtype == twin.dtype and tri.shape == twin.shape, what
    if tri.dtype == F64:
        assert torch.allclose(tri, twin, atol=1e-12, rtol=1e-12), \
            f"{what}: max |diff| {(tri - twin).abs().max().item():.3g}"
        return
    err_tri = (tri.double() - exact).abs().max().item() if tri.numel() else 0.0
    err_twin = (twin.double() - exact).abs().max().item() if tri.numel() else 0.0
    floor = 8 * torch.finfo(F32).eps * max(exact.abs().max().item() if tri.numel() else 0.0, 1e-30)
    assert err_tri <= 2 * err_twin + floor, f"{what}: error {err_tri:.3g} vs twin {err_twin:.3g}"


# --- cases ----------------------------------------------------------------------------------
B = 3           # the last sample gets no entry
OFFSET = 5      # targets start after 5 columns; 2 more columns follow them (the dump among them)


def _entries(in_shape, n_random, seed, dtype):
    """(vals [E], sample [E], src [E]) of a source layer `in_shape` = (C, H, W): every
    corner of the first and last channel (sample 0), a 3x3 cluster around the centre
    plus a duplicate of the centre (sample 1: overlapping windows), `n_random` random
    sources in samples 0 and 1; every 5th value is 0 (a barrier message)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = in_shape
    idx = lambda ch, y, x: ch * h * w + y * w + x  # noqa: E731
    corners = [idx(ch, y, x) for ch in sorted({0, c - 1}) for y in sorted({0, h - 1}) for x in sorted({0, w - 1})]
    cy, cx = h // 2, w // 2
    cluster = [idx(0, y, x) for y in range(max(cy - 1, 0), min(cy + 2, h))
               for x in range(max(cx - 1, 0), min(cx + 2, w))] + [idx(0, cy, cx)]
    rand = torch.randint(0, c * h * w, (n_random,), generator=g).tolist()
    src = torch.tensor(corners + cluster + rand, dtype=torch.int64)
    sample = torch.tensor([0] * len(corners) + [1] * len(cluster)
                          + torch.randint(0, B - 1, (n_random,), generator=g).tolist(), dtype=torch.int64)
    vals = torch.randn(len(src), generator=g, dtype=F64)
    vals[::5] = 0.0
    return vals.to(dtype), sample, src


def _buffers(width, seed, dtype):
    """[B, width] current and int32 counts that already hold something (the kernels add)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, width, generator=g, dtype=F64).to(dtype),
            torch.randint(0, 4, (B, width), generator=g, dtype=torch.int32))


def _run_forward(fn, vals, sample, src, weight, in_shape, pool, current, counts):
    cur, cnt = current.clone(), counts.clone()
    fn(vals, sample, src, weight, in_shape, pool, OFFSET, cur, cnt)
    return cur, cnt


def _check_forward(tri_fn, twin_fn, vals, sample, src, weight, in_shape, pool, width, seed):
    current, counts = _buffers(width, seed, vals.dtype)
    got = _run_forward(tri_fn, vals, sample, src, weight, in_shape, pool, current, counts)
    want = _run_forward(twin_fn, vals, sample, src, weight, in_shape, pool, current, counts)
    exact = _run_forward(twin_fn, vals.double(), sample, src, weight.double(), in_shape, pool,
                         current.double(), counts)
    assert torch.equal(got[1], want[1]), "received counts"
    assert_fp(got[0], want[0], exact[0], "current")
    return got


def _check_backward(tri_fn, twin_fn, vals, sample, src, weight, in_shape, pool, width, seed,
                    modes=(False, True, True)):
    """Compare each run (`modes`: the deterministic flag of each) with the twin; two
    deterministic runs must agree bitwise. Returns the first run's gradients."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(B, width, generator=g, dtype=F64).to(vals.dtype)
    want = twin_fn(grad, vals, sample, src, weight, in_shape, pool, OFFSET)
    exact = twin_fn(grad.double(), vals.double(), sample, src, weight.double(), in_shape, pool, OFFSET)
    runs = []
    for det in modes:
        got = tri_fn(grad, vals, sample, src, weight, in_shape, pool, OFFSET, deterministic=det)
        runs.append(got)
        for name, a, t, e in zip(("grad_vals", "grad_weight"), got, want, exact):
            assert_fp(a, t, e, f"{name} (deterministic={det})")
    det_runs = [r for r, det in zip(runs, modes) if det]
    assert all(torch.equal(a, b) for r in det_runs[1:] for a, b in zip(r, det_runs[0])), \
        "deterministic mode is not"
    return runs[0]


# --- conv deliver ---------------------------------------------------------------------------
# (C_in, C_out, H, W, pool): one pixel (only the centre tap); 5x7 both ways round the
# channel counts; pooled 5x7 -> 2x3 (the last row and column reach nobody); 2x2 pooled to
# 1x1; C_out = 130: three channel-out blocks of 64 (2 live in the last).
CONV_SHAPES = [(1, 1, 1, 1, False), (3, 8, 5, 7, False), (8, 3, 5, 7, True), (1, 3, 2, 2, True),
               (3, 130, 3, 4, False)]


def _conv_case(c_in, c_out, h, w, pool, seed, dtype, n_random=20):
    vals, sample, src = _entries((c_in, h, w), n_random, seed, dtype)
    g = torch.Generator().manual_seed(seed + 100)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=F64).to(dtype)
    hp, wp = (h // 2, w // 2) if pool else (h, w)
    return vals, sample, src, weight, (c_in, h, w), pool, OFFSET + c_out * hp * wp + 2


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("c_in,c_out,h,w,pool", CONV_SHAPES)
def test_conv_deliver_forward(c_in, c_out, h, w, pool, dtype):
    case = _conv_case(c_in, c_out, h, w, pool, seed=c_in + c_out + h, dtype=dtype)
    cur, cnt = _check_forward(conv_deliver_triton, conv_deliver_torch, *case, seed=1)
    assert (cnt[-1] == _buffers(case[-1], 1, dtype)[1][-1]).all(), "the sample with no entry got counts"
    assert (cnt[:, :OFFSET] == _buffers(case[-1], 1, dtype)[1][:, :OFFSET]).all(), "counts before the layer"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("c_in,c_out,h,w,pool", CONV_SHAPES)
def test_conv_deliver_backward(c_in, c_out, h, w, pool, dtype):
    case = _conv_case(c_in, c_out, h, w, pool, seed=c_in + c_out + h + 1, dtype=dtype)
    grad_vals, grad_w = _check_backward(conv_deliver_backward_triton, conv_deliver_backward_torch, *case,
                                        seed=2)
    assert grad_w.abs().sum() > 0 and grad_vals.abs().sum() > 0


def test_conv_deliver_several_entry_blocks_and_int32_indices(monkeypatch):
    # ~300 entries in tiles of 16 entries x 16 channels (19 entry blocks), int64 then int32
    # indices (the engine's records); then ~40 entries in tiles of 8 entries x 2 channels
    # (5 entry blocks and two channel-out blocks over C_out = 3, the second half empty).
    vals, sample, src, *rest = _conv_case(3, 3, 5, 7, True, seed=7, dtype=F32, n_random=280)
    assert conv_mod._blocks(len(vals), 3) == (16, 16)
    _check_forward(conv_deliver_triton, conv_deliver_torch, vals, sample, src, *rest, seed=3)
    _check_backward(conv_deliver_backward_triton, conv_deliver_backward_torch, vals, sample, src, *rest,
                    seed=4, modes=(False, True))
    args = (vals, sample.int(), src.int(), *rest)
    _check_forward(conv_deliver_triton, conv_deliver_torch, *args, seed=3)
    _check_backward(conv_deliver_backward_triton, conv_deliver_backward_torch, *args, seed=4, modes=(False,))
    monkeypatch.setattr(conv_mod, "_NARROW", (8, 2))
    monkeypatch.setattr(conv_mod, "_WIDE", (8, 2))
    case = _conv_case(3, 3, 5, 7, True, seed=8, dtype=F32, n_random=20)
    assert conv_mod._blocks(len(case[0]), 3) == (8, 2)
    _check_forward(conv_deliver_triton, conv_deliver_torch, *case, seed=3)
    _check_backward(conv_deliver_backward_triton, conv_deliver_backward_torch, *case, seed=4,
                    modes=(False, True))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_conv_deliver_empty_entries(dtype):
    vals, sample, src, weight, in_shape, pool, width = _conv_case(3, 8, 5, 7, False, seed=0, dtype=dtype)
    empty = (vals[:0], sample[:0], src[:0])
    current, counts = _buffers(width, 0, dtype)
    cur, cnt = _run_forward(conv_deliver_triton, *empty, weight, in_shape, pool, current, counts)
    assert torch.equal(cur, current) and torch.equal(cnt, counts)
    gv, gw = conv_deliver_backward_triton(current, *empty, weight, in_shape, pool, OFFSET)
    assert gv.shape == (0,) and gv.dtype == dtype and torch.equal(gw, torch.zeros_like(weight))


def test_conv_deliver_zero_values_count_but_add_nothing():
    # a barrier message (value 0) at a corner: 4 targets per channel counted, no current
    weight = torch.randn(2, 1, 3, 3, dtype=F64)
    current, counts = torch.zeros(1, 14, dtype=F64), torch.zeros(1, 14, dtype=torch.int32)
    one = torch.zeros(1, dtype=torch.int64)
    conv_deliver_triton(torch.zeros(1, dtype=F64), one, one, weight, (1, 2, 2), False, 5, current, counts)
    assert torch.equal(current, torch.zeros_like(current))
    assert counts.tolist() == [[0] * 5 + [1] * 8 + [0]]


# --- rows deliver ---------------------------------------------------------------------------
# (in_shape, pool, M): one feature; a flat layer; pooled odd 5x7 (last row/col dropped);
# a flattened image without pooling; M = 300: two target blocks of 256.
ROWS_SHAPES = [((1,), False, 1), ((7,), False, 5), ((3, 5, 7), True, 4), ((2, 4, 6), False, 3),
               ((8, 3, 2), True, 300)]


def _rows_case(in_shape, pool, m, seed, dtype):
    image = in_shape if len(in_shape) == 3 else (1, 1, in_shape[0])
    vals, sample, src = _entries(image, 20, seed, dtype)
    c, h, w = image
    f = c * (h // 2) * (w // 2) if pool else c * h * w
    g = torch.Generator().manual_seed(seed + 100)
    weight = torch.randn(m, f, generator=g, dtype=F64).to(dtype)
    return vals, sample, src, weight, in_shape, pool, OFFSET + m + 2


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("in_shape,pool,m", ROWS_SHAPES)
def test_rows_deliver_forward(in_shape, pool, m, dtype):
    case = _rows_case(in_shape, pool, m, seed=m + len(in_shape), dtype=dtype)
    _check_forward(rows_deliver_triton, rows_deliver_torch, *case, seed=5)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("in_shape,pool,m", ROWS_SHAPES)
def test_rows_deliver_backward(in_shape, pool, m, dtype):
    case = _rows_case(in_shape, pool, m, seed=m + len(in_shape) + 1, dtype=dtype)
    grad_vals, grad_w = _check_backward(rows_deliver_backward_triton, rows_deliver_backward_torch, *case,
                                        seed=6)
    assert grad_w.abs().sum() > 0 and grad_vals.abs().sum() > 0


def test_rows_deliver_int32_indices_and_empty_entries():
    vals, sample, src, weight, in_shape, pool, width = _rows_case((3, 5, 7), True, 4, seed=9, dtype=F32)
    args = (vals, sample.int(), src.int(), weight, in_shape, pool, width)
    _check_forward(rows_deliver_triton, rows_deliver_torch, *args, seed=7)
    _check_backward(rows_deliver_backward_triton, rows_deliver_backward_torch, *args, seed=8)
    current, counts = _buffers(width, 0, F32)
    cur, cnt = _run_forward(rows_deliver_triton, vals[:0], sample[:0], src[:0], weight, in_shape, pool,
                            current, counts)
    assert torch.equal(cur, current) and torch.equal(cnt, counts)
    gv, gw = rows_deliver_backward_triton(current, vals[:0], sample[:0], src[:0], weight, in_shape, pool,
                                          OFFSET)
    assert gv.shape == (0,) and torch.equal(gw, torch.zeros_like(weight))


# --- launcher validation ----------------------------------------------------------------------
def test_launchers_name_the_bad_argument():
    vals, sample, src, weight, in_shape, pool, width = _conv_case(3, 8, 5, 7, False, seed=0, dtype=F32)
    current, counts = _buffers(width, 0, F32)
    with pytest.raises(TypeError, match=r"weight must have dtype in \['torch.float32'\], got torch.float64"):
        conv_deliver_triton(vals, sample, src, weight.double(), in_shape, pool, OFFSET, current, counts)
    with pytest.raises(ValueError, match=r"in_shape must be \(C_in=3, H, W\)"):
        conv_deliver_triton(vals, sample, src, weight, (4, 5, 7), pool, OFFSET, current, counts)
    with pytest.raises(ValueError, match="out_offset 9 .* do not fit in a buffer of width 287"):
        conv_deliver_triton(vals, sample, src, weight, in_shape, pool, 9, current, counts)
    with pytest.raises(TypeError, match="counts must have dtype"):
        conv_deliver_triton(vals, sample, src, weight, in_shape, pool, OFFSET, current, counts.long())
    with pytest.raises(ValueError, match="current is written in place and must be contiguous"):
        conv_deliver_triton(vals, sample, src, weight, in_shape, pool, OFFSET, current.t().contiguous().t(),
                            counts)
    with pytest.raises(ValueError, match=r"src must have shape \[38\], got \[37\]"):
        conv_deliver_backward_triton(current, vals, sample, src[1:], weight, in_shape, pool, OFFSET)
    with pytest.raises(TypeError, match="grad_current must have dtype"):
        conv_deliver_backward_triton(current.double(), vals, sample, src, weight, in_shape, pool, OFFSET)
    vals, sample, src, weight, in_shape, pool, width = _rows_case((3, 5, 7), True, 4, seed=0, dtype=F32)
    current, counts = _buffers(width, 0, F32)
    with pytest.raises(ValueError, match=r"weight has 18 input features but in_shape \(3, 5, 6\)"):
        rows_deliver_triton(vals, sample, src, weight, (3, 5, 6), False, OFFSET, current, counts)
    with pytest.raises(TypeError, match="sample must have dtype"):
        rows_deliver_backward_triton(current, vals, sample.float(), src, weight, in_shape, pool, OFFSET)


# --- ImageSynapses and the whole model ----------------------------------------------------------
def test_image_synapses_pick_the_backend_kernels():
    from asynctrain import backends, conv
    assert conv._kernels(None)["conv"][0] is conv_deliver_torch
    assert conv._kernels(backends.TORCH)["fc"][1] is rows_deliver_backward_torch
    for det in (False, True):
        k = conv._kernels(backends.resolve("triton", torch.device("cpu"), deterministic=det))
        assert k["conv"][0] is conv_deliver_triton and k["fc"][0] is rows_deliver_triton
        assert k["conv"][1].func is conv_deliver_backward_triton and k["conv"][1].keywords == {"deterministic": det}
        assert k["fc"][1].func is rows_deliver_backward_triton and k["fc"][1].keywords == {"deterministic": det}


def _model():
    """2x4x5 -> conv 3 (4x5) -> pool -> conv 2 (2x2, pooled conv map) -> pool -> flatten
    -> 3 (pooled rows map): every image map kind but unpooled rows, with enough gain
    that spikes reach the output."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(2),
                        nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        for m in net:
            if hasattr(m, "weight"):
                fan_in = m.weight[0].numel()
                m.weight.copy_((0.9 * torch.randn(m.weight.shape, generator=g, dtype=F64) + 0.5)
                               * (3.0 / fan_in) ** 0.5)
    frames = (torch.rand(1, 2, 2, 4, 5, generator=g) < 0.4).float()
    return net, frames


# (policy, K, other knobs, deterministic, checkpoint_every): the checkpointed backward
# (ImageSynapses.deliver_backward) and, with checkpoint_every=0, plain autograd through
# every step (_ImageDeliver); the deterministic weight gradients once.
MODEL_CASES = {
    "RS-K1": ("RS", 1, dict(network_dropout=0.1), False, None),
    "RS-K4-autograd": ("RS", 4, {}, False, 0),
    "MS-K1-deterministic": ("MS", 1, dict(momentum_noise=0.1), True, None),
    "MS-K4": ("MS", 4, dict(refractory_dropout=0.5), False, None),
    "RS-K6-fill": ("RS", 6, dict(fill_slots=True), False, None),
    "MS-K6-fill-autograd": ("MS", 6, dict(fill_slots=True), True, 0),
    "RS-K3-fire-or-last": ("RS", 3, dict(surrogate_at="fire_or_last", network_dropout=0.1), False, None),
    "MS-K3-fire-or-last-autograd": ("MS", 3, dict(surrogate_at="fire_or_last"), False, 0),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_conv_model_triton_equals_torch(case):
    _compare_model(case, torch.device("cpu"))


def _compare_model(case, dev, dyadic=False):
    import asynctrain as at
    policy, k, knobs, det, ckpt = MODEL_CASES[case]
    cfg = at.SimConfig(K=k, policy=policy, theta=0.3, tau=20.0, **knobs)
    net, frames = _model()
    if dyadic:
        dyadic_(net)
    net, frames = net.to(dev), frames.to(dev)
    lw = torch.linspace(-1, 1, 3, device=dev)
    runs = []
    for backend in ("torch", "triton"):
        snn = at.AsyncSNN(net, cfg, backend=backend, deterministic=det, checkpoint_every=ckpt,
                          input_shape=(2, 4, 5)).train()
        out = snn(frames, seed=5)
        (out * lw).sum().backward()
        runs.append((out.detach(), snn.stats, [m.weight.grad.clone() for m in net if hasattr(m, "weight")]))
        net.zero_grad()
    (out_t, st_t, g_t), (out_x, st_x, g_x) = runs
    assert torch.equal(out_x, out_t), "output spike counts"
    for key in ("forward_steps", "synops", "hidden_spikes", "spikes_processed"):
        assert torch.equal(st_x[key], st_t[key]), key
    assert out_t.sum() > 0 and int(st_t["forward_steps"].max()) > 3
    for l, (a, b) in enumerate(zip(g_x, g_t)):
        assert b.abs().sum() > 0, f"layer {l} got no gradient"
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), f"layer {l} weight gradient"


# --- CUDA (compiled kernels; `make gpu-check`) ---------------------------------------------
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1 at import)")
    return torch.device("cuda")


def _on(dev, fn):
    """`fn` with its tensor arguments moved to `dev` and its results brought back."""
    def run(*args, **kwargs):
        out = fn(*[a.to(dev) if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
        return None if out is None else tuple(t.cpu() for t in out)
    return run


def _on_inplace(dev, fn):
    def run(vals, sample, src, weight, in_shape, pool, offset, current, counts):
        cur, cnt = current.to(dev), counts.to(dev)
        fn(vals.to(dev), sample.to(dev), src.to(dev), weight.to(dev), in_shape, pool, offset, cur, cnt)
        current.copy_(cur.cpu())
        counts.copy_(cnt.cpu())
    return run


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind,in_shape,out,pool", [("conv", (128, 32, 32), 128, False),
                                                     ("conv", (128, 32, 32), 256, True),
                                                     ("conv", (3, 31, 33), 5, True),
                                                     ("rows", (256, 8, 8), 1024, True)])
def test_cuda_conv_and_rows_deliver(kind, in_shape, out, pool, dtype):
    # VGG-7-like maps, ~1500 entries (B = 3 here: overlapping windows in two samples)
    dev = _cuda_or_skip()
    vals, sample, src = _entries(in_shape, 1500, seed=out, dtype=dtype)
    c, h, w = in_shape
    hp, wp = (h // 2, w // 2) if pool else (h, w)
    g = torch.Generator().manual_seed(out)
    if kind == "conv":
        weight = torch.randn(out, c, 3, 3, generator=g, dtype=F64).to(dtype)
        width, fns = OFFSET + out * hp * wp + 2, (conv_deliver_triton, conv_deliver_torch,
                                                  conv_deliver_backward_triton, conv_deliver_backward_torch)
    else:
        weight = torch.randn(out, c * hp * wp, generator=g, dtype=F64).to(dtype)
        width, fns = OFFSET + out + 2, (rows_deliver_triton, rows_deliver_torch,
                                        rows_deliver_backward_triton, rows_deliver_backward_torch)
    case = (vals, sample, src, weight, in_shape, pool, width)
    _check_forward(_on_inplace(dev, fns[0]), fns[1], *case, seed=1)
    _check_backward(_on(dev, fns[2]), fns[3], *case, seed=2)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_cuda_conv_model_triton_equals_torch(case):
    # Both backends add currents with float atomics on CUDA (the kernels, torch's
    # index_add_), in an order that changes from run to run; with dyadic weights every
    # sum is exact in any order, so equal spike counts cannot be a matter of luck.
    _compare_model(case, _cuda_or_skip(), dyadic=True)


wrap_tests(globals(), interpreted=INTERPRETED, keep=('test_cuda',))
