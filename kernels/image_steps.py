"""One forward step of an image (convolutional) network over all its layers at once:
the delivery of a step's B x K entries through every layer's map in one launch
(`image_deliver_triton`), instead of one launch per layer after a device-side sort of
the entries by layer (kernels/conv_deliver.py, kernels/rows_deliver.py with a
``segment`` each: L launches and ~12 torch ops of sorting per step).

The layers (`ImageLayers`): map l reads source layer l (flat indices
``[src_offsets[l], ...)``) and writes target layer l + 1 (from ``out_offsets[l]``);
kind "conv" (3x3, stride 1, padding 1, optionally behind a folded 2x2 average
pooling) or "fc" (a linear layer, optionally behind pooling and flattening). Their
weights are one flat vector (the engine's weight table of these networks). A
delivered entry (sample b, flat column j of source layer l) reaches the targets
``f = 0 .. list_width - 1`` of its map's fan-out, in the order of
`conv.ImageSynapses.receiver_list`: conv tap ``t = f % 9`` (ky = t // 3, kx = t % 3)
of output channel ``o = f // 9``, reaching ``(o, y + 1 - ky, x + 1 - kx)`` with weight
``W[o, c, ky, kx]``; linear target ``m = f`` with weight ``W[m, feature(j)]``. Targets
outside the map, channels past C_out, pooled rows and columns dropped by the floor of
an odd size, entries of outputs and of the dump reach nobody. Those are the targets
and weights the per-layer kernels use (`_lane`).

Triton (`image_deliver_triton`): programs tile (entry block, target block) over
``B x K`` entries and ``list_width`` targets; each lane finds its entry's layer from
the source slot table and the layer's geometry from `ImageLayers.table` (int64
``[L, 10]``, on the device), so one compiled variant serves every layer. Float
atomics into ``current`` (skipped for zero values), int32 atomics of 1 into
``counts`` (zero values too): as the per-layer kernels, the order of a current's
float additions may change from run to run (counts are exact). The twin
(`image_deliver_torch`) delivers layer by layer through the per-layer torch twins,
each over its segment of the sorted entries (`deliver_segments`: the torch backend's
sync-free delivery), so the same targets and products, summed in another order.
Supported: float32 and float64 (vals, weights, current alike), sel int64, counts
int32, contiguous current and counts (written in place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import rng
from ._triton import (check_accumulators, check_dtype, check_shape, check_tensors, hash_arg, is_interpreted, jit, tl,
                      triton)
from .conv_deliver import conv_deliver_backward_torch, conv_deliver_torch
from .image_deliver import map_position, window
from .lif import lif_backward_torch, lif_torch, surrogate_constants
from .rng_triton import _uniform_at_from_hash
from .rows_deliver import rows_deliver_backward_torch, rows_deliver_torch

# The per-layer torch twins by map kind: (deliver, deliver_backward) (`backends.TORCH_IMAGE`).
TWINS = {"conv": (conv_deliver_torch, conv_deliver_backward_torch),
         "fc": (rows_deliver_torch, rows_deliver_backward_torch)}

# Columns of `ImageLayers.table`, one row per map.
IS_CONV, POOL, H, W, N_OUT, SRC0, DST0, C_IN, PARAM0, N_FEAT = range(10)


@dataclass(frozen=True, eq=False)
class ImageLayers:
    """The maps of an image network as the per-step kernels read them (built by
    `conv.ImageSynapses.layers`, once per device)."""

    kinds: tuple[str, ...]              # "conv" or "fc", per map
    in_shapes: tuple[tuple[int, ...], ...]
    pools: tuple[bool, ...]
    src_offsets: tuple[int, ...]        # first flat index of each map's source layer
    out_offsets: tuple[int, ...]        # first flat index of each map's target layer
    param_offsets: tuple[int, ...]      # L + 1 offsets into the flat weights
    weight_shapes: tuple[tuple[int, ...], ...]
    width: int                          # N + 1 (the dump last)
    list_width: int                     # the widest map's targets per entry: 9 C_out or M
    table: torch.Tensor                 # int64 [L, 10] (`IS_CONV` ... `N_FEAT`)
    offsets_by_slot: torch.Tensor       # int64 [L + 2]: src_offsets, then 0 for outputs and the dump

    @property
    def n_maps(self) -> int:
        return len(self.kinds)

    @staticmethod
    def build(kinds, in_shapes, pools, src_offsets, out_offsets, weight_shapes, width: int,
              device) -> "ImageLayers":
        sizes = [math.prod(s) for s in weight_shapes]
        param = tuple(sum(sizes[:l]) for l in range(len(sizes) + 1))
        rows, list_width = [], 0
        for l, kind in enumerate(kinds):
            shape, pool = in_shapes[l], bool(pools[l])
            h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, shape[0])
            n_out = weight_shapes[l][0]
            n_feat = 0 if kind == "conv" else weight_shapes[l][1]
            rows.append([kind == "conv", pool, h, w, n_out, src_offsets[l], out_offsets[l],
                         shape[0] if kind == "conv" else 0, param[l], n_feat])
            list_width = max(list_width, 9 * n_out if kind == "conv" else n_out)
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        by_slot = torch.tensor(list(src_offsets) + [0, 0], dtype=torch.int64).to(device)
        return ImageLayers(tuple(kinds), tuple(tuple(s) for s in in_shapes), tuple(bool(p) for p in pools),
                           tuple(src_offsets), tuple(out_offsets), param, tuple(tuple(s) for s in weight_shapes),
                           width, list_width, table, by_slot)

    def weight(self, flat: torch.Tensor, l: int) -> torch.Tensor:
        return flat[self.param_offsets[l]:self.param_offsets[l + 1]].view(self.weight_shapes[l])

    def segments(self, sel: torch.Tensor, source_slot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The flattened [B * K] selection sorted by source layer on the device
        (stable: each layer's entries keep their order), without a host read.

        Returns (order int64 ``[B * K]``: positions into the flattened selection;
        src int64 ``[B * K]``: each sorted entry's source index inside its own layer;
        segments int64 ``[L + 2, 2]``: (start, count) of layer l's entries in `order`,
        outputs and the dump last)."""
        slot = source_slot[sel].view(-1)
        slot_sorted, order = torch.sort(slot, stable=True)
        # not bincount: its output size needs the largest slot on the host
        counts = torch.zeros(self.n_maps + 2, dtype=torch.int64, device=sel.device)
        counts.scatter_add_(0, slot, torch.ones_like(slot))
        seg = torch.stack([counts.cumsum(0) - counts, counts], 1)
        return order, sel.reshape(-1)[order] - self.offsets_by_slot[slot_sorted], seg


def deliver_segments(vals: torch.Tensor, sel: torch.Tensor, flat: torch.Tensor, source_slot: torch.Tensor,
                     layers: ImageLayers, current: torch.Tensor, counts: torch.Tensor, kernels: dict,
                     unit: int = 1) -> None:
    """Each layer's kernel (`kernels`: map kind -> (deliver, backward), the per-layer
    kernels of kernels/conv_deliver.py and kernels/rows_deliver.py or their twins)
    over its own segment of the entries sorted by layer (`ImageLayers.segments`):
    L launches, no host read. `unit`: what each delivery adds to the counts (the
    per-layer kernels add 1: other units go through a scratch buffer)."""
    k = sel.shape[1]
    order, src, seg = layers.segments(sel, source_slot)
    sorted_vals, sample = vals.reshape(-1)[order], order // k
    into = counts if unit == 1 else torch.zeros_like(counts)
    for l, kind in enumerate(layers.kinds):
        kernels[kind][0](sorted_vals, sample, src, layers.weight(flat, l), layers.in_shapes[l], layers.pools[l],
                         layers.out_offsets[l], current, into, seg[l])
    if unit != 1:
        counts.add_(into * unit)


def image_deliver_torch(vals: torch.Tensor, sel: torch.Tensor, flat: torch.Tensor, source_slot: torch.Tensor,
                        layers: ImageLayers, current: torch.Tensor, counts: torch.Tensor, unit: int = 1) -> None:
    """Add the currents and received counts of one step's deliveries (in place).

    Args:
        vals: ``[B, K]`` delivered outbox values (a zero value still counts as received).
        sel: int64 ``[B, K]`` the delivered columns (outputs and the dump reach nobody).
        flat: ``[P]`` every map's weights (`ImageLayers.param_offsets`).
        source_slot: int64 ``[W]`` the layer of each column (L, L + 1: outputs, dump).
        layers: the maps (`ImageLayers`).
        current: ``[B, W]`` float, += the currents.
        counts: ``[B, W]`` int32, += `unit` per entry that reached each column (a
            filler's delivery: `FILLER_COUNT`).
    """
    deliver_segments(vals, sel, flat, source_slot, layers, current, counts, TWINS, unit)


# --- Triton ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float64)
# (BLOCK_E, BLOCK_F), 4 warps: entries x targets per program.
_BLOCK_E, _BLOCK_F = 2, 256
# Interpreted (TRITON_INTERPRET=1: the tests, `make gpu-check`'s CPU dry run), programs
# run one after another at a cost that hardly depends on their size: entry tiles of 64
# there (32x fewer programs, the same lanes: a K=512 training iteration of the dry
# run's tiny VGG-7 in 1.5 s instead of 41 s), 2 on a GPU.
_INTERPRETED_BLOCK_E = 64


def _block_e(kernel) -> int:
    return _INTERPRETED_BLOCK_E if is_interpreted(kernel) else _BLOCK_E


@jit
def _lane(j, fs, slot_ptr, table_ptr, n_maps):
    """Per (entry, target) lane, for entries at flat columns `j` ([BLOCK_E] int64) and
    targets `fs` ([BLOCK_F]): (target column [E, F] (0 where none), flat weight index
    [E, F], reaches [E, F], value scale [E]: 1 or 0.25 pooled)."""
    slot = tl.load(slot_ptr + j)
    real = slot < n_maps
    g = table_ptr + tl.where(real, slot, 0) * 10
    is_conv = tl.load(g + 0) != 0
    pool = tl.load(g + 1).to(tl.int32)
    h = tl.load(g + 2)
    w = tl.load(g + 3)
    n_out = tl.load(g + 4)
    src = j - tl.load(g + 5)
    dst0 = tl.load(g + 6)
    c_in = tl.load(g + 7)
    param0 = tl.load(g + 8)
    n_feat = tl.load(g + 9)
    hw = h * w
    c = src // hw
    rem = (src - c * hw).to(tl.int32)
    row = rem // w.to(tl.int32)
    y = row >> pool
    x = (rem - row * w.to(tl.int32)) >> pool
    hm = (h >> pool).to(tl.int32)
    wm = (w >> pool).to(tl.int32)
    inside = real & (y < hm) & (x < wm)        # pooled odd sizes drop the last row / column
    f = fs[None, :]
    # conv: tap t of output channel o
    o = f // 9
    t = f - o * 9
    oy = y[:, None] + 1 - t // 3
    ox = x[:, None] + 1 - (t - (t // 3) * 3)
    ok_conv = (o < n_out[:, None]) & (oy >= 0) & (oy < hm[:, None]) & (ox >= 0) & (ox < wm[:, None])
    tgt_conv = dst0[:, None] + o.to(tl.int64) * (hm * wm).to(tl.int64)[:, None] \
        + tl.where(ok_conv, oy * wm[:, None] + ox, 0)
    w_conv = param0[:, None] + (o.to(tl.int64) * c_in[:, None] + c[:, None]) * 9 + t
    # fc: target f, input feature of the (pooled, flattened) source
    feat = c * (hm * wm).to(tl.int64) + y * wm + x
    ok_fc = f < n_out[:, None]
    tgt_fc = dst0[:, None] + f
    w_fc = param0[:, None] + f.to(tl.int64) * n_feat[:, None] + feat[:, None]
    conv = is_conv[:, None]
    ok = inside[:, None] & tl.where(conv, ok_conv, ok_fc)
    tgt = tl.where(ok, tl.where(conv, tgt_conv, tgt_fc), 0)
    widx = tl.where(ok, tl.where(conv, w_conv, w_fc), 0)
    return tgt, widx, ok, 1.0 - 0.75 * pool.to(tl.float32)


# No int argument is specialised on (the entry count is B x K, fixed per call, but the
# sizes differ between networks and are not worth a variant each); constexprs: the tile.
@jit(do_not_specialize=("e", "k", "width", "n_maps", "list_width", "unit"))
def _image_deliver_kernel(vals_ptr, sel_ptr, slot_ptr, table_ptr, w_ptr, cur_ptr, cnt_ptr, e, k, width, n_maps,
                          list_width, unit, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live_e = es < e
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    j = tl.load(sel_ptr + es, mask=live_e, other=0)
    j = tl.where(live_e, j, width - 1)          # lanes past the entries: the dump (reaches nobody)
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0)
    tgt, widx, ok, scale = _lane(j, fs, slot_ptr, table_ptr, n_maps)
    v = v * scale.to(v.dtype)
    m = ok & (fs < list_width)[None, :]
    nonzero = m & (v != 0)[:, None]
    at = (es // k).to(tl.int64)[:, None] * width + tgt
    wt = tl.load(w_ptr + widx, mask=nonzero, other=0.0)
    tl.atomic_add(cur_ptr + at, wt * v[:, None], mask=nonzero, sem="relaxed")
    tl.atomic_add(cnt_ptr + at, tl.zeros([BLOCK_E, BLOCK_F], tl.int32) + unit, mask=m, sem="relaxed")


def _check(op: str, kernel, vals, sel, flat, source_slot, layers: ImageLayers, **buffers):
    check_tensors(op, kernel, vals=vals, sel=sel, flat=flat, source_slot=source_slot, table=layers.table,
                  **buffers)
    check_shape(op, "vals", vals, (None, None))
    check_dtype(op, "vals", vals, _FLOATS)
    check_shape(op, "sel", sel, tuple(vals.shape))
    check_dtype(op, "sel", sel, (torch.int64,))
    check_dtype(op, "flat", flat, (vals.dtype,))
    check_shape(op, "flat", flat, (layers.param_offsets[-1],))
    check_shape(op, "source_slot", source_slot, (layers.width,))
    check_dtype(op, "source_slot", source_slot, (torch.int64,))


def image_deliver_triton(vals: torch.Tensor, sel: torch.Tensor, flat: torch.Tensor, source_slot: torch.Tensor,
                         layers: ImageLayers, current: torch.Tensor, counts: torch.Tensor, unit: int = 1) -> None:
    """`image_deliver_torch` in one launch (see the module doc). Arguments as the twin's."""
    op = "image_deliver_triton"
    _check(op, _image_deliver_kernel, vals, sel, flat, source_slot, layers, current=current, counts=counts)
    check_shape(op, "current", current, (vals.shape[0], layers.width))
    check_accumulators(op, current, counts, vals.dtype)
    b, k = vals.shape
    if b * k == 0:
        return
    block_e = _block_e(_image_deliver_kernel)
    grid = (triton.cdiv(b * k, block_e), triton.cdiv(layers.list_width, _BLOCK_F))
    _image_deliver_kernel[grid](vals.contiguous(), sel.contiguous(), source_slot.contiguous(), layers.table,
                                flat.contiguous(), current, counts, b * k, k, layers.width, layers.n_maps,
                                layers.list_width, int(unit), BLOCK_E=block_e, BLOCK_F=_BLOCK_F)


# --- a step's receivers ---------------------------------------------------------------------
# A filler's delivery (SPEC 8 fill_slots: zero values, received, not counted) adds this
# to the received counts instead of 1: the low 16 bits count the real deliveries (at
# most K <= 4096 per column and step), the rest the fillers'. A column was received
# when its packed count is nonzero.
FILLER_COUNT = 1 << 16
_REAL_COUNT_MASK = FILLER_COUNT - 1


def receiver_list(cols: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every target of every delivered entry of a [B, K] selection `cols`, in shapes that
    do not depend on the data (no host read): (flat positions int64
    ``[B * K * list_width]`` into ``[B * W]``, bool valid), entry-major (lane
    ``e * list_width + f``). A column reached by several entries is listed once per
    entry; a lane that reaches nobody (the dump, outputs, a tap outside the map, a
    pooled row dropped by the floor) lists its sample's dump column, not valid. The
    targets of `_lane` (and of kernels/conv_deliver.py, kernels/rows_deliver.py)."""
    b, k = cols.shape
    n_maps, width = layers.n_maps, layers.width
    slot = source_slot[cols].view(-1)
    real = slot < n_maps
    g = layers.table[slot.clamp(max=n_maps - 1)]                          # [E, 10]
    is_conv, pool, h, w, c_out, src0, dst0 = (g[:, i] for i in range(7))
    # the channel does not move the window (`image_deliver`'s geometry)
    _, y, x, hm, wm, inside = map_position(cols.reshape(-1) - src0, h, w, pool)
    pos, ok = window(y, x, hm, wm)                                        # [E, 9]
    f = torch.arange(layers.list_width, device=cols.device)
    o, t = f // 9, f % 9
    conv = is_conv[:, None] > 0
    valid = (real & inside)[:, None] & torch.where(conv, (o < c_out[:, None]) & ok[:, t], f < c_out[:, None])
    tgt = dst0[:, None] + torch.where(conv, o * (hm * wm)[:, None] + pos[:, t], f)
    row = (torch.arange(b * k, device=cols.device) // k)[:, None] * width
    return (row + torch.where(valid, tgt, width - 1)).view(-1), valid.view(-1)


@dataclass
class ReceiverRows:
    """A listed step's backward record, one row per lane of its receiver list
    (``B x K x list_width``, `receiver_list`'s order), written by `listed_step`: each
    received column at exactly one lane (`received`), every other lane at its sample's
    dump column, not received."""

    idx: torch.Tensor       # int32 [R] flat positions into [B * W] (int64 past 2**31)
    v_pre: torch.Tensor     # [R] pre-spike potential V1
    refr: torch.Tensor      # bool [R] refractory before the step
    gate: torch.Tensor      # bool [R] received and synced
    received: torch.Tensor  # bool [R]

    @staticmethod
    def empty(n: int, dtype: torch.dtype, index_dtype: torch.dtype, alloc) -> "ReceiverRows":
        """Rows for `n` lanes from `alloc(n, dtype)` (an allocator of 1-D tensors)."""
        return ReceiverRows(alloc(n, index_dtype), alloc(n, dtype), alloc(n, torch.bool), alloc(n, torch.bool),
                            alloc(n, torch.bool))


def _claims(idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [R]: the first valid lane of each listed column (lane order)."""
    lanes = torch.arange(idx.numel(), device=idx.device)
    key = torch.where(valid, idx, -1 - lanes)  # invalid lanes: distinct keys, below every position
    sorted_key, order = key.sort(stable=True)
    first = torch.ones_like(valid)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return torch.zeros_like(valid).scatter(0, order, first) & valid


def listed_step_torch(cols: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                      current: torch.Tensor, counts: torch.Tensor, st, sync: torch.Tensor, theta: torch.Tensor,
                      source_f: torch.Tensor, is_source: torch.Tensor, is_hidden: torch.Tensor,
                      out_lo: int, out_hi: int, seed: int, t: int, step: int, p_ref: float,
                      book=None, out_fired: torch.Tensor | None = None, record: ReceiverRows | None = None, *,
                      refractory: bool, barrier: bool, policy_ms: bool) -> None:
    """Evaluate one step's receivers in place, after its deliveries (SPEC 5.4; the
    listed conv steps of `receivers.ListedReceivers`).

    Args:
        cols: int64 ``[B, K]`` the step's delivered columns (fillers as their columns,
            dropped entries as the dump): their targets are the receivers.
        source_slot, layers: as in `image_deliver_torch`.
        current, counts: ``[B, W]`` the step's deliveries (`image_deliver_torch`;
            counts int32, fillers' as `FILLER_COUNT`); zeroed at the receivers.
        st: the state (``v``, ``o``, ``acc`` [B, n_out], ``refr`` bool, ``n_in`` int32),
            updated in place at the receivers.
        sync, theta, source_f, is_source, is_hidden: ``[W]`` per-column tables.
        out_lo, out_hi: the output columns.
        seed, t, step, p_ref: refractory dropout (the `rng.STREAM_REFRACTORY_DROPOUT`
            uniform at (sample, column), as the whole-state evaluation draws it).
        book: the pass's bookkeeping (`step_spec.PassTensors`: pending, pre_spike,
            spike_sum, fillable, hist; updated in place), or None (a replay).
        out_fired: bool ``[B]`` (zero), set where an output neuron fired; with `book`.
        record: rows to write the backward record into (`ReceiverRows`), or None.
        refractory, barrier, policy_ms: the knobs.

    Each received column is evaluated once (`_claims`: at the first lane listing it;
    the kernel: at the lane that takes its count). The same operations as the
    whole-state evaluation (`lif_torch`), so the same numbers."""
    w = layers.width
    idx, valid = receiver_list(cols, source_slot, layers)
    claimed = _claims(idx, valid)
    idx = torch.where(claimed, idx, idx - idx % w + w - 1)  # the others: their sample's dump
    col = idx % w
    packed = counts.view(-1)[idx]
    n_add = packed & _REAL_COUNT_MASK
    cur = current.view(-1)[idx]
    current.view(-1).index_fill_(0, idx, 0.0)  # zero again where the step wrote
    counts.view(-1).index_fill_(0, idx, 0)
    v0, o0, n_before, refr = (x.view(-1)[idx] for x in (st.v, st.o, st.n_in, st.refr))
    n_in = torch.where(claimed, n_before + n_add, n_before)
    gate = claimed & (n_in >= sync[col])
    v, spikes, v_pre = lif_torch(v0, cur, refr, claimed, gate, theta[col])
    fired = spikes > 0
    is_out = (col >= out_lo) & (col < out_hi)
    n_acc = st.acc.numel()
    acc = torch.cat([st.acc.reshape(-1), st.acc.new_zeros(1)])  # the last: a scratch slot
    acc_at = torch.where(fired & is_out, (idx // w) * (out_hi - out_lo) + col - out_lo, n_acc)
    acc_new = acc[acc_at] + spikes
    st.v.view(-1)[idx] = v
    st.n_in.view(-1)[idx] = n_in
    st.o.view(-1)[idx] = o0 + spikes * source_f[col]
    acc[acc_at] = acc_new
    st.acc.copy_(acc[:n_acc].view_as(st.acc))
    refr_after = refr
    if refractory:
        now = fired
        if p_ref > 0:
            u = rng.uniform_at(seed, rng.STREAM_REFRACTORY_DROPOUT, t, step, idx // w, col)
            now = now & (u >= p_ref)
        refr_after = refr | now
        st.refr.view(-1)[idx] = refr_after
    if book is not None:
        src = is_source[col]
        new = fired & src
        if barrier:
            new = new | ((n_before < sync[col]) & (n_in >= sync[col]) & src)
        book.pending.view(-1)[idx] = book.pending.view(-1)[idx] | new
        if book.fillable is not None:
            book.fillable.view(-1)[idx] = book.fillable.view(-1)[idx] | (gate & ~refr & is_hidden[col])
        if policy_ms:
            book.pre_spike.view(-1)[idx] = torch.where(fired, v_pre, book.pre_spike.view(-1)[idx])
        book.spike_sum.view(-1)[idx] = book.spike_sum.view(-1)[idx] + spikes
        per_sample = torch.zeros(out_fired.shape, dtype=torch.int32, device=idx.device)
        out_fired |= per_sample.index_add_(0, idx // w, (fired & is_out).to(torch.int32)) > 0
        if book.hist is not None:
            bins = book.hist.numel()
            book.hist.scatter_add_(0, n_in.clamp(max=bins - 1).long(), (fired & claimed).long())
    if record is not None:
        record.idx.copy_(idx)
        record.v_pre.copy_(torch.where(claimed, v_pre, 0.0))
        record.refr.copy_(refr & claimed)
        record.gate.copy_(gate)
        record.received.copy_(claimed)


# Constexprs: the tile and the knobs (fixed per call); no int argument specialised on.
@jit(do_not_specialize=("e", "k", "width", "n_maps", "list_width", "out_lo", "out_hi", "n_bins", "h_refr"))
def _listed_step_kernel(cols_ptr, slot_ptr, table_ptr, cur_ptr, cnt_ptr, v_ptr, o_ptr, nin_ptr, refr_ptr, acc_ptr,
                        sync_ptr, theta_ptr, srcf_ptr, is_src_ptr, hidden_ptr, pend_ptr, fillable_ptr, pre_ptr,
                        ssum_ptr, fired_ptr, hist_ptr, r_idx_ptr, r_vpre_ptr, r_refr_ptr, r_gate_ptr, r_recv_ptr,
                        e, k, width, n_maps, list_width, out_lo, out_hi, n_bins, h_refr, p_ref,
                        BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr, REFRACTORY: tl.constexpr,
                        HAS_PREF: tl.constexpr, BARRIER: tl.constexpr, POLICY_MS: tl.constexpr,
                        FILL: tl.constexpr, BOOKKEEP: tl.constexpr, HISTOGRAM: tl.constexpr, RECORD: tl.constexpr):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live_e = es < e
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    j = tl.load(cols_ptr + es, mask=live_e, other=0)
    j = tl.where(live_e, j, width - 1)
    tgt, _widx, ok, _scale = _lane(j, fs, slot_ptr, table_ptr, n_maps)
    lanes = live_e[:, None] & (fs < list_width)[None, :]
    m = ok & lanes
    b = (es // k).to(tl.int64)[:, None]
    at = b * width + tgt
    # the claim: the lane that takes a column's count evaluates it (once per column)
    packed = tl.atomic_xchg(cnt_ptr + at, tl.zeros([BLOCK_E, BLOCK_F], tl.int32), mask=m, sem="relaxed")
    claimed = m & (packed > 0)
    n_add = packed & 0xFFFF
    cur = tl.load(cur_ptr + at, mask=claimed, other=0.0)
    tl.store(cur_ptr + at, tl.zeros_like(cur), mask=claimed)
    v0 = tl.load(v_ptr + at, mask=claimed, other=0.0)
    o0 = tl.load(o_ptr + at, mask=claimed, other=0.0)
    n_before = tl.load(nin_ptr + at, mask=claimed, other=0)
    refr0 = tl.load(refr_ptr + at, mask=claimed, other=0) != 0
    sync = tl.load(sync_ptr + tgt, mask=claimed, other=0)
    theta = tl.load(theta_ptr + tgt, mask=claimed, other=0.0)
    n_in = n_before + n_add
    gate = claimed & (n_in >= sync)
    v_pre = tl.where(refr0, 0.0, v0 + cur)
    s = (gate & (v_pre >= theta)).to(v0.dtype)
    fired = s > 0
    tl.store(v_ptr + at, v_pre - v_pre * s, mask=claimed)
    tl.store(nin_ptr + at, n_in, mask=claimed)
    tl.store(o_ptr + at, o0 + s * tl.load(srcf_ptr + tgt, mask=claimed, other=0.0), mask=claimed)
    is_out = (tgt >= out_lo) & (tgt < out_hi)
    out_at = b * (out_hi - out_lo) + (tgt - out_lo)
    at_out = claimed & fired & is_out
    tl.store(acc_ptr + out_at, tl.load(acc_ptr + out_at, mask=at_out, other=0.0) + s, mask=at_out)
    if REFRACTORY:
        now = fired
        if HAS_PREF:  # the whole-state evaluation's draw at (sample, column)
            u = _uniform_at_from_hash(h_refr.to(tl.uint32), b + tl.zeros_like(tgt), tgt)
            now = now & (u >= p_ref)
        tl.store(refr_ptr + at, (refr0 | now).to(tl.uint8), mask=claimed)
    if BOOKKEEP:
        src = tl.load(is_src_ptr + tgt, mask=claimed, other=0) != 0
        new = fired & src
        if BARRIER:
            new = new | ((n_before < sync) & (n_in >= sync) & src)
        pend = tl.load(pend_ptr + at, mask=claimed, other=0) != 0
        tl.store(pend_ptr + at, (pend | new).to(tl.uint8), mask=claimed)
        if FILL:
            hidden = tl.load(hidden_ptr + tgt, mask=claimed, other=0) != 0
            fillable = tl.load(fillable_ptr + at, mask=claimed, other=0) != 0
            tl.store(fillable_ptr + at, (fillable | (gate & ~refr0 & hidden)).to(tl.uint8), mask=claimed)
        if POLICY_MS:
            pre = tl.load(pre_ptr + at, mask=claimed, other=0.0)
            tl.store(pre_ptr + at, tl.where(fired, v_pre, pre), mask=claimed)
        tl.store(ssum_ptr + at, tl.load(ssum_ptr + at, mask=claimed, other=0.0) + s, mask=claimed)
        tl.store(fired_ptr + b + tl.zeros_like(tgt), tl.full([BLOCK_E, BLOCK_F], 1, tl.uint8), mask=at_out)
        if HISTOGRAM:
            tl.atomic_add(hist_ptr + tl.minimum(n_in, n_bins - 1), tl.full([BLOCK_E, BLOCK_F], 1, tl.int64),
                          mask=claimed & fired, sem="relaxed")
    if RECORD:
        r = es.to(tl.int64)[:, None] * list_width + fs[None, :]
        tl.store(r_idx_ptr + r, tl.where(claimed, at, b * width + width - 1), mask=lanes)
        tl.store(r_vpre_ptr + r, tl.where(claimed, v_pre, 0.0), mask=lanes)
        tl.store(r_refr_ptr + r, (refr0 & claimed).to(tl.uint8), mask=lanes)
        tl.store(r_gate_ptr + r, gate.to(tl.uint8), mask=lanes)
        tl.store(r_recv_ptr + r, claimed.to(tl.uint8), mask=lanes)


_LISTED_BLOCK_E, _LISTED_BLOCK_F = 1, 256


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def listed_step_triton(cols: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                       current: torch.Tensor, counts: torch.Tensor, st, sync: torch.Tensor, theta: torch.Tensor,
                       source_f: torch.Tensor, is_source: torch.Tensor, is_hidden: torch.Tensor,
                       out_lo: int, out_hi: int, seed: int, t: int, step: int, p_ref: float,
                       book=None, out_fired: torch.Tensor | None = None, record: ReceiverRows | None = None, *,
                       refractory: bool, barrier: bool, policy_ms: bool) -> None:
    """`listed_step_torch` in one launch (see the module doc and the twin): programs tile
    (entry, target block) lanes; a lane that reaches a column takes its packed count
    (atomic exchange with 0): the one lane that gets it nonzero evaluates the column,
    the others leave it. Arguments as the twin's."""
    op = "listed_step_triton"
    b, k = cols.shape
    w = layers.width
    tensors = dict(cols=cols, current=current, counts=counts, v=st.v, o=st.o, n_in=st.n_in, refr=st.refr,
                   acc=st.acc, sync=sync, theta=theta, source_f=source_f)
    check_tensors(op, _listed_step_kernel, table=layers.table, **tensors)
    check_shape(op, "cols", cols, (None, None))
    check_dtype(op, "cols", cols, (torch.int64,))
    dtype = st.v.dtype
    check_dtype(op, "v", st.v, _FLOATS)
    for name in ("current", "v", "o", "n_in", "refr"):
        check_shape(op, name, tensors[name], (b, w))
    for name in ("current", "o", "theta", "source_f"):
        check_dtype(op, name, tensors[name], (dtype,))
    check_dtype(op, "counts", counts, (torch.int32,))
    check_dtype(op, "n_in", st.n_in, (torch.int32,))
    check_dtype(op, "sync", sync, (torch.int32,))
    check_shape(op, "acc", st.acc, (b, out_hi - out_lo))
    for name, x in tensors.items():
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} is read and written in place and must be contiguous")
    if book is not None and out_fired is None:
        raise ValueError(f"{op}: the pass's bookkeeping (book) needs out_fired")
    if b * k == 0:
        return
    fill = book is not None and book.fillable is not None
    hist = book.hist if book is not None else None
    any_ = st.refr  # a tensor never read where a flag is off
    bk = (book.pending, book.fillable if fill else any_, book.pre_spike, book.spike_sum) if book is not None \
        else (any_, any_, st.v, st.v)
    rec = (record.idx, record.v_pre, record.refr, record.gate, record.received) if record is not None else None
    grid = (triton.cdiv(b * k, _LISTED_BLOCK_E), triton.cdiv(layers.list_width, _LISTED_BLOCK_F))
    _listed_step_kernel[grid](
        cols.contiguous(), source_slot, layers.table, current, counts, st.v, st.o, st.n_in, _u8(st.refr), st.acc,
        sync, theta, source_f, _u8(is_source), _u8(is_hidden), *map(_u8, bk),
        _u8(out_fired) if out_fired is not None else _u8(any_), hist if hist is not None else st.n_in,
        *(map(_u8, rec) if rec is not None else (any_,) * 5),
        b * k, k, w, layers.n_maps, layers.list_width, out_lo, out_hi, 0 if hist is None else hist.numel(),
        hash_arg(rng.counter_hash(seed, rng.STREAM_REFRACTORY_DROPOUT, t, step)), float(p_ref),
        BLOCK_E=_LISTED_BLOCK_E, BLOCK_F=_LISTED_BLOCK_F, REFRACTORY=bool(refractory), HAS_PREF=p_ref > 0,
        BARRIER=bool(barrier), POLICY_MS=bool(policy_ms), FILL=fill, BOOKKEEP=book is not None,
        HISTOGRAM=hist is not None, RECORD=record is not None, enable_fp_fusion=False)


# --- the reverse of a step ------------------------------------------------------------------
def backward_segments(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor, flat: torch.Tensor,
                      source_slot: torch.Tensor, layers: ImageLayers, grad_flat: torch.Tensor,
                      kernels: dict) -> torch.Tensor:
    """The reverse of `deliver_segments`: each layer's backward (`kernels`: map kind ->
    (deliver, backward)) over its own segment of the entries sorted by layer. Adds the
    weight gradients into `grad_flat` in place; returns the values' gradient [B, K]
    (0 at entries of outputs and the dump)."""
    b, k = sel.shape
    grad_vals = torch.zeros_like(vals).view(-1)
    order, src, seg = layers.segments(sel, source_slot)
    sorted_vals, sample = vals.reshape(-1)[order], order // k
    sorted_grad = torch.zeros_like(sorted_vals)
    for l, kind in enumerate(layers.kinds):
        gv, gw = kernels[kind][1](grad_current, sorted_vals, sample, src, layers.weight(flat, l), layers.in_shapes[l],
                                  layers.pools[l], layers.out_offsets[l], seg[l])
        sorted_grad += gv  # 0 outside the segment: each entry gets its own layer's
        layers.weight(grad_flat, l).add_(gw)
    grad_vals.index_copy_(0, order, sorted_grad)
    return grad_vals.view(b, k)


def image_deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                                 flat: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                                 grad_flat: torch.Tensor) -> torch.Tensor:
    """The reverse of `image_deliver_torch` for the current's gradient `grad_current`
    ``[B, W]``: adds the weight gradients into `grad_flat` ``[P]`` (in place) and returns
    the gradient of the values ``[B, K]`` (0 at entries of outputs and the dump; zero
    values get theirs too)."""
    return backward_segments(grad_current, vals, sel, flat, source_slot, layers, grad_flat, TWINS)


# As `_image_deliver_kernel`; n_fb (target blocks) too.
@jit(do_not_specialize=("e", "k", "width", "n_maps", "list_width", "n_fb"))
def _image_deliver_backward_kernel(grad_ptr, vals_ptr, sel_ptr, slot_ptr, table_ptr, w_ptr, part_ptr, gw_ptr, e, k,
                                   width, n_maps, list_width, n_fb, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_f = tl.program_id(1)
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    live_e = es < e
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    j = tl.load(sel_ptr + es, mask=live_e, other=0)
    j = tl.where(live_e, j, width - 1)
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0)
    tgt, widx, ok, scale = _lane(j, fs, slot_ptr, table_ptr, n_maps)
    scale = scale.to(v.dtype)
    m = ok & (fs < list_width)[None, :]
    g = tl.load(grad_ptr + (es // k).to(tl.int64)[:, None] * width + tgt, mask=m, other=0.0)
    # zero-valued entries still get d/dvals (barrier messages and silent neurons do)
    part = tl.sum(g * tl.load(w_ptr + widx, mask=m, other=0.0), axis=1)
    tl.store(part_ptr + es.to(tl.int64) * n_fb + pid_f, part * scale, mask=live_e)
    v = v * scale
    tl.atomic_add(gw_ptr + widx, g * v[:, None], mask=m & (v != 0)[:, None], sem="relaxed")


def image_deliver_backward_triton(grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                                  flat: torch.Tensor, source_slot: torch.Tensor, layers: ImageLayers,
                                  grad_flat: torch.Tensor) -> torch.Tensor:
    """`image_deliver_backward_torch` in one launch (and a sum): each target block's
    partial dot products summed in a fixed order (deterministic values' gradient), the
    weight gradients added with float atomics (order nondeterministic, as the per-layer
    kernels' default). Arguments as the twin's."""
    op = "image_deliver_backward_triton"
    _check(op, _image_deliver_backward_kernel, vals, sel, flat, source_slot, layers, grad_current=grad_current,
           grad_flat=grad_flat)
    b, k = vals.shape
    check_shape(op, "grad_current", grad_current, (b, layers.width))
    check_dtype(op, "grad_current", grad_current, (vals.dtype,))
    check_shape(op, "grad_flat", grad_flat, tuple(flat.shape))
    check_dtype(op, "grad_flat", grad_flat, (vals.dtype,))
    if not grad_flat.is_contiguous():
        raise ValueError(f"{op}: grad_flat is added into in place and must be contiguous")
    n_fb = triton.cdiv(layers.list_width, _BLOCK_F)
    part = torch.empty(b * k, n_fb, dtype=vals.dtype, device=vals.device)
    if b * k == 0:
        return vals.new_zeros(b, k)
    block_e = _block_e(_image_deliver_backward_kernel)
    _image_deliver_backward_kernel[(triton.cdiv(b * k, block_e), n_fb)](
        grad_current.contiguous(), vals.contiguous(), sel.contiguous(), source_slot.contiguous(), layers.table,
        flat.contiguous(), part, grad_flat, b * k, k, layers.width, layers.n_maps, layers.list_width, n_fb,
        BLOCK_E=block_e, BLOCK_F=_BLOCK_F)
    return (part.sum(1) if n_fb > 1 else part.view(-1)).view(b, k)


def listed_backward_torch(rows: ReceiverRows, adj_v: torch.Tensor, adj_o: torch.Tensor, adj_acc: torch.Tensor,
                          armed: torch.Tensor | None, g_current: torch.Tensor, theta: torch.Tensor,
                          source_f: torch.Tensor, out_lo: int, out_hi: int, alpha: float, detach_reset: bool) -> None:
    """The reverse of a listed step's evaluation (`listed_step_torch`) at its record's
    received lanes (`ReceiverRows`), in place: the spikes' adjoint (outboxes of sources,
    the output accumulator), the LIF backward (`lif_backward_torch`), the membranes'
    adjoint `adj_v` and the current's gradient written into the zero buffer `g_current`
    (both ``[B, W]``, contiguous) at the receivers, and `armed` (bool ``[B, W]``,
    `SimConfig.surrogate_at="fire_or_last"`, else None) cleared there. The other lanes
    (their sample's dump column) change nothing."""
    w = adj_v.shape[1]
    idx = rows.idx.long()
    col = idx % w
    g_s = adj_o.reshape(-1)[idx] * source_f[col]
    at_out = (col >= out_lo) & (col < out_hi)
    acc_at = (idx // w) * (out_hi - out_lo) + col - out_lo
    g_s = torch.where(at_out, g_s + adj_acc.reshape(-1)[torch.where(at_out, acc_at, 0)], g_s)
    last = None if armed is None else armed.view(-1)[idx]
    gv, gi = lif_backward_torch(adj_v.reshape(-1)[idx], g_s, rows.v_pre, rows.refr, rows.received, rows.gate,
                                theta[col], alpha, detach_reset, last)
    if armed is not None:  # an evaluation met: the earlier ones are not the last
        armed.view(-1)[idx] = last & ~rows.received
    adj_v.view(-1)[idx] = gv
    g_current.view(-1)[idx] = gi


# Constexprs: the tile and the knobs; no int argument specialised on.
@jit(do_not_specialize=("n", "width", "out_lo", "out_hi"))
def _listed_backward_kernel(idx_ptr, recv_ptr, vpre_ptr, refr_ptr, gate_ptr, gv_ptr, go_ptr, gacc_ptr, armed_ptr,
                            gcur_ptr, theta_ptr, srcf_ptr, const_ptr, n, width, out_lo, out_hi,
                            BLOCK: tl.constexpr, DETACH_RESET: tl.constexpr, ARMED: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = r < n
    recv = (tl.load(recv_ptr + r, mask=live, other=0) != 0) & live
    at = tl.load(idx_ptr + r, mask=recv, other=0).to(tl.int64)
    col = at % width
    b = at // width
    gvn = tl.load(gv_ptr + at, mask=recv, other=0.0)
    g_s = tl.load(go_ptr + at, mask=recv, other=0.0) * tl.load(srcf_ptr + col, mask=recv, other=0.0)
    at_out = recv & (col >= out_lo) & (col < out_hi)
    g_s = tl.where(at_out, g_s + tl.load(gacc_ptr + b * (out_hi - out_lo) + col - out_lo, mask=at_out, other=0.0),
                   g_s)
    v_pre = tl.load(vpre_ptr + r, mask=recv, other=0.0)
    refr = tl.load(refr_ptr + r, mask=recv, other=0) != 0
    gate = tl.load(gate_ptr + r, mask=recv, other=0) != 0
    theta = tl.load(theta_ptr + col, mask=recv, other=0.0)
    half_alpha = tl.load(const_ptr)
    scale = tl.load(const_ptr + 1)
    s = (gate & (v_pre >= theta)).to(v_pre.dtype)
    y = scale * (v_pre - theta)
    den = 1 + y * y
    # the twin's (alpha / 2) / den: torch takes 1 / den, then the product
    if v_pre.dtype == tl.float32:
        sur = tl.math.div_rn(tl.full(den.shape, 1.0, tl.float32), den) * half_alpha
    else:
        sur = (1.0 / den) * half_alpha
    counts = gate
    if ARMED:  # fire_or_last: only evaluations that fire or end their window
        counts = gate & ((s > 0) | (tl.load(armed_ptr + at, mask=recv, other=0) != 0))
    dsdv = tl.where(counts, sur, 0.0)
    g_pre = gvn * (1 - s)
    if not DETACH_RESET:
        g_pre = g_pre - gvn * v_pre * dsdv
    g_pre = g_pre + g_s * dsdv
    g_pre = tl.where(~refr, g_pre, 0.0)  # received lanes only
    if ARMED:
        tl.store(armed_ptr + at, tl.zeros_like(refr).to(tl.uint8), mask=recv)
    tl.store(gv_ptr + at, g_pre, mask=recv)
    tl.store(gcur_ptr + at, g_pre, mask=recv)


_BACKWARD_BLOCK = 1024


def listed_backward_triton(rows: ReceiverRows, adj_v: torch.Tensor, adj_o: torch.Tensor, adj_acc: torch.Tensor,
                           armed: torch.Tensor | None, g_current: torch.Tensor, theta: torch.Tensor,
                           source_f: torch.Tensor, out_lo: int, out_hi: int, alpha: float, detach_reset: bool) -> None:
    """`listed_backward_torch` in one launch over the record's lanes (each received
    column at one lane: no two lanes write one column). The same operations in the
    same order as the twin (the surrogate as torch evaluates it: 1 / den, then the
    product; no FMA contraction), so the same numbers. Arguments as the twin's."""
    op = "listed_backward_triton"
    check_tensors(op, _listed_backward_kernel, idx=rows.idx, adj_v=adj_v, adj_o=adj_o, adj_acc=adj_acc,
                  g_current=g_current, theta=theta)
    b, w = adj_v.shape
    for name, x in (("adj_v", adj_v), ("adj_o", adj_o), ("g_current", g_current)):
        check_shape(op, name, x, (b, w))
        check_dtype(op, name, x, (rows.v_pre.dtype,))
        if not x.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
    check_shape(op, "adj_acc", adj_acc, (b, out_hi - out_lo))
    n = rows.idx.numel()
    if n == 0:
        return
    const = surrogate_constants(alpha, adj_v.dtype, adj_v.device)
    _listed_backward_kernel[(triton.cdiv(n, _BACKWARD_BLOCK),)](
        rows.idx, _u8(rows.received), rows.v_pre, _u8(rows.refr), _u8(rows.gate), adj_v, adj_o,
        adj_acc.contiguous(), _u8(armed) if armed is not None else _u8(rows.refr), g_current, theta, source_f, const,
        n, w, out_lo, out_hi, BLOCK=_BACKWARD_BLOCK, DETACH_RESET=bool(detach_reset), ARMED=armed is not None,
        enable_fp_fusion=False)
