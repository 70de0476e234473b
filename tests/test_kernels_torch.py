"""The per-step torch twins in `kernels/` against plain references: the contract the
Triton kernels will be held to (every kernel has a torch twin; the 2x tolerance rule).

- select_torch and select_pending_torch (from the pending list) vs a stable sort of
  -key over the pending entries;
- deliver_torch vs a dense one-hot computation, deliver_backward_torch vs autograd
  through that dense computation (and the per-step receive counts of the index
  tables vs a dense count);
- lif_torch / lif_backward_torch vs autograd through an explicit surrogate
  formulation of SPEC 5.4 and 8.

Shapes are odd or prime and wider than a typical block where that is cheap.
"""

from __future__ import annotations

import math

import pytest
import torch

from asynctrain.kernels.deliver import deliver_backward_torch, deliver_torch
from asynctrain.kernels.lif import arctan_surrogate, lif_backward_torch, lif_torch
from asynctrain.kernels.select import select_pending_torch, select_torch, sortable_key
from asynctrain.network import Network
from dense_oracle import spike

F64 = torch.float64


# --- select -----------------------------------------------------------------------------
def select_reference(pending: torch.Tensor, keys: torch.Tensor, k: int) -> list[list[int]]:
    """Per row: the min(k, #pending) pending indices with the highest key, ties to the
    lower index (stable sort of -key over ascending candidates), padded with the dump."""
    width = keys.shape[1]
    rows = []
    for p, key in zip(pending, keys):
        cand = p.nonzero().flatten()
        order = torch.sort(-key[cand].double(), stable=True).indices[:k]
        chosen = cand[order].tolist()
        rows.append(sorted(chosen + [width - 1] * (min(k, width) - len(chosen))))
    return rows


def _rows(sel: torch.Tensor) -> list[list[int]]:
    return [sorted(r) for r in sel.tolist()]  # order within a row is unspecified


def select_listed(pending: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """`select_pending_torch` (the engine's torch path) called like `select_torch`."""
    at = pending.nonzero(as_tuple=True)
    return select_pending_torch(*at, keys[at], keys.shape[0], keys.shape[1], k)


@pytest.fixture(params=[select_torch, select_listed], ids=["dense", "listed"])
def select(request):
    """Both torch selections: over the whole state, and from the pending list."""
    return request.param


def test_select_ties_go_to_the_lower_index(select):
    keys = torch.tensor([[0.5, 0.7, 0.7, 0.7, 0.7, 0.0]])
    pending = torch.tensor([[True, True, True, True, True, False]])
    assert _rows(select(pending, keys, 2)) == [[1, 2]]
    assert _rows(select(pending, keys, 4)) == [[1, 2, 3, 4]]
    flat = torch.zeros(1, 9)
    pend = torch.ones(1, 9, dtype=torch.bool)
    pend[0, -1] = False
    assert _rows(select(pend, flat, 3)) == [[0, 1, 2]]
    pend[0, 1] = False
    assert _rows(select(pend, flat, 3)) == [[0, 2, 3]]


def test_select_never_picks_non_pending_even_with_top_keys(select):
    keys = torch.tensor([[9.0, math.inf, 1.0, 8.0, 0.5, 7.0, 0.0]])
    pending = torch.tensor([[False, False, True, False, True, True, False]])
    assert _rows(select(pending, keys, 2)) == [[2, 5]]


def test_select_fills_with_dump_when_few_pending(select):
    keys = torch.rand(3, 11)
    pending = torch.zeros(3, 11, dtype=torch.bool)
    pending[0, 4] = True
    pending[1, [2, 9]] = True
    assert _rows(select(pending, keys, 4)) == [[4, 10, 10, 10], [2, 9, 10, 10], [10] * 4]


def test_select_orders_negative_and_infinite_keys(select):
    keys = torch.tensor([[-0.5, -math.inf, 2.0, -3.0, math.inf, 0.0, -1e-30, 1e-30, 0.0]])
    pending = torch.ones_like(keys, dtype=torch.bool)
    pending[0, -1] = False
    order = [4, 2, 7, 5, 6, 0, 3, 1]  # descending key
    for k in range(1, 9):
        assert _rows(select(pending, keys, k)) == [sorted(order[:k])], k
    # sortable_key preserves the float order (the bits of negative floats flip)
    vals = torch.tensor([-math.inf, -3.0, -1.0, -1e-30, 0.0, 1e-30, 1.0, 3.0, math.inf])
    sk = sortable_key(vals)
    assert (sk[1:] > sk[:-1]).all()


@pytest.mark.parametrize("k", [1, 7, 37, 300])
def test_select_matches_reference_randomized(k, select):
    # W = 257 (prime-ish, odd); coarse keys produce many ties; B = 5 rows of different density.
    g = torch.Generator().manual_seed(k)
    b, w = 5, 257
    keys = (torch.randint(-4, 5, (b, w), generator=g).float() / 4)
    keys[keys == 1] = math.inf
    pending = torch.rand(b, w, generator=g) < torch.tensor([[0.0], [0.02], [0.3], [0.9], [1.0]])
    pending[:, -1] = False  # the dump is never pending
    sel = select(pending, keys, k)
    assert sel.shape == (b, min(k, w)) and sel.dtype == torch.int64
    assert _rows(sel) == select_reference(pending, keys, k)


def test_select_listed_order_is_highest_key_first():
    """The listed selection delivers in a defined order (as the fused CPU steps do):
    descending key, ties to the lower index first, then the dump padding."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 4, (4, 61), generator=g).float()
    pending = torch.rand(4, 61, generator=g) < 0.4
    pending[:, -1] = False
    sel = select_listed(pending, keys, 9)
    for row, key, pend in zip(sel.tolist(), keys, pending):
        real = [c for c in row if c != 60]
        assert row == real + [60] * (9 - len(real))
        assert [(-key[c].item(), c) for c in real] == sorted((-key[c].item(), c) for c in real)
        assert len(real) == min(9, int(pend.sum()))


def test_select_k_at_least_width(select):
    keys = torch.rand(2, 6)
    pending = torch.tensor([[True, False, True, True, False, False], [False] * 6])
    sel = select(pending, keys, 6)
    assert sel.shape == (2, 6)
    assert _rows(sel) == [[0, 2, 3, 5, 5, 5], [5] * 6]
    assert _rows(select(pending, keys, 100)) == _rows(sel)


# --- deliver ----------------------------------------------------------------------------
def _tables(w: int, f: int, seed: int, dtype=F64):
    """Random weight table [w, f] and targets [w, f] (dump = w - 1 for padding; the
    dump row itself points at the dump with zero weights, as the engine builds it)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(w, f, generator=g, dtype=dtype)
    targets = torch.randint(0, w - 1, (w, f), generator=g)
    pad = torch.rand(w, f, generator=g) < 0.3
    targets[pad] = w - 1
    table[pad] = 0.0
    targets[-1] = w - 1
    table[-1] = 0.0
    return table, targets


def _selection(b: int, k: int, w: int, seed: int, dtype=F64):
    """[B, K] distinct sources per row, some slots padded with the dump (value 0);
    rows share sources (duplicates across samples)."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(w - 1, generator=g)[:k] for _ in range(b)])
    if b > 1:
        sel[0] = sel[1]  # two samples deliver the same sources
    vals = torch.randn(b, k, generator=g, dtype=dtype)
    dump = torch.rand(b, k, generator=g) < 0.25
    sel[dump] = w - 1
    vals[dump] = 0.0
    return vals, sel


def deliver_dense(vals, sel, table, targets):
    """current[b, i] = sum over slots k and fan-out entries f with targets[sel, f] == i
    of vals[b, k] * table[sel, f], as a one-hot sum."""
    w = table.shape[0]
    onehot = torch.nn.functional.one_hot(targets[sel], w).to(table.dtype)  # [B, K, F, W]
    return torch.einsum("bk,bkf,bkfw->bw", vals, table[sel], onehot)


@pytest.mark.parametrize("b,k,w,f", [(1, 1, 2, 1), (3, 5, 23, 7), (4, 13, 131, 29)])
def test_deliver_matches_dense(b, k, w, f):
    table, targets = _tables(w, f, seed=w)
    vals, sel = _selection(b, k, w, seed=k)
    current = deliver_torch(vals, sel, table, targets)
    assert current.shape == (b, w) and current.dtype == F64
    assert torch.allclose(current, deliver_dense(vals, sel, table, targets), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("b,k,w,f", [(1, 1, 2, 1), (3, 5, 23, 7), (4, 13, 131, 29)])
def test_deliver_backward_matches_autograd(b, k, w, f):
    table, targets = _tables(w, f, seed=w + 1)
    vals, sel = _selection(b, k, w, seed=k + 1)
    grad_current = torch.randn(b, w, generator=torch.Generator().manual_seed(3), dtype=F64)
    grad_vals, grad_table = deliver_backward_torch(grad_current, vals, sel, table, targets)
    v, t = vals.clone().requires_grad_(), table.clone().requires_grad_()
    ref_vals, ref_table = torch.autograd.grad((deliver_dense(v, sel, t, targets) * grad_current).sum(), (v, t))
    assert torch.allclose(grad_vals, ref_vals, atol=1e-12, rtol=1e-12)
    assert torch.allclose(grad_table, ref_table, atol=1e-12, rtol=1e-12)
    if b > 1:
        assert grad_table[sel[1]].abs().sum() > 0  # rows shared by samples 0 and 1 got gradient


def test_deliver_duplicate_sources_in_one_sample_add_up():
    # The engine never selects a source twice in a sample, but dump padding repeats
    # and a kernel must stay linear in any case.
    table, targets = _tables(17, 5, seed=2)
    sel = torch.tensor([[3, 3, 16, 16], [3, 7, 16, 7]])
    vals = torch.tensor([[0.5, 1.5, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]], dtype=F64)
    assert torch.allclose(deliver_torch(vals, sel, table, targets), deliver_dense(vals, sel, table, targets),
                          atol=1e-12)
    g = torch.randn(2, 17, dtype=F64, generator=torch.Generator().manual_seed(0))
    v, t = vals.clone().requires_grad_(), table.clone().requires_grad_()
    want = torch.autograd.grad((deliver_dense(v, sel, t, targets) * g).sum(), (v, t))
    for a, b in zip(deliver_backward_torch(g, vals, sel, table, targets), want):
        assert torch.allclose(a, b, atol=1e-12)


def test_deliver_fp32_within_2x_of_plain_torch_error():
    # The tolerance rule: the twin's fp32 error vs fp64 is within 2x of the error of
    # the same dense computation done in fp32 (plus a tiny absolute floor).
    b, k, w, f = 4, 13, 131, 29
    table, targets = _tables(w, f, seed=7)
    vals, sel = _selection(b, k, w, seed=8)
    exact = deliver_dense(vals, sel, table, targets)
    twin = deliver_torch(vals.float(), sel, table.float(), targets)
    plain = deliver_dense(vals.float(), sel, table.float(), targets)
    err_twin = (twin.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    assert err_twin <= 2 * err_plain + 1e-6


@pytest.mark.parametrize("sizes", [[5, 4, 3], [7, 6, 5, 4], [3, 11, 2]])
def test_received_counts_match_dense_targets(sizes):
    # The engine's per-step receive count (the n_in increment of SPEC 5.4): delivered
    # sources reaching each column, zero-valued outboxes (barrier messages) included;
    # dump slots (padding, dropped entries) reach nobody.
    net = Network(tuple(sizes))
    tb = net.tables(torch.device("cpu"))
    w = net.width + 1
    g = torch.Generator().manual_seed(len(sizes))
    for k in (1, 3, w):
        kk = min(k, net.n_sources)
        sel = torch.stack([torch.randperm(net.n_sources, generator=g)[:kk] for _ in range(3)])
        sel[:, ::2] = net.dump
        onehot = torch.nn.functional.one_hot(tb.targets[sel], w)  # [B, K, F, W]
        want = (onehot * (sel != net.dump)[..., None, None]).sum((1, 2))
        got = tb.received_counts(sel)
        assert got.shape == (3, w)
        assert torch.equal(got[:, :-1].long(), want[:, :-1]), k  # the dump column is scratch


# --- LIF --------------------------------------------------------------------------------
def lif_reference(v, current, refractory, received, gate, theta, alpha, detach_reset):
    """SPEC 5.4 for one step with the arctan surrogate (SPEC 8), plain autograd."""
    v_pre = torch.where(refractory, torch.zeros_like(v), v + current)
    s = spike(v_pre - theta, alpha) * gate.to(v.dtype)
    reset = s.detach() if detach_reset else s
    v_new = torch.where(received, v_pre * (1 - reset), v)
    return v_new, s, v_pre


def _lif_inputs(b: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(b, w, generator=g, dtype=F64) * 0.6
    current = torch.randn(b, w, generator=g, dtype=F64) * 0.3
    received = torch.rand(b, w, generator=g) < 0.6
    refractory = torch.rand(b, w, generator=g) < 0.25
    gate = received & (torch.rand(b, w, generator=g) < 0.8)  # sync threshold reached
    theta = torch.full((w,), 0.3, dtype=F64)
    theta[0] = math.inf  # an input column: never fires, no surrogate
    theta[-1] = math.inf  # the dump
    current[received.logical_not()] = 0.0
    return v, current, refractory, received, gate, theta


@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("with_grad_spikes", [False, True])
@pytest.mark.parametrize("alpha", [2.0, 10.0])
def test_lif_matches_surrogate_autograd(detach_reset, with_grad_spikes, alpha):
    b, w = 3, 67
    v, current, refractory, received, gate, theta = _lif_inputs(b, w, seed=int(alpha) + detach_reset)
    v_new, spikes, v_pre = lif_torch(v, current, refractory, received, gate, theta)
    vr, cr = v.clone().requires_grad_(), current.clone().requires_grad_()
    ref_v, ref_s, ref_pre = lif_reference(vr, cr, refractory, received, gate, theta, alpha, detach_reset)
    assert torch.equal(spikes, ref_s.detach()) and torch.equal(v_pre, ref_pre.detach())
    assert torch.equal(v_new, ref_v.detach())
    assert spikes.sum() > 0 and (spikes * refractory).sum() == 0  # refractory never fires

    g = torch.Generator().manual_seed(11)
    gv = torch.randn(b, w, generator=g, dtype=F64)
    gs = torch.randn(b, w, generator=g, dtype=F64) if with_grad_spikes else None
    loss = (ref_v * gv).sum() + ((ref_s * gs).sum() if gs is not None else 0.0)
    ref_gv, ref_gc = torch.autograd.grad(loss, (vr, cr))
    grad_v, grad_c = lif_backward_torch(gv, gs, v_pre, refractory, received, gate, theta, alpha, detach_reset)
    assert torch.allclose(grad_v, ref_gv, atol=1e-12, rtol=1e-12)
    assert torch.allclose(grad_c, ref_gc, atol=1e-12, rtol=1e-12)
    # Non-receivers pass the membrane gradient through untouched and take no current
    # gradient; refractory receivers are cut off from both.
    assert torch.equal(grad_v[~received], gv[~received]) and (grad_c[~received] == 0).all()
    rr = received & refractory
    assert (grad_v[rr] == 0).all() and (grad_c[rr] == 0).all()


def test_lif_reset_gradient_term():
    # One firing neuron: V1 = 0.5 >= theta = 0.3. dV'/dV1 = 1 - s - V1 * ds/dV1
    # (reset carries gradient) or 1 - s = 0 (detach_reset).
    t = lambda *x: torch.tensor([list(x)], dtype=F64)  # noqa: E731
    true = torch.ones(1, 1, dtype=torch.bool)
    theta = torch.tensor([0.3], dtype=F64)
    v_new, s, v_pre = lif_torch(t(0.2), t(0.3), ~true, true, true, theta)
    assert (v_new.item(), s.item(), v_pre.item()) == (0.0, 1.0, 0.5)
    sg = arctan_surrogate(torch.tensor(0.2, dtype=F64), 2.0).item()
    gv, gc = lif_backward_torch(t(1.0), None, v_pre, ~true, true, true, theta, 2.0, False)
    assert gv.item() == pytest.approx(-0.5 * sg) and gc.item() == pytest.approx(-0.5 * sg)
    gv, gc = lif_backward_torch(t(1.0), None, v_pre, ~true, true, true, theta, 2.0, True)
    assert gv.item() == 0.0 and gc.item() == 0.0
    # gate closed (sync threshold not reached): no spike, gradient passes as for V1
    v_new, s, _ = lif_torch(t(0.2), t(0.3), ~true, true, ~true, theta)
    assert (v_new.item(), s.item()) == (0.5, 0.0)
    gv, gc = lif_backward_torch(t(1.0), t(1.0), v_pre, ~true, true, ~true, theta, 2.0, False)
    assert (gv.item(), gc.item()) == (1.0, 1.0)


@pytest.mark.parametrize("detach_reset", [False, True])
def test_lif_backward_fire_or_last(detach_reset):
    """`last` (surrogate_at="fire_or_last"): the surrogate derivative only where the
    neuron fired or the evaluation ends its window; elsewhere the spike is a constant
    0 (outbox and reset paths alike), so V1 passes its gradient on unchanged."""
    b, w = 3, 67
    v, current, refractory, received, gate, theta = _lif_inputs(b, w, seed=5 + detach_reset)
    v_new, spikes, v_pre = lif_torch(v, current, refractory, received, gate, theta)
    last = torch.rand(b, w, generator=torch.Generator().manual_seed(3)) < 0.4
    counted = (spikes > 0) | last
    assert (received & gate & ~refractory & ~counted).sum() > 5 and (received & gate & last).sum() > 5
    vr, cr = v.clone().requires_grad_(), current.clone().requires_grad_()
    v_pre_r = torch.where(refractory, torch.zeros_like(vr), vr + cr)
    s = spike(v_pre_r - theta, 2.0) * gate.to(F64)
    s = torch.where(counted, s, s.detach())  # no derivative where it does not count
    reset = s.detach() if detach_reset else s
    ref_v = torch.where(received, v_pre_r * (1 - reset), vr)
    g = torch.Generator().manual_seed(12)
    gv, gs = torch.randn(b, w, generator=g, dtype=F64), torch.randn(b, w, generator=g, dtype=F64)
    ref_gv, ref_gc = torch.autograd.grad((ref_v * gv).sum() + (s * gs).sum(), (vr, cr))
    grad_v, grad_c = lif_backward_torch(gv, gs, v_pre, refractory, received, gate, theta, 2.0, detach_reset, last)
    assert torch.allclose(grad_v, ref_gv, atol=1e-12, rtol=1e-12)
    assert torch.allclose(grad_c, ref_gc, atol=1e-12, rtol=1e-12)
    # where nothing counts, V1's adjoint is the next membrane's, untouched
    free = received & ~refractory & ~counted
    assert torch.equal(grad_c[free], gv[free])
    # last everywhere is the default (every evaluation)
    every = lif_backward_torch(gv, gs, v_pre, refractory, received, gate, theta, 2.0, detach_reset)
    all_last = lif_backward_torch(gv, gs, v_pre, refractory, received, gate, theta, 2.0, detach_reset,
                                  torch.ones_like(last))
    assert all(torch.equal(a, e) for a, e in zip(all_last, every))


def test_arctan_surrogate_formula():
    x = torch.linspace(-1, 1, 9, dtype=F64)
    for alpha in (2.0, 10.0):
        want = (alpha / 2) / (1 + (math.pi / 2 * alpha * x) ** 2)
        assert torch.allclose(arctan_surrogate(x, alpha), want, rtol=0, atol=1e-15)
        # It is the derivative of atan(pi/2 * alpha * x) / pi.
        xr = x.clone().requires_grad_()
        (d,) = torch.autograd.grad((torch.atan(math.pi / 2 * alpha * xr) / math.pi).sum(), xr)
        assert torch.allclose(d, want, atol=1e-14)
