"""Convolutional networks (SPEC 1): layers -> synaptic maps, and the per-step delivery
of networks whose fan-out cannot be tabulated.

A network given as ``nn.Sequential`` of bias-free ``nn.Conv2d`` (3x3, stride 1,
padding 1), ``nn.AvgPool2d(2)``, ``nn.Flatten`` and bias-free ``nn.Linear`` has one
neuron layer per weight layer. Pooling and flattening are not neurons: they are
folded into the synaptic map of the weight layer that follows them, so a map is

    [2x2 average pooling] -> 3x3 convolution          (kind "conv")
    [2x2 average pooling] -> [flatten] -> linear       (kind "fc")

from a source layer of shape ``(C, H, W)`` (or ``(n,)``) to a target layer. Flat
indices inside an image layer are channel-major, ``c * H * W + y * W + x``, the order
of ``nn.Flatten`` and of frames ``[T, B, C, H, W]`` flattened.

`ImageSynapses` delivers one forward step of such a network: the [B, K] selection is
split per source layer (one sort; on the CPU one host sync per step to slice it,
`entries`; in the sync-free mode of CUDA none: the sorted entries go to every layer's
kernel with that layer's (start, count) in a device tensor, `segments`, and each
launch delivers only its own entries), each layer's entries go
through its kernel (`kernels/conv_deliver.py`, `kernels/rows_deliver.py`: the
entries of the call's `backends.Ops.image`, Triton kernels or their torch twins), and the received
counts come from the same targets. The parameters travel as one flat vector
(the engine's "weight table" of these networks), so one autograd node per step
carries every layer's gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from .backends import TORCH_IMAGE
from .kernels.image_deliver import map_position, window
from .kernels.image_steps import ImageLayers, backward_segments, deliver_segments, receiver_list


@dataclass(frozen=True)
class SynapticMap:
    """Connectivity from one neuron layer (or the input) to the next.

    Attributes:
        kind: "conv" (3x3, stride 1, padding 1) or "fc".
        in_shape: shape of the source layer, ``(C, H, W)`` or ``(n,)``.
        out_shape: shape of the target layer.
        pool: a 2x2 average pooling is folded in front (a source at (c, y, x) reaches
            the map as the pooled input (c, y // 2, x // 2) with value / 4).
    """

    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    pool: bool = False

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Shape the weight layer reads (after pooling)."""
        if not self.pool:
            return self.in_shape
        c, h, w = self.in_shape
        return (c, h // 2, w // 2)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "conv":
            return (self.out_shape[0], self.in_shape[0], 3, 3)
        return (self.n_out, math.prod(self.map_shape))

    def dense(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Currents of the whole source layer at once: ``[B, n_in] -> [B, n_out]``
        (layered execution, prioritized input, the dense oracle)."""
        if self.pool:
            x = F.avg_pool2d(x.reshape(-1, *self.in_shape), 2).flatten(1)
        if self.kind == "conv":
            return F.conv2d(x.reshape(-1, *self.map_shape), weight, padding=1).flatten(1)
        return x @ weight.t()

    def fan_out(self) -> torch.Tensor:
        """int64 ``[n_in]``: targets each source reaches (borders and pooled odd sizes
        reach fewer; `kernels/image_deliver.py`'s geometry)."""
        if self.kind == "fc" and not self.pool:
            return torch.full((self.n_in,), self.n_out, dtype=torch.int64)
        h, w = self.in_shape[1:]
        _, y, x, hp, wp, inside = map_position(torch.arange(self.n_in), h, w, self.pool)
        if self.kind == "fc":
            return inside.long() * self.n_out
        return (window(y, x, hp, wp)[1] & inside[:, None]).sum(1) * self.out_shape[0]

    def fan_in(self) -> torch.Tensor:
        """int64 ``[n_out]``: sources that reach each target (its sync threshold in the
        barrier presets). Pooled: the 4 sources of a pooled input count separately."""
        per_input = 4 if self.pool else 1
        if self.kind == "fc":
            return torch.full((self.n_out,), math.prod(self.map_shape) * per_input, dtype=torch.int64)
        c_out, h, w = self.out_shape
        pos = torch.arange(self.n_out) % (h * w)  # the 3x3 window is symmetric
        return window(pos // w, pos % w, h, w)[1].sum(1) * self.in_shape[0] * per_input


def parse_layers(net: nn.Module, input_shape: tuple[int, ...] | None
                 ) -> tuple[list[SynapticMap], list[nn.Module]]:
    """Validate `net` and describe it as synaptic maps (one per weight layer).

    Returns (maps, weight layers). Raises on anything but the supported layers, naming
    the offending layer and what was expected.
    """
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    if not layers:
        raise ValueError("the network is an empty nn.Sequential")
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) not in (1, 3) or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) or (n,), got {input_shape}")
    shape, pool, flat = input_shape, False, False
    maps: list[SynapticMap] = []
    weighted: list[nn.Module] = []
    for i, m in enumerate(layers):
        where = f"layer {i} ({type(m).__name__})"
        if isinstance(m, nn.Conv2d):
            _check_conv(m, where)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            raise ValueError(f"{where} has a bias; SNN layers here are bias-free: "
                             f"pass bias=False")
        if isinstance(m, nn.Conv2d):
            if shape is None:
                raise ValueError(f"{where}: the input's (C, H, W) is unknown; pass "
                                 f"input_shape=(C, H, W) (or set net.input_shape)")
            if len(shape) != 3 or flat:
                raise ValueError(f"{where} needs an image-shaped (C, H, W) input, got a flat "
                                 f"layer of {math.prod(shape)} features")
            c, h, w = shape
            if c != m.in_channels:
                raise ValueError(f"{where} takes {m.in_channels} channels but gets {c}")
            hp, wp = (h // 2, w // 2) if pool else (h, w)
            if hp < 1 or wp < 1:
                raise ValueError(f"{where}: pooling a {h}x{w} map leaves nothing")
            out = (m.out_channels, hp, wp)
            maps.append(SynapticMap("conv", shape, out, pool))
        elif isinstance(m, nn.Linear):
            if shape is None:
                shape = (m.in_features,)
            if len(shape) == 3 and not flat:
                raise ValueError(f"{where} follows an image-shaped layer {shape}: insert "
                                 f"nn.Flatten() before it")
            n_feat = math.prod(SynapticMap("fc", shape, (1,), pool).map_shape)
            if n_feat != m.in_features:
                raise ValueError(f"{where} takes {m.in_features} features but the previous "
                                 f"layer gives {n_feat}")
            out = (m.out_features,)
            maps.append(SynapticMap("fc", shape, out, pool))
        elif isinstance(m, nn.AvgPool2d):
            _check_pool(m, where)
            if shape is None or len(shape) != 3 or flat:
                raise ValueError(f"{where} needs an image-shaped (C, H, W) input before it"
                                 + (" (pass input_shape=(C, H, W))" if shape is None else ""))
            if pool:
                raise ValueError(f"{where}: two poolings in a row are not supported (2x2 only)")
            if shape[1] < 2 or shape[2] < 2:
                raise ValueError(f"{where}: cannot pool a {shape[1]}x{shape[2]} map")
            pool = True
            continue
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError(f"{where} must be nn.Flatten() (start_dim=1, end_dim=-1)")
            flat = True
            continue
        else:
            raise TypeError(f"{where} is not supported: this backend takes an nn.Sequential of "
                            f"bias-free nn.Conv2d (3x3, stride 1, padding 1), nn.AvgPool2d(2), "
                            f"nn.Flatten and bias-free nn.Linear; neurons are implicit after "
                            f"every weight layer")
        weighted.append(m)
        shape, pool, flat = out, False, False
    if pool or flat:
        raise ValueError("the network must end with a weight layer (nn.Linear or nn.Conv2d), "
                         "not with pooling or flattening")
    return maps, weighted


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_conv(m: nn.Conv2d, where: str) -> None:
    bad = []
    if _pair(m.kernel_size) != (3, 3):
        bad.append(f"kernel_size={m.kernel_size}")
    if _pair(m.stride) != (1, 1):
        bad.append(f"stride={m.stride}")
    if isinstance(m.padding, str) or _pair(m.padding) != (1, 1):
        bad.append(f"padding={m.padding!r}")
    if _pair(m.dilation) != (1, 1):
        bad.append(f"dilation={m.dilation}")
    if m.groups != 1:
        bad.append(f"groups={m.groups}")
    if m.padding_mode != "zeros":
        bad.append(f"padding_mode={m.padding_mode!r}")
    if bad:
        raise TypeError(f"{where} is not supported: only 3x3 convolutions with stride 1, "
                        f"padding 1 (zeros), dilation 1, groups 1; got {', '.join(bad)}")


def _check_pool(m: nn.AvgPool2d, where: str) -> None:
    stride = m.kernel_size if m.stride is None else m.stride
    if _pair(m.kernel_size) != (2, 2) or _pair(stride) != (2, 2) or _pair(m.padding) != (0, 0) \
            or m.ceil_mode or m.divisor_override is not None:
        raise ValueError(f"{where}: only nn.AvgPool2d(2) (2x2, stride 2, no padding, floor) is "
                         f"supported; got kernel_size={m.kernel_size}, stride={m.stride}, "
                         f"padding={m.padding}, ceil_mode={m.ceil_mode}")


def needs_image_path(maps: list[SynapticMap]) -> bool:
    """True when a map is a conv or pooled: its fan-out cannot be a [N + 1, F] table.
    Plain linear stacks (with or without a leading nn.Flatten) keep the FC path."""
    return any(m.kind == "conv" or m.pool for m in maps)


# --------------------------------------------------------------------- per-step delivery
def _kernels(ops) -> dict:
    """The conv/rows kernels of the call's backend (`backends.Ops.image`; None: the
    torch twins): map kind -> (deliver, deliver_backward); "fc" covers pooled and
    flattened linear maps."""
    return TORCH_IMAGE if ops is None else ops.image


class ImageSynapses:
    """Delivery of a network with conv maps in the flat index space of `Network`.

    Args:
        maps: one `SynapticMap` per weight layer.
        offsets: flat index of the first entry of each layer (inputs first).
        width: N + 1 (state width, dump column last).
    """

    def __init__(self, maps: list[SynapticMap], offsets: tuple[int, ...], width: int):
        self.maps, self.offsets, self.width = list(maps), tuple(offsets), width
        sizes = [math.prod(m.weight_shape) for m in self.maps]
        self.param_offsets = [sum(sizes[:l]) for l in range(len(sizes) + 1)]

    # --- parameters --------------------------------------------------------------
    def flat_params(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """One flat vector of every weight (differentiable): the engine's weight table."""
        for l, (m, w) in enumerate(zip(self.maps, weights)):
            if tuple(w.shape) != m.weight_shape:
                raise ValueError(f"weight {l} has shape {tuple(w.shape)}, expected {m.weight_shape}")
        return torch.cat([w.reshape(-1) for w in weights])

    def weight(self, flat: torch.Tensor, l: int) -> torch.Tensor:
        a, b = self.param_offsets[l], self.param_offsets[l + 1]
        return flat[a:b].view(self.maps[l].weight_shape)

    # --- tables --------------------------------------------------------------------
    @cached_property
    def mean_fan_out(self) -> float:
        """Targets per delivery averaged over the sources (VGG-7: 1145 of at most 2304):
        the expected receivers of a step per selected source."""
        n_src = self.offsets[len(self.maps)]
        return float(self.fan_out.sum()) / max(n_src, 1)

    @cached_property
    def list_width(self) -> int:
        """Receivers one delivered entry can have, as `receiver_list` lists them: the
        widest map's 9 x C_out (conv) or M (linear); VGG-7: 2304."""
        return max(9 * m.out_shape[0] if m.kind == "conv" else m.n_out for m in self.maps)

    def prepare(self, device) -> None:
        """Build the device tables the per-step methods read (`layers`) now, at a
        call's set-up (`engine.Engine`): built on first use inside a step loop they
        would be tensors from Python values copied to the device there (a blocking
        copy on CUDA)."""
        self.layers(device)

    def layers(self, device) -> ImageLayers:
        """The maps as the per-step kernels read them (`kernels/image_steps.py`), with
        their device tables (geometry, layer offsets), built once per device."""
        cache = self.__dict__.setdefault("_layers_cache", {})
        key = torch.device(device)
        if key not in cache:
            n = len(self.maps)
            cache[key] = ImageLayers.build([m.kind for m in self.maps], [m.in_shape for m in self.maps],
                                           [m.pool for m in self.maps], self.offsets[:n], self.offsets[1:n + 1],
                                           [m.weight_shape for m in self.maps], self.width, key)
        return cache[key]

    def receiver_list(self, sel: torch.Tensor, source_slot: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every target of every delivered entry of a [B, K] selection, in shapes that
        do not depend on the data (no host read): (flat positions int64
        ``[B * K * list_width]`` into ``[B * W]``, bool valid), repeats included
        (`kernels/image_steps.py` receiver_list)."""
        return receiver_list(sel, source_slot, self.layers(sel.device))

    def buffers(self, batch: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(current, counts) zero ``[B, W]`` buffers for `deliver(out=...)`; the caller
        zeroes them again where the step wrote (its receivers)."""
        return (torch.zeros(batch, self.width, dtype=dtype, device=device),
                torch.zeros(batch, self.width, dtype=torch.int32, device=device))

    @cached_property
    def fan_out(self) -> torch.Tensor:
        """int64 ``[N + 1]`` real targets per flat index (0 for outputs and the dump)."""
        tail = self.width - self.offsets[len(self.maps)]
        return torch.cat([m.fan_out() for m in self.maps] + [torch.zeros(tail, dtype=torch.int64)])

    @cached_property
    def fan_in(self) -> torch.Tensor:
        """int64 ``[n_neurons]`` sources reaching each neuron (hidden, then output)."""
        return torch.cat([m.fan_in() for m in self.maps])

    # --- one forward step ---------------------------------------------------------
    def entries(self, sel: torch.Tensor, source_slot: torch.Tensor):
        """Split a [B, K] selection per source layer: yields (l, positions [E] into the
        flattened [B * K] selection). One sort and one host sync per step."""
        slot = source_slot[sel].view(-1)
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=len(self.maps) + 2).tolist()
        start = 0
        for l, n in enumerate(counts):
            if n and l < len(self.maps):
                yield l, order[start:start + n]
            start += n

    def deliver(self, vals: torch.Tensor, sel: torch.Tensor, flat: torch.Tensor,
                source_slot: torch.Tensor, ops=None, sync_free: bool = False,
                out: tuple[torch.Tensor, torch.Tensor] | None = None, unit: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(current ``[B, N + 1]``, received counts int32 ``[B, N + 1]``) of one step;
        differentiable in `vals` and `flat` (one autograd node). `ops`: the call's
        `backends.Ops` (its `image` kernels; None: the torch twins). `sync_free`: the
        per-layer split without a host read (`segments`); `out` (sync-free, no
        autograd): zero ``[B, W]`` buffers (`buffers`) to add into instead of new ones,
        returned; `unit` (sync-free, no autograd): what each delivery adds to the counts
        (`kernels/image_steps.py` FILLER_COUNT for fillers)."""
        if torch.is_grad_enabled() and (vals.requires_grad or flat.requires_grad):
            return _ImageDeliver.apply(vals, sel, flat, self, source_slot, ops, sync_free)
        return self._forward(vals, sel, flat, source_slot, ops, sync_free, out, unit)

    def segments(self, sel: torch.Tensor, source_slot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`entries` without a host read (CUDA), in shapes fixed by B x K: the flattened
        [B * K] selection sorted by source layer once (stable, so each layer's entries
        keep the order `entries` gives them), and each layer's run in that order
        (`ImageLayers.segments`: order, sources inside their layers, (start, count)
        per layer on the device). Layer l's kernel gets the permuted arrays and its
        segment: it reads start and count on the device and delivers only those
        entries (L launches of about B x K entries in all, each sized for B x K;
        `kernels/conv_deliver.py`)."""
        return self.layers(sel.device).segments(sel, source_slot)

    def _forward(self, vals, sel, flat, source_slot, ops=None, sync_free=False, out=None, unit=1):
        b, k = sel.shape
        kernels = _kernels(ops)
        one_launch = getattr(ops, "image_deliver", None)
        # no host read: every layer in one launch (in every mode, so the modes sum each
        # current in the same order), or (sync-free) each over its own segment
        if one_launch is not None or sync_free:
            current, counts = self.buffers(b, vals.dtype, vals.device) if out is None else out
            layers = self.layers(vals.device)
            if one_launch is not None:
                one_launch(vals, sel, flat, source_slot, layers, current, counts, unit)
            else:
                deliver_segments(vals, sel, flat, source_slot, layers, current, counts, kernels, unit)
            return current, counts
        if unit != 1:
            raise ValueError(f"unit={unit}: only the sync-free delivery adds counts other than 1")
        current = vals.new_zeros(b, self.width)
        counts = torch.zeros(b, self.width, dtype=torch.int32, device=vals.device)
        for l, pos in self.entries(sel, source_slot):
            m = self.maps[l]
            fn = kernels[m.kind][0]
            fn(vals.reshape(-1)[pos], pos // k, sel.reshape(-1)[pos] - self.offsets[l],
               self.weight(flat, l), m.in_shape, m.pool, self.offsets[l + 1], current, counts)
        return current, counts

    def deliver_backward(self, grad_current: torch.Tensor, vals: torch.Tensor, sel: torch.Tensor,
                         flat: torch.Tensor, source_slot: torch.Tensor,
                         grad_flat: torch.Tensor | None = None, ops=None, sync_free: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of `deliver`'s current w.r.t. vals ``[B, K]`` and the flat weights.
        With `grad_flat` given, the weight gradient is added into it in place (only the
        layers the step delivered from: a VGG-7 step at small K touches one or two of
        seven, and a fresh 1.2 M-float vector per step cost as much as the step) and
        returned. `ops`, `sync_free` as in `deliver`."""
        b, k = sel.shape
        kernels = _kernels(ops)
        one_launch = getattr(ops, "image_deliver_backward", None)
        if sync_free or one_launch is not None:  # no host read, as `_forward`
            grad_flat = torch.zeros_like(flat) if grad_flat is None else grad_flat
            layers = self.layers(vals.device)
            if one_launch is not None:
                return one_launch(grad_current, vals, sel, flat, source_slot, layers, grad_flat), grad_flat
            return backward_segments(grad_current, vals, sel, flat, source_slot, layers, grad_flat,
                                     kernels), grad_flat
        grad_vals = torch.zeros_like(vals).view(-1)
        grads = [None] * len(self.maps)
        for l, pos in self.entries(sel, source_slot):
            m = self.maps[l]
            gv, gw = kernels[m.kind][1](grad_current, vals.reshape(-1)[pos], pos // k,
                                        sel.reshape(-1)[pos] - self.offsets[l], self.weight(flat, l),
                                        m.in_shape, m.pool, self.offsets[l + 1])
            grad_vals[pos] = gv
            if grad_flat is not None:
                self.weight(grad_flat, l).add_(gw)
            else:
                grads[l] = gw
        if grad_flat is None:
            grad_flat = torch.cat([torch.zeros(math.prod(m.weight_shape), dtype=flat.dtype,
                                               device=flat.device) if g is None else g.reshape(-1)
                                   for m, g in zip(self.maps, grads)])
        return grad_vals.view(b, k), grad_flat

    def input_current(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``[B, N + 1]`` currents of a whole input frame delivered at once (prioritized
        input): the dense first map, placed at layer 1."""
        cur = self.maps[0].dense(x, self.weight(flat, 0))
        lo = self.offsets[1]
        return F.pad(cur, (lo, self.width - lo - cur.shape[1]))

    def input_backward(self, x: torch.Tensor, grad_current: torch.Tensor, flat: torch.Tensor,
                       want_x: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of `input_current`: (flat weights (only the first map's part is
        nonzero), frame ``[B, n_inputs]`` if `want_x`)."""
        lo, n1 = self.offsets[1], self.maps[0].n_out
        with torch.enable_grad():
            w0 = self.weight(flat, 0).detach().requires_grad_()
            xs = x.detach().requires_grad_(want_x)
            cur = self.maps[0].dense(xs, w0)
            grads = torch.autograd.grad(cur, [w0, xs] if want_x else [w0], grad_current[:, lo:lo + n1])
        g_w = torch.cat([grads[0].reshape(-1), flat.new_zeros(flat.numel() - grads[0].numel())])
        return g_w, (grads[1] if want_x else None)


class _ImageDeliver(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, sel, flat, syn, source_slot, ops, sync_free=False):
        # [B, K] values and indices only: the windows are recomputed in the backward.
        ctx.save_for_backward(vals, sel, flat, source_slot)
        ctx.syn, ctx.ops, ctx.sync_free = syn, ops, sync_free
        current, counts = syn._forward(vals, sel, flat, source_slot, ops, sync_free)
        ctx.mark_non_differentiable(counts)
        return current, counts

    @staticmethod
    def backward(ctx, grad_current, _grad_counts):
        vals, sel, flat, source_slot = ctx.saved_tensors
        grad_vals, grad_flat = ctx.syn.deliver_backward(grad_current, vals, sel, flat, source_slot,
                                                        ops=ctx.ops, sync_free=ctx.sync_free)
        return grad_vals, None, grad_flat, None, None, None, None
