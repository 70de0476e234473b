"""Conv deliver: the currents one forward step sends through a 3x3 convolution
(stride 1, padding 1), optionally behind a folded 2x2 average pooling (SPEC 1), and
the backward of that.

A convolutional source's fan-out cannot be tabulated in the flat index space (VGG-7:
65536 sources x 576 targets), so targets are computed from the source's position.
Source ``(c, y, x)`` of a ``[C_in, H, W]`` layer (pooled: the input position
``(c, y // 2, x // 2)`` of a ``[C_in, H // 2, W // 2]`` map, value / 4; rows and columns
dropped by the floor of an odd size reach nobody) reaches target ``(o, y + 1 - ky,
x + 1 - kx)`` with weight ``W[o, c, ky, kx]`` for every ``o, ky, kx`` whose target lies
inside the map (cross-correlation, as ``torch.nn.functional.conv2d``). So one
delivery gathers the ``W[:, c]`` slice (``[C_out, 3, 3]``) and adds it into the window;
targets outside the map are sent to the dump column with a zero value and are not
counted.

The inputs are lists of E delivered entries ``(sample, source, value)`` of one source
layer (the engine splits a step's [B, K] selection per layer). Optional ``segment``
(int64 ``[2]`` device tensor (start, count); every launcher and twin takes it): only
entries [start, start + count) of the arrays count, the others add no current, no
count and no weight gradient, and get grad_vals 0. The sync-free mode of CUDA passes
a step's B x K entries sorted by layer to every layer's launch with that layer's
segment, so nothing is read on the host; the kernels read (start, count) on the
device, the grid still covers all E entries (a launch does not know its count) and
the entry blocks past the count have no live lane and run no tap (masked, no early
``return``); the twins mask instead of slicing (no data-dependent shapes) and give
bitwise what their unsegmented call on the slice gives. The forward writes into
the caller's [B, W] buffers in place (a Triton kernel does the same with atomics) and
keeps nothing; the backward recomputes the windows (E x C_out x 9 index arithmetic is
cheaper than keeping a float and an int64 per target per step).

Cost: the window geometry is computed once per entry ([E, 9]); only the gather of
``W[:, c]``, one multiply, one index add and the flat index ([E, C_out, 9]) touch every
target. Targets outside the map keep a valid in-map index with a zero coefficient
instead of a dump redirect, and the received counts are added per spatial position
([B, H' x W']) and broadcast over the output channels (every channel of a position
hears the same sources): 0.4 s -> 0.13 s per forward step of VGG-7 at K = 512,
batch 8, 2 CPU threads, against masking every [E, C_out, 9] element.

Triton (`conv_deliver_triton`, `conv_deliver_backward_triton`, same signatures as the
twins): programs tile (entry block, output-channel block) and loop over the 9 taps,
so the window geometry is computed once per entry and each tap is one
[BLOCK_E, BLOCK_OUT] gather of ``W[o, c, ky, kx]`` and one scatter.
- Forward: float atomics into ``current`` (skipped for zero values, which add
  nothing) and int32 atomics of 1 into ``counts`` (zero values too: a barrier message
  is a received current). Several entries of one sample share targets, so the order
  of the float additions, hence the last bits of a current, can change from run to
  run (counts are exact); tests bound the error by 2x that of the twin against fp64.
  As in `kernels/deliver.py`, a potential within rounding of theta can therefore fire
  in one run and not in another.
- Backward, grad_vals: each channel block writes its partial dot product to
  ``[E, nO]`` and torch sums the partials in a fixed order: deterministic. With a
  segment, each launch zero-fills its own ``[E, nO]`` (E = B x K: small) and writes
  its segment's rows only (the caller adds the L launches' grad_vals; a partials
  buffer shared by the launches would need an argument the twins do not have).
- Backward, grad_weight: entries of one input channel share the ``W[:, c]`` slice.
  Default (``deterministic=False``): float atomics, order nondeterministic.
  ``deterministic=True``: the nonzero-valued entries are sorted by channel (stable)
  and one program per (channel, channel-out block) sums its segment in entry order
  and stores without atomics; bitwise reproducible, serialises the entries of a
  channel (a segment is about E / C_in long). Entries outside a ``segment`` sort with
  the zero values, past the last channel.
Supported: float32 and float64 (vals, weight, current and grad_current alike),
indices int32 or int64, counts int32, contiguous ``current`` / ``counts`` (written in
place). ``src`` must lie in ``[0, C_in * H * W)`` and ``sample`` in ``[0, B)``; they
are not checked (that would cost a host sync per call).
"""

from __future__ import annotations

import torch

from ._triton import entry_block, jit, segment_mask, tl, triton
from .image_deliver import backward_launch, check_backward, check_forward, deliver_launch, map_position, window


def _window(src: torch.Tensor, in_shape: tuple[int, int, int], pool: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """Window of each entry: (channel c [E], spatial target [E, 9] int64 (0 where
    invalid), valid bool [E, 9], value scale, H' x W' of the conv's map)
    (`image_deliver.map_position`, `image_deliver.window`)."""
    _, h, w = in_shape
    c, y, x, hp, wp, inside = map_position(src, h, w, pool)
    pos, valid = window(y, x, hp, wp)
    valid = valid & inside[:, None]
    return c, torch.where(valid, pos, 0), valid, (0.25 if pool else 1.0), hp * wp


def _targets(sample, pos, c_out, hw, out_offset, width):
    """Flat index into a [B, W] buffer viewed 1-D: [E, C_out, 9]."""
    base = (sample * width + out_offset)[:, None] + pos                          # [E, 9]
    chan = torch.arange(c_out, device=pos.device) * hw
    return base[:, None, :] + chan[None, :, None]


def _rows(weight: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``W[:, c]`` per entry: [E, C_out, 9]."""
    c_out, c_in = weight.shape[:2]
    return weight.reshape(c_out, c_in, 9).transpose(0, 1)[c]


def conv_deliver_torch(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                       weight: torch.Tensor, in_shape: tuple[int, int, int], pool: bool,
                       out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                       segment: torch.Tensor | None = None) -> None:
    """Add the currents and received counts of E delivered entries (in place).

    Args:
        vals: ``[E]`` delivered outbox values (a zero value still counts as received).
        sample: int64 ``[E]`` batch row of each entry.
        src: int64 ``[E]`` source index inside its layer, ``c * H * W + y * W + x``.
        weight: ``[C_out, C_in, 3, 3]`` conv weight.
        in_shape: ``(C_in, H, W)`` of the source layer (before pooling).
        pool: a 2x2 average pooling sits between the source layer and the conv.
        out_offset: flat index of the target layer's first neuron.
        current: ``[B, W]`` float, += the currents.
        counts: ``[B, W]`` int32, += number of entries that reached each column.
        segment: int64 ``[2]`` (start, count) on the entries' device, or None (all):
            only entries [start, start + count) deliver; the others add nothing.
    """
    c_out = weight.shape[0]
    vals, sample, src, live = segment_mask(segment, vals, sample, src)
    c, pos, valid, scale, hw = _window(src, in_shape, pool)
    if live is not None:
        valid = valid & live[:, None]
    b, width = current.shape
    coef = valid * (vals * scale)[:, None]                                       # [E, 9]
    contrib = _rows(weight, c) * coef[:, None, :]
    current.view(-1).index_add_(0, _targets(sample, pos, c_out, hw, out_offset, width).view(-1),
                                contrib.view(-1))
    spatial = torch.zeros(b * hw, dtype=counts.dtype, device=counts.device)
    spatial.index_add_(0, (sample[:, None] * hw + pos).view(-1), valid.view(-1).to(counts.dtype))
    counts[:, out_offset:out_offset + c_out * hw].view(b, c_out, hw).add_(spatial.view(b, 1, hw))


def conv_deliver_backward_torch(grad_current: torch.Tensor, vals: torch.Tensor,
                                sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                in_shape: tuple[int, int, int], pool: bool, out_offset: int,
                                segment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `conv_deliver_torch`'s current w.r.t. the values and the weight.

    Args: grad_current ``[B, W]``; the rest as in `conv_deliver_torch`.

    Returns:
        grad_vals ``[E]`` (0 outside the segment); grad_weight ``[C_out, C_in, 3, 3]``
        (entries of one input channel accumulate, across samples too).
    """
    c_out, c_in = weight.shape[:2]
    vals, sample, src, live = segment_mask(segment, vals, sample, src)
    c, pos, valid, scale, hw = _window(src, in_shape, pool)
    if live is not None:
        valid = valid & live[:, None]
    width = grad_current.shape[1]
    g = grad_current.reshape(-1)[_targets(sample, pos, c_out, hw, out_offset, width)]  # [E, C_out, 9]
    grad_vals = ((g * _rows(weight, c)).sum(1) * valid).sum(1) * scale
    coef = valid * (vals * scale)[:, None]
    grad_t = weight.new_zeros(c_in, c_out, 9)
    grad_t.index_add_(0, c, g * coef[:, None, :])
    return grad_vals, grad_t.transpose(0, 1).reshape(weight.shape)


# --- Triton ---------------------------------------------------------------------------
# (BLOCK_E, BLOCK_OUT) per tap, 4 warps; the two classes of `_blocks`: layers of at most
# 16 output channels, and all wider ones. sm_90 cubins of the forward (fp32; runtime
# pool): 4 x 64 takes 48 registers, 16 x 16 48, 8 x 64 72 and 32 x 16 72 (a thread
# then holds two or four entries' int64 state), 4 x 128 52; with the taps unrolled,
# 8 x 128 took 162 (255 + a stack frame), so the taps run as a loop.
_NARROW = (16, 16)
_WIDE = (4, 64)


@jit
def _source(src, h, w, pool):
    """(channel, row, column, rows, columns) of the map the conv reads (after pooling:
    `pool` is 0 or 1, and halving a non-negative coordinate or size is a shift by it;
    the in-map remainder is below H x W, an int32)."""
    hw = h * w
    c = src // hw
    rem = (src - c * hw).to(tl.int32)
    y = rem // w
    x = rem - y * w
    return c, y >> pool, x >> pool, h >> pool, w >> pool


# Compiled variants: one per dtype (floats, indices) and channel tile, whatever the layer.
# No int argument is specialised on: the entry count e changes every step, and the
# layer geometry (c_out, c_in, h, w, out_offset; n_ob) and the pooling flag `pool`
# (0 / 1) from layer to layer, which would compile one variant per layer and per
# 1 / multiple-of-16 class of e. Gathers and scatters are per element, so no alignment
# hint is lost. `pool` is used branch-free: coordinates and sizes are shifted by it,
# values scaled by 1 - 0.75 * pool (1.0 or 0.25, both exact, so the products are those
# of the constexpr branch it replaced, in fp32 and fp64). Constexprs: the tile only,
# (BLOCK_E, BLOCK_OUT) in two classes by C_out (`_blocks`; never by e), so a network needs
# at most 2 variants of each kernel per dtype (VGG-7: 1 at full width, where every C_out
# is a multiple of 64; 1 for the narrow copies of the tests, C_out <= 16).
_NOT_SPECIALISED = ("e", "c_out", "c_in", "h", "w", "width", "out_offset", "pool")


@jit(do_not_specialize=_NOT_SPECIALISED)
def _conv_deliver_kernel(vals_ptr, sample_ptr, src_ptr, w_ptr, cur_ptr, cnt_ptr, e, c_out, c_in, h, w,
                         width, out_offset, pool, seg_ptr, BLOCK_E: tl.constexpr, BLOCK_OUT: tl.constexpr,
                         SEGMENT: tl.constexpr):
    es, live_e, n_taps = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 9)
    oc = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    live_o = (oc < c_out)[None, :]
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0) * (1.0 - 0.75 * pool)
    s = tl.load(sample_ptr + es, mask=live_e, other=0).to(tl.int64)
    c, y, x, hp, wp = _source(tl.load(src_ptr + es, mask=live_e, other=0).to(tl.int64), h, w, pool)
    inside = live_e & (y < hp) & (x < wp)        # pooled odd sizes drop the last row/col
    base = s * width + out_offset
    chan = (oc.to(tl.int64) * (hp * wp))[None, :]
    w_row = (oc.to(tl.int64) * (c_in * 9))[None, :]
    nonzero = (v != 0)[:, None]
    ones = tl.full([BLOCK_E, BLOCK_OUT], 1, tl.int32)
    for t in range(n_taps):                      # tap t = ky * 3 + kx reaches (y + 1 - ky, x + 1 - kx)
        oy = y + (1 - t // 3)
        ox = x + (1 - t % 3)
        ok = inside & (oy >= 0) & (oy < hp) & (ox >= 0) & (ox < wp)
        tgt = (base + tl.where(ok, oy * wp + ox, 0))[:, None] + chan
        m = ok[:, None] & live_o
        wt = tl.load(w_ptr + w_row + (c * 9 + t)[:, None], mask=m & nonzero, other=0.0)
        tl.atomic_add(cur_ptr + tgt, wt * v[:, None], mask=m & nonzero, sem="relaxed")
        tl.atomic_add(cnt_ptr + tgt, ones, mask=m, sem="relaxed")


# As `_conv_deliver_kernel`, and n_ob (channel blocks) by layer.
@jit(do_not_specialize=_NOT_SPECIALISED + ("n_ob",))
def _conv_deliver_backward_kernel(grad_ptr, vals_ptr, sample_ptr, src_ptr, w_ptr, part_ptr, gw_ptr, e,
                                  c_out, c_in, h, w, width, out_offset, n_ob, pool, seg_ptr,
                                  BLOCK_E: tl.constexpr, BLOCK_OUT: tl.constexpr,
                                  ATOMIC_WEIGHT: tl.constexpr, SEGMENT: tl.constexpr):
    pid_o = tl.program_id(1)
    es, live_e, n_taps = entry_block(seg_ptr, e, BLOCK_E, SEGMENT, 9)
    oc = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    live_o = (oc < c_out)[None, :]
    v = tl.load(vals_ptr + es, mask=live_e, other=0.0) * (1.0 - 0.75 * pool)
    s = tl.load(sample_ptr + es, mask=live_e, other=0).to(tl.int64)
    c, y, x, hp, wp = _source(tl.load(src_ptr + es, mask=live_e, other=0).to(tl.int64), h, w, pool)
    inside = live_e & (y < hp) & (x < wp)
    base = s * width + out_offset
    chan = (oc.to(tl.int64) * (hp * wp))[None, :]
    w_row = (oc.to(tl.int64) * (c_in * 9))[None, :]
    nonzero = (v != 0)[:, None]
    acc = tl.zeros([BLOCK_E], dtype=part_ptr.dtype.element_ty)
    for t in range(n_taps):
        oy = y + (1 - t // 3)
        ox = x + (1 - t % 3)
        ok = inside & (oy >= 0) & (oy < hp) & (ox >= 0) & (ox < wp)
        tgt = (base + tl.where(ok, oy * wp + ox, 0))[:, None] + chan
        m = ok[:, None] & live_o
        at = w_row + (c * 9 + t)[:, None]
        g = tl.load(grad_ptr + tgt, mask=m, other=0.0)
        # zero-valued entries still get d/dvals (barrier messages and silent neurons do)
        acc += tl.sum(g * tl.load(w_ptr + at, mask=m, other=0.0), axis=1)
        if ATOMIC_WEIGHT:
            tl.atomic_add(gw_ptr + at, g * v[:, None], mask=m & nonzero, sem="relaxed")
    tl.store(part_ptr + es * n_ob + pid_o, acc * (1.0 - 0.75 * pool), mask=live_e)


# The layer geometry and `pool` are not specialised on (one variant per layer
# otherwise); the segments come in tensors. Constexpr: BLOCK_OUT, as in the kernels above.
@jit(do_not_specialize=("c_out", "c_in", "h", "w", "width", "out_offset", "pool"))
def _conv_weight_grad_kernel(grad_ptr, vals_ptr, sample_ptr, src_ptr, rows_ptr, order_ptr, seg_end_ptr,
                             gw_ptr, c_out, c_in, h, w, width, out_offset, pool, BLOCK_OUT: tl.constexpr):
    """Deterministic grad_weight: program i owns the segment of channel-sorted entries
    that starts at i (if one does) and sums it in order into ``W[o-block, c, :]``."""
    i = tl.program_id(0)
    oc = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    row = tl.load(rows_ptr + i)
    prev = tl.load(rows_ptr + i - 1, mask=i > 0, other=-1)
    if (row != prev) & (row < c_in):
        end = tl.load(seg_end_ptr + i)
        taps = tl.arange(0, 16)
        live_t = taps < 9
        live_o = (oc < c_out)[:, None]
        acc = tl.zeros([BLOCK_OUT, 16], dtype=gw_ptr.dtype.element_ty)
        for j in range(i, end):
            ent = tl.load(order_ptr + j)
            v = tl.load(vals_ptr + ent) * (1.0 - 0.75 * pool)
            s = tl.load(sample_ptr + ent).to(tl.int64)
            _c, y, x, hp, wp = _source(tl.load(src_ptr + ent).to(tl.int64), h, w, pool)
            oy = y + 1 - taps // 3
            ox = x + 1 - taps % 3
            ok = live_t & (y < hp) & (x < wp) & (oy >= 0) & (oy < hp) & (ox >= 0) & (ox < wp)
            tgt = s * width + out_offset + oc.to(tl.int64)[:, None] * (hp * wp) \
                + tl.where(ok, oy * wp + ox, 0)[None, :]
            acc += tl.load(grad_ptr + tgt, mask=live_o & ok[None, :], other=0.0) * v
        at = oc.to(tl.int64)[:, None] * (c_in * 9) + row * 9 + taps[None, :]
        tl.store(gw_ptr + at, acc, mask=live_o & live_t[None, :])


def _blocks(e: int, c_out: int) -> tuple[int, int]:
    """(BLOCK_E, BLOCK_OUT) for a layer: `_NARROW` (16 x 16) for C_out <= 16, else `_WIDE`
    (4 x 64). Two classes, not one per power of two of C_out: each class is a compiled
    variant, and per layer that made 3 at full VGG-7 width. 64 fits the full VGG-7
    (C_out 64, 128, 256: every lane live, 1, 2 or 4 channel blocks) and BLOCK_E = 4 = the
    warps gives each warp one entry (the fewest registers, above); 16 x 16 keeps narrow
    layers (the test nets: C_out 1-16) from running 4-64x masked lanes. Not a function
    of the entry count `e`, which changes every step: a tile sized by e compiled one
    variant per power of two (a step with few entries runs a few masked rows instead)."""
    return _NARROW if c_out <= _NARROW[1] else _WIDE


def _geometry(op: str, weight: torch.Tensor, in_shape, pool: bool, out_offset: int, width: int
              ) -> tuple[int, int]:
    """(H, W) of the source map, checked against the weight and the state width."""
    c_out, c_in = weight.shape[:2]
    if len(in_shape) != 3 or in_shape[0] != c_in or min(in_shape) < 1:
        raise ValueError(f"{op}: in_shape must be (C_in={c_in}, H, W) with H, W >= 1, got {tuple(in_shape)}")
    _, h, w = in_shape
    hp, wp = (h // 2, w // 2) if pool else (h, w)
    if not 0 <= out_offset <= width - c_out * hp * wp:
        raise ValueError(f"{op}: out_offset {out_offset} + C_out x H' x W' = {c_out * hp * wp} targets "
                         f"do not fit in a buffer of width {width}")
    return int(h), int(w)


def conv_deliver_triton(vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor,
                        weight: torch.Tensor, in_shape: tuple[int, int, int], pool: bool,
                        out_offset: int, current: torch.Tensor, counts: torch.Tensor,
                        segment: torch.Tensor | None = None) -> None:
    """`conv_deliver_torch` in one launch: the same arguments and effect (the currents'
    float atomics add in a run-dependent order: see the module docstring)."""
    op = "conv_deliver_triton"
    entries = check_forward(op, _conv_deliver_kernel, vals, sample, src, weight, current, counts, segment,
                            (None, None, 3, 3))
    hw = _geometry(op, weight, in_shape, pool, out_offset, current.shape[1])
    deliver_launch(_conv_deliver_kernel, _blocks(0, weight.shape[0]), entries, hw, pool, out_offset, current, counts,
                   segment)


def conv_deliver_backward_triton(grad_current: torch.Tensor, vals: torch.Tensor,
                                 sample: torch.Tensor, src: torch.Tensor, weight: torch.Tensor,
                                 in_shape: tuple[int, int, int], pool: bool, out_offset: int,
                                 segment: torch.Tensor | None = None, *,
                                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`conv_deliver_backward_torch` with Triton: the same arguments and results, and
    `deterministic`: sum each input channel's weight gradient in a fixed order (bitwise
    reproducible) instead of with float atomics (see the module docstring)."""
    op = "conv_deliver_backward_triton"
    grad_current, entries = check_backward(op, _conv_deliver_backward_kernel, grad_current, vals, sample, src,
                                           weight, segment, (None, None, 3, 3))
    (h, w), (c_out, c_in) = _geometry(op, weight, in_shape, pool, out_offset, grad_current.shape[1]), weight.shape[:2]
    block_out = _blocks(0, c_out)[1]

    def weight_grad(rows, order, seg_end, grad_w):
        _conv_weight_grad_kernel[(rows.shape[0], triton.cdiv(c_out, block_out))](
            grad_current, entries[0], entries[1], entries[2], rows, order, seg_end, grad_w, c_out, c_in, h, w,
            grad_current.shape[1], out_offset, int(bool(pool)), BLOCK_OUT=block_out)

    return backward_launch(_conv_deliver_backward_kernel, _blocks(0, c_out), grad_current, entries, (h, w), pool,
                           out_offset, segment, deterministic, lambda s: (s // (h * w), c_in), weight_grad)
