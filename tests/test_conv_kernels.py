"""Conv and rows delivery twins (`kernels/conv_deliver.py`, `kernels/rows_deliver.py`)
and the per-step delivery of conv networks (`asynctrain.conv.ImageSynapses`) against
a dense oracle: ``F.conv2d`` / ``F.avg_pool2d`` / matmul over the delivered spikes only.

Forward currents and received counts, then gradients of values and weights vs
autograd through the dense computation. Odd and prime sizes, borders (1x1 and 1-wide
maps), pooling of odd sizes (floor drops the last row/column), duplicate entries,
zero values (still counted), several samples. Float64 so the comparison is tight;
one fp32 case checks the stated fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asynctrain.conv import ImageSynapses, SynapticMap, parse_layers
from asynctrain.kernels.conv_deliver import conv_deliver_backward_torch, conv_deliver_torch
from asynctrain.kernels.rows_deliver import rows_deliver_backward_torch, rows_deliver_torch

F64 = torch.float64

CONV_CASES = [  # (C_in, H, W), C_out, pool
    ((3, 5, 7), 4, False),
    ((2, 6, 6), 3, False),
    ((1, 1, 1), 2, False),      # every tap but the centre is outside
    ((2, 1, 9), 3, False),      # one row: only ky = 1 lands
    ((3, 5, 7), 4, True),       # odd: the last row and column are pooled away
    ((2, 6, 6), 5, True),
    ((2, 2, 2), 3, True),       # pools to 1x1
    ((5, 11, 13), 7, True),
]


def _map(in_shape, c_out, pool, kind="conv", n_out=None):
    if kind == "conv":
        h, w = in_shape[1:]
        hw = (h // 2, w // 2) if pool else (h, w)
        return SynapticMap("conv", in_shape, (c_out, *hw), pool)
    return SynapticMap("fc", in_shape, (n_out,), pool)


def _entries(B, E, n, seed, zero_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randint(0, B, (E,), generator=g)
    src = torch.randint(0, n, (E,), generator=g)
    src[:3] = torch.tensor([0, n - 1, n // 2])[:min(3, E)]  # corners / last index
    vals = torch.randn(E, generator=g, dtype=F64)
    vals[torch.rand(E, generator=g) < zero_frac] = 0.0
    return vals, sample, src


def _dense(m, vals, sample, src, weight, B):
    """Oracle: the delivered entries as a dense [B, n_in] frame through the dense map."""
    x = torch.zeros(B, m.n_in, dtype=vals.dtype).index_put((sample, src), vals, accumulate=True)
    return m.dense(x, weight)


def _dense_counts(m, sample, src, B):
    adj = (m.dense(torch.eye(m.n_in, dtype=F64), torch.ones(m.weight_shape, dtype=F64)) > 0).long()
    hits = torch.zeros(B, m.n_in, dtype=torch.long).index_put(
        (sample, src), torch.ones_like(src), accumulate=True)
    return hits @ adj, adj


def _run_twin(m, fwd, vals, sample, src, weight, B, off, tail):
    width = off + m.n_out + tail
    cur = torch.zeros(B, width, dtype=vals.dtype)
    cnt = torch.zeros(B, width, dtype=torch.int32)
    fwd(vals, sample, src, weight, m.in_shape, m.pool, off, cur, cnt)
    return cur, cnt, width


@pytest.mark.parametrize("in_shape,c_out,pool", CONV_CASES)
def test_conv_deliver_matches_dense_conv(in_shape, c_out, pool):
    m = _map(in_shape, c_out, pool)
    B, E, off = 3, 23, 5
    weight = torch.randn(m.weight_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    vals, sample, src = _entries(B, E, m.n_in, seed=1)
    cur, cnt, width = _run_twin(m, conv_deliver_torch, vals, sample, src, weight, B, off, tail=3)
    ref = _dense(m, vals, sample, src, weight, B)
    torch.testing.assert_close(cur[:, off:off + m.n_out], ref, atol=1e-12, rtol=1e-12)
    assert not cur[:, :off].any() and not cur[:, off + m.n_out:].any(), "currents leaked outside"
    ref_cnt, adj = _dense_counts(m, sample, src, B)
    assert torch.equal(cnt[:, off:off + m.n_out].long(), ref_cnt)
    assert not cnt[:, :off].any() and not cnt[:, off + m.n_out:].any()
    assert torch.equal(adj.sum(1), m.fan_out()) and torch.equal(adj.sum(0), m.fan_in())


@pytest.mark.parametrize("in_shape,c_out,pool", CONV_CASES)
def test_conv_deliver_backward_matches_autograd(in_shape, c_out, pool):
    m = _map(in_shape, c_out, pool)
    B, E, off = 2, 17, 4
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(m.weight_shape, dtype=F64, generator=gen)
    vals, sample, src = _entries(B, E, m.n_in, seed=4)
    width = off + m.n_out + 2
    grad_current = torch.randn(B, width, dtype=F64, generator=gen)  # junk outside the targets too
    gv, gw = conv_deliver_backward_torch(grad_current, vals, sample, src, weight, m.in_shape,
                                         m.pool, off)
    v = vals.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref = _dense(m, v, sample, src, w, B)
    (ref * grad_current[:, off:off + m.n_out]).sum().backward()
    torch.testing.assert_close(gv, v.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=1e-12)


ROWS_CASES = [  # in_shape, n_out, pool
    ((13,), 7, False),
    ((3, 5, 7), 6, False),      # flatten only
    ((3, 5, 7), 6, True),       # pooled, odd sizes
    ((4, 4, 6), 11, True),
]


@pytest.mark.parametrize("in_shape,n_out,pool", ROWS_CASES)
def test_rows_deliver_matches_dense_and_autograd(in_shape, n_out, pool):
    m = _map(in_shape, None, pool, kind="fc", n_out=n_out)
    B, E, off = 3, 19, 6
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(m.weight_shape, dtype=F64, generator=gen)
    vals, sample, src = _entries(B, E, m.n_in, seed=6)
    cur, cnt, width = _run_twin(m, rows_deliver_torch, vals, sample, src, weight, B, off, tail=2)
    torch.testing.assert_close(cur[:, off:off + n_out], _dense(m, vals, sample, src, weight, B),
                               atol=1e-12, rtol=1e-12)
    assert not cur[:, :off].any() and not cur[:, off + n_out:].any()
    ref_cnt, adj = _dense_counts(m, sample, src, B)
    assert torch.equal(cnt[:, off:off + n_out].long(), ref_cnt)
    assert torch.equal(adj.sum(1), m.fan_out()) and torch.equal(adj.sum(0), m.fan_in())
    grad_current = torch.randn(B, width, dtype=F64, generator=gen)
    gv, gw = rows_deliver_backward_torch(grad_current, vals, sample, src, weight, m.in_shape,
                                         m.pool, off)
    v, w = vals.clone().requires_grad_(), weight.clone().requires_grad_()
    (_dense(m, v, sample, src, w, B) * grad_current[:, off:off + n_out]).sum().backward()
    torch.testing.assert_close(gv, v.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=1e-12)


def test_conv_deliver_fp32_within_tolerance():
    """fp32 twin vs an fp64 oracle: error at most 2x that of F.conv2d in fp32 (the tolerance rule),
    with a floor for sums that are exact in both."""
    m = _map((8, 9, 9), 16, True)
    B, E = 4, 200
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(m.weight_shape, dtype=F64, generator=gen)
    vals, sample, src = _entries(B, E, m.n_in, seed=8)
    ref = _dense(m, vals, sample, src, weight, B)
    cur, _, _ = _run_twin(m, conv_deliver_torch, vals.float(), sample, src, weight.float(), B, 0, 1)
    torch_err = (_dense(m, vals.float(), sample, src, weight.float(), B).double() - ref).abs().max()
    err = (cur[:, :m.n_out].double() - ref).abs().max()
    assert err <= 2 * torch_err + 1e-6, f"{err} vs torch fp32 {torch_err}"


def _image_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 6, bias=False), nn.Linear(6, 5, bias=False))


def test_image_synapses_step_matches_dense_layers():
    """A [B, K] selection mixing every layer (and dump slots): per-layer split, currents,
    counts and both gradients vs the dense maps of every layer."""
    torch.manual_seed(0)
    net = _image_net().double()
    maps, layers = parse_layers(net, (2, 7, 6))
    sizes = [maps[0].n_in] + [m.n_out for m in maps]
    offs = [sum(sizes[:l]) for l in range(len(sizes))]
    width = sum(sizes) + 1
    syn = ImageSynapses(maps, tuple(offs), width)
    slot = torch.cat([torch.full((n,), l) for l, n in enumerate(sizes)] + [torch.tensor([len(maps) + 1])])
    B, K = 3, 13
    gen = torch.Generator().manual_seed(1)
    n_src = width - 1 - sizes[-1]
    sel = torch.stack([torch.randperm(n_src, generator=gen)[:K] for _ in range(B)])
    sel[0, :2] = width - 1  # dump slots
    vals = torch.randn(B, K, dtype=F64, generator=gen)
    weights = [m.weight.detach().clone().requires_grad_() for m in layers]
    flat = syn.flat_params(weights)
    v = vals.clone().requires_grad_()
    cur, cnt = syn.deliver(v, sel, flat, slot)
    gcur = torch.randn(B, width, dtype=F64, generator=gen)
    (cur * gcur).sum().backward()
    # dense reference, layer by layer
    v2 = vals.clone().requires_grad_()
    w2 = [w.detach().clone().requires_grad_() for w in weights]
    x = torch.zeros(B, width, dtype=F64).scatter_add(1, sel, v2)
    hits = torch.zeros(B, width, dtype=torch.long).scatter_add(1, sel, torch.ones_like(sel))
    ref = [torch.zeros(B, sizes[0], dtype=F64)]
    ref_cnt = [torch.zeros(B, sizes[0], dtype=torch.long)]
    for l, m in enumerate(maps):
        ref.append(m.dense(x[:, offs[l]:offs[l] + sizes[l]], w2[l]))
        adj = (m.dense(torch.eye(m.n_in, dtype=F64), torch.ones(m.weight_shape, dtype=F64)) > 0).long()
        ref_cnt.append(hits[:, offs[l]:offs[l] + sizes[l]] @ adj)
    ref = torch.cat(ref + [torch.zeros(B, 1, dtype=F64)], 1)
    ref_cnt = torch.cat(ref_cnt + [torch.zeros(B, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(cur, ref, atol=1e-12, rtol=1e-12)
    assert torch.equal(cnt.long(), ref_cnt)
    (ref * gcur).sum().backward()
    torch.testing.assert_close(v.grad, v2.grad, atol=1e-12, rtol=1e-12)
    for a, b in zip(weights, w2):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
    assert torch.equal(syn.fan_out[:offs[-1]],
                       torch.cat([m.fan_out() for m in maps]))


@pytest.mark.parametrize("layers,shape,exc,match", [
    ([nn.Conv2d(2, 3, 5, padding=2, bias=False)], (2, 4, 4), TypeError, "kernel_size"),
    ([nn.Conv2d(2, 3, 3, padding=1, stride=2, bias=False)], (2, 4, 4), TypeError, "stride"),
    ([nn.Conv2d(2, 3, 3, padding=0, bias=False)], (2, 4, 4), TypeError, "padding"),
    ([nn.Conv2d(2, 3, 3, padding=1)], (2, 4, 4), ValueError, "bias"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False)], None, ValueError, "input_shape"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False)], (3, 4, 4), ValueError, "channels"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Linear(48, 2, bias=False)], (2, 4, 4),
     ValueError, "nn.Flatten"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(47, 2, bias=False)],
     (2, 4, 4), ValueError, "48"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.MaxPool2d(2)], (2, 4, 4), TypeError, "MaxPool2d"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU()], (2, 4, 4), TypeError, "neurons are implicit"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(3)], (2, 6, 6), ValueError, "AvgPool2d"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.AvgPool2d(2),
      nn.Conv2d(3, 3, 3, padding=1, bias=False)], (2, 8, 8), ValueError, "two poolings"),
    ([nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.AvgPool2d(2)], (2, 4, 4), ValueError, "end with"),
    ([nn.Linear(4, 3, bias=False), nn.AvgPool2d(2)], None, ValueError, "image-shaped"),
    ([nn.Flatten(start_dim=0), nn.Linear(4, 3, bias=False)], None, ValueError, "start_dim"),
])
def test_parse_layers_rejects(layers, shape, exc, match):
    with pytest.raises(exc, match=match):
        parse_layers(nn.Sequential(*layers), shape)
