"""The all-layer step kernels of image networks (`kernels/image_steps.py`) against their
torch twins, interpreted on CPU tensors (tests/interpreter_child.py).

- `image_deliver_triton` (every layer's delivery in one launch) against
  `image_deliver_torch` (layer by layer through the per-layer twins, each over its
  segment): received counts exact, currents within 2x the twin's error against an
  fp64 evaluation (+ 8 ulp of the largest magnitude: the atomics sum in another order);
  fp64 within 1e-12. Networks: conv / pool / odd sizes / flatten / linear (the tests'
  nets) and a narrow VGG-7; entries of every source layer, outputs and the dump (reach
  nobody), zero values (counted, no current), buffers that already hold currents;
  its reverse `image_deliver_backward_triton` likewise (values' and weight gradients);
- `listed_step_triton` (a listed step's evaluation at its receivers, each received
  column once) against `listed_step_torch`, with the pass's bookkeeping (forward) and
  with the backward record (replay), policies MS / RS, refractory dropout, slot
  filling, barrier messages; `listed_backward_triton` against its twin, bitwise, with
  and without detach_reset and the armed flags of surrogate_at="fire_or_last";
- `image_deliver_triton` refuses bad arguments with errors naming them.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain.kernels import image_steps, listed_steps  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from asynctrain.kernels.step_spec import PassTensors  # noqa: E402
from asynctrain.models import vgg7  # noqa: E402
from asynctrain.network import Network  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402
from test_conv_engine import conv_net  # noqa: E402
from test_kernels_triton_conv import assert_fp  # noqa: E402

F32, F64 = torch.float32, torch.float64
INTERPRETED = is_interpreted(image_steps._image_deliver_kernel)
NETS = ["pool", "odd", "deep", "vgg"]


def _net(kind: str, dtype):
    module = vgg7(width=1 / 16, image_size=8) if kind == "vgg" else conv_net(kind)
    module = module.to(dtype)
    net = Network.from_module(module, getattr(module, "input_shape", None))
    flat = torch.cat([m.weight.detach().reshape(-1) for m in module if hasattr(m, "weight")])
    return net, flat


def _step(net, dtype, B=3, K=11, seed=0):
    """A step's [B, K] selection with entries of every source layer, an output and the
    dump, and its values (every 4th zero)."""
    g = torch.Generator().manual_seed(seed)
    w = net.width + 1
    sel = torch.randint(0, net.offsets[net.n_layers], (B, K), generator=g)
    sel[0, :net.n_layers] = torch.tensor(net.offsets[:net.n_layers])
    sel[1, 0], sel[1, 1] = w - 1, net.output_slice.start
    vals = torch.randn(B, K, generator=g, dtype=F64)
    vals.view(-1)[::4] = 0.0
    return vals.to(dtype), sel


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", NETS)
def test_image_deliver_matches_the_twin(kind, dtype):
    net, flat = _net(kind, dtype)
    syn, cpu = net.synapses, torch.device("cpu")
    layers, slots = syn.layers(cpu), net.tables(cpu).source_slot
    vals, sel = _step(net, dtype)
    g = torch.Generator().manual_seed(1)
    w = net.width + 1
    cur0 = torch.randn(vals.shape[0], w, generator=g, dtype=F64).to(dtype)
    cnt0 = torch.randint(0, 3, (vals.shape[0], w), generator=g, dtype=torch.int32)
    runs = {}
    for name, fn, args in (("triton", image_steps.image_deliver_triton, (vals, flat, cur0)),
                           ("twin", image_steps.image_deliver_torch, (vals, flat, cur0)),
                           ("fp64", image_steps.image_deliver_torch, (vals.double(), flat.double(), cur0.double()))):
        v, f, c = args
        cur, cnt = c.clone(), cnt0.clone()
        fn(v, sel, f, slots, layers, cur, cnt)
        runs[name] = (cur, cnt)
    assert torch.equal(runs["triton"][1], runs["twin"][1]), "received counts"
    assert int((runs["twin"][1] - cnt0).sum()) > 0 and not torch.equal(runs["twin"][0], cur0), "vacuous"
    assert_fp(runs["triton"][0], runs["twin"][0], runs["fp64"][0], "current")


class _State:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def clone(self):
        return _State(**{k: v.clone() for k, v in self.__dict__.items()})


def _listed_inputs(kind, dtype, fill, seed=0):
    """A net, a random state and pass, and a step's deliveries (real entries and, with
    `fill`, fillers) in kept buffers, as `receivers.ListedReceivers` makes them."""
    net, flat = _net(kind, dtype)
    cpu = torch.device("cpu")
    layers, tables = net.synapses.layers(cpu), net.tables(cpu)
    vals, cols = _step(net, dtype, seed=seed)
    B, w = cols.shape[0], net.width + 1
    g = torch.Generator().manual_seed(seed + 7)
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=F64).to(dtype)  # noqa: E731
    st = _State(v=rnd(B, w) * 0.5, o=(rnd(B, w) < 0.1).to(dtype), acc=rnd(B, net.n_outputs).round(),
                refr=torch.rand(B, w, generator=g) < 0.2, n_in=torch.randint(0, 3, (B, w), generator=g,
                                                                            dtype=torch.int32))
    book = PassTensors(pending=torch.rand(B, w, generator=g) < 0.1, pre_spike=rnd(B, w), spike_sum=rnd(B, w).round(),
                       steps=torch.zeros(B, dtype=torch.int64), first_out=torch.zeros(B, dtype=torch.int64),
                       done=torch.zeros(B, dtype=torch.bool),
                       fillable=(torch.rand(B, w, generator=g) < 0.3) if fill else None,
                       hist=torch.zeros(6, dtype=torch.int64))
    cur = torch.zeros(B, w, dtype=dtype)
    cnt = torch.zeros(B, w, dtype=torch.int32)
    filler = torch.zeros_like(cols, dtype=torch.bool)
    if fill:
        filler[:, -2:] = True
    image_steps.image_deliver_torch(vals.masked_fill(filler, 0.0), torch.where(filler, w - 1, cols), flat,
                                    tables.source_slot, layers, cur, cnt)
    if fill:
        image_steps.image_deliver_torch(torch.zeros_like(vals), torch.where(filler, cols, w - 1), flat,
                                        tables.source_slot, layers, cur, cnt, unit=image_steps.FILLER_COUNT)
    theta = torch.full((w,), 0.6, dtype=dtype)
    theta[:net.n_inputs] = theta[-1] = float("inf")
    sync = torch.randint(0, 3, (w,), generator=g, dtype=torch.int32)
    return net, layers, tables, cols, cur, cnt, st, book, theta, sync


def _run_listed(fn, args, book, record, knobs):
    net, layers, tables, cols, cur, cnt, st, _, theta, sync = args
    cur, cnt, st = cur.clone(), cnt.clone(), st.clone()
    book = None if book is None else PassTensors(**{k: None if v is None else v.clone() for k, v in vars(book).items()})
    out_fired = None if book is None else torch.zeros(cols.shape[0], dtype=torch.bool)
    rows = None
    if record:
        n = cols.numel() * layers.list_width
        rows = listed_steps.ReceiverRows.empty(n, st.v.dtype, torch.int32,
                                              lambda n, dtype: torch.full((n,), 7, dtype=dtype))
    out = net.output_slice
    fn(cols, tables.source_slot, layers, cur, cnt, st, sync, theta, tables.is_source.to(st.v.dtype),
       tables.is_source, tables.is_hidden, out.start, out.stop, 5, 1, 3, knobs.get("p_ref", 0.0), book,
       out_fired, rows, refractory=knobs.get("refractory", True), barrier=knobs.get("barrier", False),
       policy_ms=knobs.get("policy_ms", True))
    return cur, cnt, st, book, out_fired, rows


def _rows_by_column(rows):
    """The received lanes' record fields, sorted by column; the others must be the dump's."""
    got = rows.received
    order = rows.idx[got].long().argsort()
    return [x[got][order] for x in (rows.idx, rows.v_pre, rows.refr, rows.gate)], rows


LISTED = {
    "MS": dict(),
    "RS-dropout-fill": dict(policy_ms=False, p_ref=0.5, fill=True),
    "barrier-no-refractory": dict(barrier=True, refractory=False),
}


@pytest.mark.parametrize("knobs", sorted(LISTED))
@pytest.mark.parametrize("kind", NETS)
def test_listed_step_matches_the_twin(kind, knobs):
    knobs = LISTED[knobs]
    dtype = F32 if kind != "deep" else F64
    args = _listed_inputs(kind, dtype, knobs.get("fill", False))
    book, w = args[7], args[0].width + 1
    for record, bk in ((False, book), (True, None)):  # the forward (bookkeeping), a replay (the record)
        got = _run_listed(listed_steps.listed_step_triton, args, bk, record, knobs)
        want = _run_listed(listed_steps.listed_step_torch, args, bk, record, knobs)
        for name, a, b in zip(("current", "counts"), got[:2], want[:2]):
            assert torch.equal(a, b) and not a.any(), f"{name}: not zero again"
        for name in ("v", "o", "acc", "refr", "n_in"):
            assert torch.equal(getattr(got[2], name), getattr(want[2], name)), name
        assert not torch.equal(want[2].v, args[6].v), "vacuous: nothing evaluated"
        if bk is not None:
            for name, a in vars(got[3]).items():
                if a is not None:
                    assert torch.equal(a, getattr(want[3], name)), name
            assert torch.equal(got[4], want[4]), "out_fired"
            assert int(want[3].hist.sum()) > 0 or kind == "deep", "vacuous: no spike"
            assert bool(want[4].any()) or kind != "pool", "vacuous: no output spike"
        if record:
            (g_cols, g_rows), (w_cols, w_rows) = _rows_by_column(got[5]), _rows_by_column(want[5])
            for a, b in zip(g_cols, w_cols):
                assert torch.equal(a, b)
            assert g_rows.received.sum() == w_rows.received.sum() > 0
            for r in (g_rows, w_rows):  # the other lanes: their sample's dump column, nothing else
                other = ~r.received
                assert bool((r.idx[other] % w == w - 1).all()) and not r.refr[other].any() and not r.gate[other].any()
                assert bool((r.v_pre[other] == 0).all())


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind", NETS)
def test_image_deliver_backward_matches_the_twin(kind, dtype):
    """The values' gradient and the weight gradient (added into a vector that already
    holds some) against the twin, within 2x its error against fp64."""
    net, flat = _net(kind, dtype)
    cpu = torch.device("cpu")
    layers, slots = net.synapses.layers(cpu), net.tables(cpu).source_slot
    vals, sel = _step(net, dtype)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(vals.shape[0], net.width + 1, generator=g, dtype=F64).to(dtype)
    gflat0 = torch.randn(flat.shape, generator=g, dtype=F64).to(dtype)
    runs = {}
    for name, fn, (gr, v, f, gf) in (
            ("triton", image_steps.image_deliver_backward_triton, (grad, vals, flat, gflat0)),
            ("twin", image_steps.image_deliver_backward_torch, (grad, vals, flat, gflat0)),
            ("fp64", image_steps.image_deliver_backward_torch, (grad.double(), vals.double(), flat.double(),
                                                                gflat0.double()))):
        gflat = gf.clone()
        runs[name] = (fn(gr, v, sel, f, slots, layers, gflat), gflat)
    assert runs["twin"][0].abs().sum() > 0 and not torch.equal(runs["twin"][1], gflat0), "vacuous"
    assert bool((runs["twin"][0][1, :2] == 0).all()), "the dump and an output get no gradient"
    for i, what in enumerate(("grad_vals", "grad_flat")):
        assert_fp(runs["triton"][i], runs["twin"][i], runs["fp64"][i], what)


@pytest.mark.parametrize("armed", [False, True])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("kind", ["pool", "vgg"])
def test_listed_backward_matches_the_twin(kind, detach_reset, armed):
    """The reverse of a listed step from its record (written by the twin of a replay),
    bitwise: the membranes' adjoint, the current's gradient at the receivers (zero
    elsewhere), the armed flags."""
    dtype = F32
    args = _listed_inputs(kind, dtype, fill=True)
    rows = _run_listed(listed_steps.listed_step_torch, args, None, True, dict(p_ref=0.3))[5]
    net = args[0]
    B, w = args[3].shape[0], net.width + 1
    g = torch.Generator().manual_seed(5)
    adj = dict(v=torch.randn(B, w, generator=g), o=torch.randn(B, w, generator=g),
               acc=torch.randn(B, net.n_outputs, generator=g))
    armed0 = torch.rand(B, w, generator=g) < 0.5
    theta, out = args[8], net.output_slice
    source_f = args[2].is_source.to(dtype)
    res = []
    for fn in (listed_steps.listed_backward_triton, listed_steps.listed_backward_torch):
        v, gcur, arm = adj["v"].clone(), torch.zeros(B, w), armed0.clone() if armed else None
        fn(rows, v, adj["o"], adj["acc"], arm, gcur, theta, source_f, out.start, out.stop, 2.3, detach_reset)
        res.append((v, gcur, arm))
    (v1, c1, a1), (v2, c2, a2) = res
    assert torch.equal(v1, v2) and torch.equal(c1, c2)
    assert a1 is None or torch.equal(a1, a2)
    assert c2.abs().sum() > 0 and not torch.equal(v2, adj["v"]), "vacuous"
    received = torch.zeros(B * w, dtype=torch.bool).index_fill_(0, rows.idx[rows.received].long(), True)
    assert not c2.view(-1)[~received].any(), "a current's gradient outside the receivers"


def test_image_deliver_refuses_bad_arguments():
    net, flat = _net("pool", F32)
    cpu = torch.device("cpu")
    layers, slots = net.synapses.layers(cpu), net.tables(cpu).source_slot
    vals, sel = _step(net, F32)
    cur, cnt = torch.zeros(vals.shape[0], net.width + 1), torch.zeros(vals.shape[0], net.width + 1, dtype=torch.int32)
    with pytest.raises(TypeError, match="sel must have dtype"):
        image_steps.image_deliver_triton(vals, sel.int(), flat, slots, layers, cur, cnt)
    with pytest.raises(ValueError, match="flat must have shape"):
        image_steps.image_deliver_triton(vals, sel, flat[:-1], slots, layers, cur, cnt)
    with pytest.raises(TypeError, match="counts must have dtype"):
        image_steps.image_deliver_triton(vals, sel, flat, slots, layers, cur, cnt.long())


wrap_tests(globals(), interpreted=INTERPRETED, keep=("test_cuda",))
