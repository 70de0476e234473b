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

from ._triton import (check_accumulators, check_dtype, check_shape, check_tensors, is_interpreted, jit, tl,
                      triton)
from .conv_deliver import conv_deliver_backward_torch, conv_deliver_torch
from .image_deliver import map_position, window
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
