"""The sync-free conv delivery (CUDA's mode, forced on the CPU with `plan.forced`):
each layer's launch delivers its own segment of a step's entries, sorted by layer on
the device (`ImageSynapses.deliver` / `deliver_backward` with ``sync_free=True``), so
no launch runs over all B x K entries, bitwise the CPU split's results; and in a
whole training iteration every conv/rows launch carries a segment."""

from __future__ import annotations

import pytest
import torch

from asynctrain import plan
from test_conv_engine import conv_net
from test_no_sync import _conv, _iteration


def _segment_spy(log):
    """The torch twins of `backends.TORCH_IMAGE`, recording per launch (direction, target
    offset, segment, the (sample, source) pairs inside it)."""
    from asynctrain import backends

    def spy(direction, fn, seg_at):
        def run(*args):
            seg = args[seg_at] if len(args) > seg_at else None
            sample, src = args[1:3] if direction == "forward" else args[2:4]
            entry = None
            if seg is not None:
                start, count = seg.tolist()
                entry = list(zip(sample[start:start + count].tolist(), src[start:start + count].tolist()))
            log.append((direction, args[seg_at - 3 if direction == "forward" else seg_at - 1], seg, entry))
            return fn(*args)
        return run

    return {kind: (spy("forward", fwd, 9), spy("backward", bwd, 8))
            for kind, (fwd, bwd) in backends.TORCH_IMAGE.items()}


def _layer_entries(syn, sel, source_slot):
    """Per layer l: the (sample, source inside l) pairs of its entries, in selection order."""
    slot = source_slot[sel]
    k = sel.shape[1]
    return [[(p // k, int(sel.view(-1)[p]) - syn.offsets[l]) for p in range(sel.numel())
             if int(slot.view(-1)[p]) == l] for l in range(len(syn.maps))]


@pytest.mark.parametrize("kind", ["pool", "odd", "deep"])
def test_sync_free_conv_delivery_runs_each_layer_on_its_own_segment(kind):
    """`ImageSynapses.deliver` / `deliver_backward` with ``sync_free=True``: one launch
    per layer, each with a segment holding exactly that layer's entries (so no launch
    falls back to all B x K entries), B x K minus the outputs' and the dump's in all;
    bitwise the CPU split's currents, counts and gradients."""
    import types
    from asynctrain.network import IndexTables, Network
    net = conv_net(kind, dtype=torch.float64)
    g = Network.from_module(net)
    syn, slots = g.synapses, IndexTables.build(g, torch.device("cpu")).source_slot
    gen = torch.Generator().manual_seed(4)
    b, k = 3, 9
    sel = torch.randint(0, g.dump + 1, (b, k), generator=gen)
    sel[0, 0], sel[1, 0] = g.dump, g.offsets[g.n_layers]  # the dump and an output
    sel[2, 1:1 + g.n_layers] = torch.tensor(g.offsets[:g.n_layers])  # an entry of every layer
    vals = torch.randn(b, k, generator=gen, dtype=torch.float64)
    vals[:, ::4] = 0.0
    flat = syn.flat_params([m.weight.detach() for m in net if hasattr(m, "weight")])
    grad = torch.randn(b, syn.width, generator=gen, dtype=torch.float64)
    log = []
    ops = types.SimpleNamespace(image=_segment_spy(log))
    want = syn.deliver(vals, sel, flat, slots, ops) + syn.deliver_backward(grad, vals, sel, flat, slots, ops=ops)
    assert all(seg is None for _, _, seg, _ in log)
    log.clear()
    got = syn.deliver(vals, sel, flat, slots, ops, True) + syn.deliver_backward(grad, vals, sel, flat, slots,
                                                                               ops=ops, sync_free=True)
    for a, w in zip(got, want):
        assert torch.equal(a, w)
    expected = _layer_entries(syn, sel, slots)
    n_real = int((slots[sel] < len(syn.maps)).sum())
    assert n_real < b * k and all(expected), "vacuous: every layer needs entries, and some must be skipped"
    for direction in ("forward", "backward"):
        launches = [x for x in log if x[0] == direction]
        assert [off for _, off, _, _ in launches] == list(syn.offsets[1:len(syn.maps) + 1])
        assert [entries for *_, entries in launches] == expected
        assert sum(int(seg[1]) for _, _, seg, _ in launches) == n_real


def test_sync_free_conv_iteration_launches_only_segments(monkeypatch):
    """A whole training iteration in the sync-free mode (listed and autograd steps):
    every conv/rows launch carries a segment, and each step's segments add up to
    that step's entries from layers (never all B x K)."""
    from asynctrain import backends, conv
    log, steps = [], []
    for kind, pair in _segment_spy(log).items():
        monkeypatch.setitem(backends.TORCH_IMAGE, kind, pair)
    forward = conv.ImageSynapses._forward

    def counted(self, vals, sel, flat, source_slot, *a, **kw):
        steps.append((len(log), int((source_slot[sel] < len(self.maps)).sum()), sel.numel()))
        return forward(self, vals, sel, flat, source_slot, *a, **kw)

    monkeypatch.setattr(conv.ImageSynapses, "_forward", counted)
    for ckpt in (None, 0):
        log.clear()
        steps.clear()
        net, cfg, frames = _conv("MS")
        with plan.forced(sync_free=True):
            _iteration(net, cfg, frames, "torch", checkpoint_every=ckpt)
        assert steps and all(seg is not None for _, _, seg, _ in log)
        n_maps = len([m for m in net if hasattr(m, "weight")])
        skipped = 0
        for first, n_real, n_all in steps:
            launches = log[first:first + n_maps]
            assert [d for d, *_ in launches] == ["forward"] * n_maps
            assert sum(int(seg[1]) for _, _, seg, _ in launches) == n_real
            skipped += n_all - n_real
        assert skipped > 0, "vacuous: no step selected an output or the dump"
        assert any(d == "backward" for d, *_ in log)
