"""Segments of the Triton conv/rows deliver kernels (``segment = (start, count)``: the
sync-free path, where each layer's launch delivers its own run of a step's entries)
against their torch twins and against the kernels run on the sliced entries: empty, at
the start, in the middle across entry blocks, at the end, all; pooled and not, several
channel / target blocks, atomic and deterministic weight gradients, entries outside
the segment whose sources lie outside the layer. Comparison rules and where the tests
run: as in tests/test_kernels_triton_conv.py (tests/interpreter_child.py)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain.kernels.conv_deliver import (conv_deliver_backward_torch,  # noqa: E402
                                             conv_deliver_backward_triton, conv_deliver_torch,
                                             conv_deliver_triton)
from asynctrain.kernels.rows_deliver import (rows_deliver_backward_torch,  # noqa: E402
                                             rows_deliver_backward_triton, rows_deliver_torch,
                                             rows_deliver_triton)
from interpreter_child import wrap_tests  # noqa: E402
from test_kernels_triton_conv import (B, F32, F64, INTERPRETED, OFFSET, _buffers, _conv_case,  # noqa: E402
                                      _rows_case, assert_fp)


def _segments(e):
    """name -> (start, count) inside E entries: empty (in the middle), at the start, in the
    middle (crossing entry blocks of 16), at the end, all."""
    return {"empty": (e // 2, 0), "start": (0, e // 3), "middle": (e // 3, e // 3 + 5),
            "end": (e - e // 4, e // 4), "all": (0, e)}


def _check_segment(fns, case, seg_name, seed):
    """With ``segment = (start, count)``: kernel against twin (fp rules above); the twin
    against the twin's unsegmented call on the slice [start, start + count) bitwise
    (what keeps the sync-free path equal to the CPU one), the kernel against the
    kernel's on the slice (deterministic weight gradients bitwise); outside the
    segment nothing is added and grad_vals is 0."""
    fwd_tri, fwd_twin, bwd_tri, bwd_twin = fns
    vals, sample, src, weight, in_shape, pool, width = case
    start, count = _segments(len(vals))[seg_name]
    seg = torch.tensor([start, count])
    part = slice(start, start + count)
    sliced = (vals[part], sample[part], src[part], weight, in_shape, pool)
    current, counts = _buffers(width, seed, vals.dtype)

    def fwd(fn, *args, segment=None):
        cur, cnt = current.to(args[0].dtype, copy=True), counts.clone()
        fn(*args, OFFSET, cur, cnt, segment)
        return cur, cnt

    got = fwd(fwd_tri, vals, sample, src, weight, in_shape, pool, segment=seg)
    want = fwd(fwd_twin, vals, sample, src, weight, in_shape, pool, segment=seg)
    exact = fwd(fwd_twin, vals.double(), sample, src, weight.double(), in_shape, pool, segment=seg)
    assert torch.equal(got[1], want[1]), "received counts"
    assert_fp(got[0], want[0], exact[0], "current")
    twin_sliced = fwd(fwd_twin, *sliced)
    assert torch.equal(want[0], twin_sliced[0]) and torch.equal(want[1], twin_sliced[1]), \
        "twin: segmented != unsegmented on the slice"
    tri_sliced = fwd(fwd_tri, *sliced)
    assert torch.equal(got[1], tri_sliced[1])
    assert_fp(got[0], tri_sliced[0], exact[0], "current against the sliced kernel")
    if count == 0:
        assert torch.equal(got[0], current) and torch.equal(got[1], counts), "an empty segment added"

    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(B, width, generator=g, dtype=F64).to(vals.dtype)
    want = bwd_twin(grad, vals, sample, src, weight, in_shape, pool, OFFSET, seg)
    exact = bwd_twin(grad.double(), vals.double(), sample, src, weight.double(), in_shape, pool, OFFSET, seg)
    twin_sliced = bwd_twin(grad, *sliced, OFFSET)
    assert torch.equal(want[0][part], twin_sliced[0]) and torch.equal(want[1], twin_sliced[1]), \
        "twin backward: segmented != unsegmented on the slice"
    outside = torch.ones(len(vals), dtype=torch.bool)
    outside[part] = False
    for det in (False, True):
        got = bwd_tri(grad, vals, sample, src, weight, in_shape, pool, OFFSET, seg, deterministic=det)
        for name, a, t, e in zip(("grad_vals", "grad_weight"), got, want, exact):
            assert_fp(a, t, e, f"{name} (deterministic={det})")
        assert (got[0][outside] == 0).all(), "grad_vals outside the segment"
        tri_sliced = bwd_tri(grad, *sliced, OFFSET, deterministic=det)
        if det:  # the same sums in the same order
            assert torch.equal(got[0][part], tri_sliced[0]) and torch.equal(got[1], tri_sliced[1])
        else:
            assert_fp(got[0][part], tri_sliced[0], exact[0][part], "grad_vals against the sliced kernel")
            assert_fp(got[1], tri_sliced[1], exact[1], "grad_weight against the sliced kernel")
        if count == 0:
            assert (got[0] == 0).all() and (got[1] == 0).all()


CONV_FNS = (conv_deliver_triton, conv_deliver_torch, conv_deliver_backward_triton, conv_deliver_backward_torch)
ROWS_FNS = (rows_deliver_triton, rows_deliver_torch, rows_deliver_backward_triton, rows_deliver_backward_torch)


@pytest.mark.parametrize("seg_name", ["empty", "start", "middle", "end", "all"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("c_in,c_out,h,w,pool", [(3, 8, 5, 7, False), (8, 3, 5, 7, True), (3, 130, 3, 4, False)])
def test_conv_deliver_segment(c_in, c_out, h, w, pool, dtype, seg_name):
    case = _conv_case(c_in, c_out, h, w, pool, seed=c_in + 2 * c_out + h, dtype=dtype)
    _check_segment(CONV_FNS, case, seg_name, seed=11)


@pytest.mark.parametrize("seg_name", ["empty", "start", "middle", "end", "all"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("in_shape,pool,m", [((7,), False, 5), ((3, 5, 7), True, 4), ((8, 3, 2), True, 300)])
def test_rows_deliver_segment(in_shape, pool, m, dtype, seg_name):
    case = _rows_case(in_shape, pool, m, seed=2 * m + len(in_shape), dtype=dtype)
    _check_segment(ROWS_FNS, case, seg_name, seed=12)


def test_segment_with_int32_indices_and_entries_of_other_layers():
    # the sync-free path's arrays: entries outside the segment belong to other layers,
    # so their sources can lie outside this layer (here: past its last source)
    vals, sample, src, *rest = _conv_case(3, 3, 5, 7, True, seed=13, dtype=F32, n_random=40)
    e = len(vals)
    src = src.clone()
    src[:10] += 1000
    src[e - 5:] += 1000
    case = (vals, sample.int(), src.int(), *rest)
    _check_segment(CONV_FNS, case, "middle", seed=14)
    vals, sample, src, *rest = _rows_case((3, 5, 7), True, 4, seed=15, dtype=F32)
    src = src.clone()
    src[:3] += 500
    _check_segment(ROWS_FNS, (vals, sample.int(), src.int(), *rest), "end", seed=16)


def test_launchers_check_the_segment():
    vals, sample, src, weight, in_shape, pool, width = _conv_case(3, 8, 5, 7, False, seed=0, dtype=F32)
    current, counts = _buffers(width, 0, F32)
    with pytest.raises(TypeError, match="segment must have dtype"):
        conv_deliver_triton(vals, sample, src, weight, in_shape, pool, OFFSET, current, counts,
                            torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"segment must have shape \[2\]"):
        conv_deliver_backward_triton(current, vals, sample, src, weight, in_shape, pool, OFFSET,
                                     torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="segment must be contiguous"):
        rows_deliver_backward_triton(current, vals, sample, src, torch.zeros(4, 105), (105,), False, OFFSET,
                                     torch.tensor([[0, 9], [3, 9]]).t()[0])


wrap_tests(globals(), interpreted=INTERPRETED)
