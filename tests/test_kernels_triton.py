"""Triton kernels against their torch twins (every kernel has one; the 2x tolerance rule).

Where the tests run (tests/interpreter_child.py): every test here except
``test_cuda_*`` and ``test_compiled_*`` runs with the kernels interpreted, in this
process when Triton was imported with ``TRITON_INTERPRET=1``, else in one child
``pytest`` that reports each test's outcome back. ``test_cuda_*`` run the compiled
kernels on a GPU and skip with the reason when there is none (`make gpu-check` runs
them with ``-k cuda``).

Comparison rules:
- selections, spikes, LIF forward outputs and random numbers: exact;
- currents and gradients: fp64 within 1e-12; fp32 within 2x the error of the twin
  against an fp64 evaluation, plus a floor of 8 ulp of the largest magnitude (the
  twin and the kernel sum in different orders; with 1-2 terms per sum both are
  exact and the floor keeps the test from demanding bitwise equality).

Shapes span several program blocks (select streams rows wider than one block;
deliver splits F > 256 and K above its K-block; LIF rows of 2049 take 3 blocks) and
are odd or prime. Edge cases: ties, empty rows, k larger than the pending count and
than the width, -0.0 / +-inf keys, dump padding, duplicate sources, int32 indices.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain.kernels import deliver as deliver_mod  # noqa: E402
from asynctrain.kernels import select as select_mod  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402
from asynctrain.kernels.deliver import (deliver_backward_torch, deliver_backward_triton,  # noqa: E402
                                        deliver_torch, deliver_triton)
from asynctrain.kernels.lif import lif_backward_torch, lif_backward_triton, lif_torch, lif_triton  # noqa: E402
from asynctrain.kernels.rng_triton import uniform_at_torch, uniform_at_triton  # noqa: E402
from asynctrain.kernels.select import select_torch, select_triton  # noqa: E402

F32, F64 = torch.float32, torch.float64
INTERPRETED = is_interpreted(select_mod._select_kernel)




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_fp(tri: torch.Tensor, twin: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """fp64: 1e-12; fp32: within 2x the twin's error against fp64 (+ 8 ulp floor)."""
    assert tri.dtype == twin.dtype and tri.shape == twin.shape, what
    if tri.dtype == F64:
        assert torch.allclose(tri, twin, atol=1e-12, rtol=1e-12), \
            f"{what}: max |diff| {(tri - twin).abs().max().item():.3g}"
        return
    err_tri = (tri.double() - exact).abs().max().item()
    err_twin = (twin.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(F32).eps * max(exact.abs().max().item(), 1e-30)
    assert err_tri <= 2 * err_twin + floor, f"{what}: error {err_tri:.3g} vs twin {err_twin:.3g}"


# --- select -----------------------------------------------------------------------------
def _rows(sel: torch.Tensor) -> list[list[int]]:
    return [sorted(r) for r in sel.tolist()]


def _select_case(b: int, w: int, seed: int, levels: int = 9):
    """Coarse keys (many ties, some +-inf) and rows of densities 0 .. 1."""
    g = _gen(seed)
    keys = torch.randint(-(levels // 2), levels // 2 + 1, (b, w), generator=g).float() / 4
    keys[keys == 1] = math.inf
    keys[keys == -1] = -math.inf
    density = torch.linspace(0, 1, b)[:, None] if b > 1 else torch.full((1, 1), 0.5)
    pending = torch.rand(b, w, generator=g) < density
    pending[:, -1] = False
    return pending, keys


def _check_select(pending, keys, k):
    got = select_triton(pending, keys, k)
    want = select_torch(pending, keys, k)
    assert got.shape == want.shape and got.dtype == torch.int64
    assert _rows(got) == _rows(want), f"k={k}"


@pytest.mark.parametrize("k", [1, 8, 37, 300, 1000])
def test_select_one_block(k):
    # W = 257: one program holds the row; k = 300 and 1000 exceed the pending count
    # of most rows and k = 1000 the width itself.
    pending, keys = _select_case(5, 257, seed=k)
    _check_select(pending, keys, k)


@pytest.mark.parametrize("k", [1, 8, 64, 200])
def test_select_streams_rows_wider_than_a_block(monkeypatch, k):
    # The streaming path with blocks of 32 over a prime width of 211 (7 blocks): the
    # radix search, the tie ranks and the output positions all carry across blocks.
    monkeypatch.setattr(select_mod, "_ONE_BLOCK_MAX", 64)
    monkeypatch.setattr(select_mod, "_STREAM_BLOCK", 32)
    pending, keys = _select_case(4, 211, seed=k, levels=5)
    _check_select(pending, keys, k)


def test_select_real_stream_block_width():
    # The default streaming block (1024) over W = 5003: 5 blocks.
    pending, keys = _select_case(2, 5003, seed=3)
    for k in (8, 512):
        _check_select(pending, keys, k)


@pytest.mark.parametrize("one_block", [True, False])
def test_select_ties_straddling_blocks_go_to_lower_index(monkeypatch, one_block):
    if not one_block:
        monkeypatch.setattr(select_mod, "_ONE_BLOCK_MAX", 16)
        monkeypatch.setattr(select_mod, "_STREAM_BLOCK", 8)
    w = 41
    keys = torch.zeros(2, w)
    keys[0, [5, 30]] = 2.0  # two above the tie, then 38 tied pending entries
    keys[1] = -0.0
    keys[1, 17] = 0.0       # +0.0 and -0.0 tie (the twin maps -0.0 to +0.0)
    pending = torch.ones(2, w, dtype=torch.bool)
    pending[:, -1] = False
    pending[0, 3] = False
    for k in (1, 2, 3, 9, 20, 39, 40, 41):
        _check_select(pending, keys, k)
    assert _rows(select_triton(pending, keys, 9))[0] == [0, 1, 2, 4, 5, 6, 7, 8, 30]
    assert _rows(select_triton(pending, keys, 1))[1] == [0]


def test_select_extreme_keys_and_empty_rows():
    keys = torch.tensor([[-0.5, -math.inf, 2.0, -3.0, math.inf, 0.0, -1e-30, 1e-30, -0.0, 0.0],
                         [3.4e38, -3.4e38, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    pending = torch.ones_like(keys, dtype=torch.bool)
    pending[:, -1] = False
    for k in range(1, 11):
        _check_select(pending, keys, k)
    _check_select(torch.zeros_like(pending), keys, 4)  # nothing pending: all dump


def test_select_float64_keys_and_non_contiguous_inputs():
    pending, keys = _select_case(3, 129, seed=11)
    keys64 = keys.double() + 1e-12  # the twin ranks float32(keys) too
    _check_select(pending, keys64, 8)
    wide_p, wide_k = torch.cat([pending, pending], 1), torch.cat([keys, keys], 1)
    strided_p = wide_p[:, ::2].clone()
    strided_p[:, -1] = False
    _check_select(strided_p, wide_k[:, ::2], 7)


def test_select_degenerate_sizes():
    _check_select(torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1), 3)  # only the dump
    out = select_triton(torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, 5), 2)
    assert out.shape == (0, 2)


# --- deliver ----------------------------------------------------------------------------
def _deliver_case(b, k, w, f, seed, dtype):
    """Tables as the engine builds them (padding -> dump with weight 0, the dump row
    all padding), distinct sources per row with some dump slots of value 0, samples 0
    and 1 sharing their sources, one zero-valued live slot (a barrier message)."""
    g = _gen(seed)
    table = torch.randn(w, f, generator=g, dtype=F64)
    targets = torch.randint(0, w - 1, (w, f), generator=g)
    pad = torch.rand(w, f, generator=g) < 0.3
    targets[pad], table[pad] = w - 1, 0.0
    targets[-1], table[-1] = w - 1, 0.0
    sel = torch.stack([torch.randperm(w - 1, generator=g)[:k] for _ in range(b)])
    if b > 1:
        sel[0] = sel[1]
    vals = torch.randn(b, k, generator=g, dtype=F64)
    dump = torch.rand(b, k, generator=g) < 0.25
    sel[dump], vals[dump] = w - 1, 0.0
    if k > 1:
        vals[-1, 0] = 0.0
    grad = torch.randn(b, w, generator=g, dtype=F64)
    return vals.to(dtype), sel, table.to(dtype), targets, grad.to(dtype)


# (B, K, W, F): one element; a K-block and an F-block; F over 256 (2 F-blocks, K-block
# of 8); K over its block (F = 7 -> K-blocks of 256, K = 300 -> 2).
DELIVER_SHAPES = [(1, 1, 2, 1), (3, 8, 97, 37), (2, 19, 131, 300), (2, 300, 307, 7)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,k,w,f", DELIVER_SHAPES)
def test_deliver_forward(b, k, w, f, dtype):
    vals, sel, table, targets, _ = _deliver_case(b, k, w, f, seed=k + f, dtype=dtype)
    got = deliver_triton(vals, sel, table, targets)
    exact = deliver_torch(vals.double(), sel, table.double(), targets)
    assert_fp(got, deliver_torch(vals, sel, table, targets), exact, "current")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,k,w,f", DELIVER_SHAPES)
def test_deliver_backward(b, k, w, f, dtype, deterministic):
    vals, sel, table, targets, grad = _deliver_case(b, k, w, f, seed=k + f + 1, dtype=dtype)
    got = deliver_backward_triton(grad, vals, sel, table, targets, deterministic=deterministic)
    want = deliver_backward_torch(grad, vals, sel, table, targets)
    exact = deliver_backward_torch(grad.double(), vals.double(), sel, table.double(), targets)
    for name, a, t, e in zip(("grad_vals", "grad_weight_table"), got, want, exact):
        assert_fp(a, t, e, name)
    if b > 1:
        assert got[1][sel[1][vals[1] != 0]].abs().sum() > 0  # shared rows got gradient


def test_deliver_duplicates_int32_indices_and_reproducibility():
    # Duplicate sources in a sample (the engine never makes them, but dump padding
    # repeats and the kernels must stay linear), int32 indices (the engine's records).
    vals, _, table, targets, grad = _deliver_case(2, 4, 17, 5, seed=2, dtype=F64)
    sel = torch.tensor([[3, 3, 16, 16], [3, 7, 16, 7]])
    vals = torch.tensor([[0.5, 1.5, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]], dtype=F64)
    for s in (sel, sel.int()):
        assert_fp(deliver_triton(vals, s, table, targets), deliver_torch(vals, sel, table, targets),
                  None, "current")
        for det in (False, True):
            got = deliver_backward_triton(grad, vals, s, table, targets.int(), deterministic=det)
            for a, t in zip(got, deliver_backward_torch(grad, vals, sel, table, targets)):
                assert_fp(a, t, None, "gradient")
    a = deliver_backward_triton(grad, vals, sel, table, targets, deterministic=True)
    b = deliver_backward_triton(grad, vals, sel, table, targets, deterministic=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- LIF --------------------------------------------------------------------------------
def _lif_case(b, w, seed, dtype):
    g = _gen(seed)
    v = torch.randn(b, w, generator=g, dtype=F64) * 0.5
    cur = torch.randn(b, w, generator=g, dtype=F64) * 0.5
    refr = torch.rand(b, w, generator=g) < 0.2
    recv = torch.rand(b, w, generator=g) < 0.7
    gate = recv & (torch.rand(b, w, generator=g) < 0.8)
    theta = torch.rand(w, generator=g, dtype=F64) * 0.5
    theta[::7] = math.inf  # inputs and the dump never fire
    v[0, : min(w, 3)] = theta[: min(w, 3)].clamp(max=9) - cur[0, : min(w, 3)]  # V1 at theta exactly
    grads = [torch.randn(b, w, generator=g, dtype=F64) for _ in range(2)]
    return [t.to(dtype) for t in (v, cur)], (refr, recv, gate), theta.to(dtype), [t.to(dtype) for t in grads]


LIF_SHAPES = [(1, 1), (3, 7), (2, 2049)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,w", LIF_SHAPES)
def test_lif_forward_is_bitwise_equal(b, w, dtype):
    (v, cur), masks, theta, _ = _lif_case(b, w, seed=w, dtype=dtype)
    got, want = lif_triton(v, cur, *masks, theta), lif_torch(v, cur, *masks, theta)
    for name, a, t in zip(("v_new", "spikes", "v_pre"), got, want):
        assert a.dtype == t.dtype and torch.equal(a, t), name


@pytest.mark.parametrize("alpha,detach_reset,with_grad_spikes",
                         [(2.0, False, True), (10.0, True, True), (2.0, False, False), (10.0, True, False)])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,w", LIF_SHAPES)
@pytest.mark.parametrize("with_last", [False, True])
def test_lif_backward(b, w, dtype, alpha, detach_reset, with_grad_spikes, with_last):
    (v, cur), masks, theta, (gvn, gs) = _lif_case(b, w, seed=w + 1, dtype=dtype)
    v_pre = lif_torch(v, cur, *masks, theta)[2]
    gs = gs if with_grad_spikes else None
    # surrogate_at="fire_or_last": the evaluations that end their window
    last = torch.rand(b, w, generator=_gen(w + 2)) < 0.5 if with_last else None
    got = lif_backward_triton(gvn, gs, v_pre, *masks, theta, alpha, detach_reset, last)
    want = lif_backward_torch(gvn, gs, v_pre, *masks, theta, alpha, detach_reset, last)
    exact = lif_backward_torch(gvn.double(), None if gs is None else gs.double(), v_pre.double(), *masks,
                               theta.double(), alpha, detach_reset, last)
    for name, a, t, e in zip(("grad_v", "grad_current"), got, want, exact):
        assert_fp(a, t, e, name)


# --- rng ----------------------------------------------------------------------------------
@pytest.mark.parametrize("counters", [(0, 1, 0, 0), (2**31 - 2, 5, 17, 123), (123456, 3, 9, 2**20)])
def test_uniform_at_is_bit_exact(counters):
    g = _gen(counters[0] % 1000)
    index = torch.randint(0, 2**31 - 1, (1, 3001), generator=g)
    index[0, :3] = torch.tensor([0, 1, 2**31 - 2])
    rows = torch.arange(5)[:, None]
    got = uniform_at_triton(*counters, rows, index)
    assert got.dtype == F32 and got.shape == (5, 3001)
    assert torch.equal(got, uniform_at_torch(*counters, rows, index))
    pairs = (torch.rand(7, 11, generator=g) < 0.3).nonzero(as_tuple=True)  # as the engine draws
    assert torch.equal(uniform_at_triton(*counters, *pairs), uniform_at_torch(*counters, *pairs))
    # read through strides: a transposed (non-contiguous) operand, 3-D and 0-D broadcasts
    for r, i in ((rows.t(), index[:, :7].t()), (rows[:, :, None], index[:, None, :50]),
                 (torch.tensor(3), index[0, :9]), (torch.tensor(2), torch.tensor(5))):
        assert torch.equal(uniform_at_triton(*counters, r, i), uniform_at_torch(*counters, r, i))


# --- launcher validation ------------------------------------------------------------------
def test_compiled_launchers_refuse_cpu_tensors(monkeypatch):
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1 at import)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pending, keys = _select_case(2, 9, seed=0)
    with pytest.raises(RuntimeError, match="need CUDA tensors, pending is on cpu"):
        select_triton(pending, keys, 2)
    (v, cur), masks, theta, _ = _lif_case(2, 5, seed=0, dtype=F32)
    with pytest.raises(RuntimeError, match="lif_triton: Triton kernels need CUDA tensors"):
        lif_triton(v, cur, *masks, theta)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: Triton was imported compiled
    with pytest.raises(RuntimeError, match="Triton was imported before it was set"):
        select_triton(pending, keys, 2)


def test_launchers_name_the_bad_argument():
    pending, keys = _select_case(2, 9, seed=0)
    with pytest.raises(ValueError, match=r"pending must have shape \[2, 9\], got \[2, 8\]"):
        select_triton(pending[:, :8], keys, 2)
    with pytest.raises(TypeError, match="pending must have dtype"):
        select_triton(pending.int(), keys, 2)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        select_triton(pending, keys, 0)
    vals, sel, table, targets, grad = _deliver_case(2, 3, 11, 4, seed=0, dtype=F32)
    with pytest.raises(TypeError, match="weight_table must have dtype in \\['torch.float32'\\], got torch.float64"):
        deliver_triton(vals, sel, table.double(), targets)
    with pytest.raises(ValueError, match=r"targets must have shape \[11, 4\], got \[11, 3\]"):
        deliver_triton(vals, sel, table, targets[:, :3])
    with pytest.raises(ValueError, match=r"grad_current must have shape \[2, 11\]"):
        deliver_backward_triton(grad[:, :5], vals, sel, table, targets)
    with pytest.raises(TypeError, match="sel must have dtype"):
        deliver_triton(vals, sel.float(), table, targets)
    (v, cur), masks, theta, (gvn, _) = _lif_case(2, 5, seed=0, dtype=F32)
    with pytest.raises(ValueError, match=r"theta must have shape \[5\], got \[4\]"):
        lif_triton(v, cur, *masks, theta[:4])
    with pytest.raises(TypeError, match="theta must have dtype"):
        lif_backward_triton(gvn, None, v, *masks, theta.double(), 2.0, False)
    with pytest.raises(TypeError, match="received must have dtype"):
        lif_triton(v, cur, masks[0], masks[1].float(), masks[2], theta)


def test_deliver_tiles_match_module_doc():
    # the tile rule the module doc relies on: <= _TILE elements, F-blocks of <= 256
    for k, f in [(1, 4096), (8, 1024), (512, 64), (300, 7)]:
        bk, bf = deliver_mod._blocks(k, f)
        assert bk * bf <= deliver_mod._TILE and bf <= 256 and bk <= triton.next_power_of_2(k)


# --- CUDA (compiled kernels; `make gpu-check`) ---------------------------------------------
def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process (TRITON_INTERPRET=1 at import)")
    return torch.device("cuda")


@pytest.mark.parametrize("w,k", [(2500, 8), (5003, 8), (70001, 512), (70001, 1)])
def test_cuda_select(w, k):
    dev = _cuda_or_skip()
    pending, keys = _select_case(32, w, seed=k)
    got = select_triton(pending.to(dev), keys.to(dev), k)
    assert _rows(got.cpu()) == _rows(select_torch(pending, keys, k))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,k,w,f", [(32, 8, 4001, 1024), (16, 512, 9001, 64), (8, 1, 5003, 4096)])
def test_cuda_deliver(b, k, w, f, dtype):
    dev = _cuda_or_skip()
    vals, sel, table, targets, grad = _deliver_case(b, k, w, f, seed=k, dtype=dtype)
    on = [t.to(dev) for t in (vals, sel, table, targets, grad)]
    exact = deliver_torch(vals.double(), sel, table.double(), targets)
    assert_fp(deliver_triton(*on[:4]).cpu(), deliver_torch(vals, sel, table, targets), exact, "current")
    want = deliver_backward_torch(grad, vals, sel, table, targets)
    exact = deliver_backward_torch(grad.double(), vals.double(), sel, table.double(), targets)
    runs = []
    for det in (False, True, True):
        got = deliver_backward_triton(on[4], *on[:4], deterministic=det)
        runs.append(got)
        for a, t, e in zip(got, want, exact):
            assert_fp(a.cpu(), t, e, f"deliver backward (deterministic={det})")
    assert all(torch.equal(x, y) for x, y in zip(runs[1], runs[2])), "deterministic mode is not"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_lif_and_rng(dtype):
    dev = _cuda_or_skip()
    (v, cur), masks, theta, (gvn, gs) = _lif_case(64, 10007, seed=1, dtype=dtype)
    on = lambda *ts: [t.to(dev) for t in ts]  # noqa: E731
    for a, t in zip(lif_triton(*on(v, cur, *masks, theta)), lif_torch(v, cur, *masks, theta)):
        assert torch.equal(a.cpu(), t)  # three IEEE ops, no contraction possible
    v_pre = lif_torch(v, cur, *masks, theta)[2]
    got = lif_backward_triton(*on(gvn, gs, v_pre, *masks, theta), 2.0, False)
    want = lif_backward_torch(gvn, gs, v_pre, *masks, theta, 2.0, False)
    exact = lif_backward_torch(*[t.double() for t in (gvn, gs, v_pre)], *masks, theta.double(), 2.0, False)
    for a, t, e in zip(got, want, exact):
        assert_fp(a.cpu(), t, e, "lif backward")
    index = torch.randint(0, 2**31 - 1, (1, 100003))
    rows = torch.arange(16)[:, None]
    assert torch.equal(uniform_at_triton(7, 1, 2, 3, *on(rows, index)).cpu(),
                       uniform_at_torch(7, 1, 2, 3, rows, index))


wrap_tests(globals(), interpreted=INTERPRETED, keep=('test_cuda', 'test_compiled'))
