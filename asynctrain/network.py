"""One description of the network: layers -> a flat neuron index space.

Flat layout of one sample's state (width ``N + 1``)::

    [ input features | hidden layer 1 | ... | hidden layer L-1 | output | dump ]
      sources ........................................ ^n_sources   not sources

Input features are sources only (no membrane). Output neurons never feed anything.
The last column (``dump``) is a sink: padded fan-out entries and unused selection
slots point at it, so every per-step gather/scatter has a fixed shape and needs no
mask. Its threshold is +inf, so it never fires.

Fan-out map (fully connected): source ``j`` of layer ``l`` reaches every neuron of
layer ``l + 1`` with weight ``W_l[:, j - offset_l]``. The engine gathers those rows
from a table ``[N + 1, F_max]`` (``W_l`` transposed, rows padded to the widest fan-out),
built once per call, so a step costs K x F_max, never N x N.

Convolutional networks (``maps`` non-empty, `asynctrain.conv`): a conv source's
fan-out is computed from its position instead of tabulated; the engine's "weight
table" is then the flat vector of all weights and deliveries go through
`conv.ImageSynapses`. Image layers are flattened channel-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .conv import ImageSynapses, SynapticMap, needs_image_path, parse_layers


@dataclass(frozen=True)
class Network:
    """Shapes and index maps of a stack of fully connected layers.

    Attributes:
        layer_sizes: ``[n_inputs, n_1, ..., n_L]``; layer 0 is the input features.
        maps: one `conv.SynapticMap` per weight layer for convolutional networks;
            empty for stacks of linear layers (the tabulated path).
        input_shape: shape of one input frame, ``(C, H, W)`` or ``(n_inputs,)``.
    """

    layer_sizes: tuple[int, ...]
    maps: tuple[SynapticMap, ...] = ()
    input_shape: tuple[int, ...] | None = None

    @staticmethod
    def from_module(net: nn.Module, input_shape: tuple[int, ...] | None = None) -> "Network":
        """Validate `net` and describe it. Anything else raises, naming the layer.

        `net`: an ``nn.Sequential`` of bias-free ``nn.Linear`` (or one ``nn.Linear``), or
        of bias-free ``nn.Conv2d`` (3x3, stride 1, padding 1), ``nn.AvgPool2d(2)``,
        ``nn.Flatten`` and ``nn.Linear``. `input_shape` ``(C, H, W)`` is needed for
        convolutions (default: ``net.input_shape`` if set, as `asynctrain.models` do).
        """
        if input_shape is None:
            input_shape = getattr(net, "input_shape", None)
        layers = list(net) if isinstance(net, nn.Sequential) else [net]
        if layers and all(isinstance(m, nn.Linear) for m in layers):
            # the one validation of layer stacks (conv.parse_layers); a stack of linear
            # layers may read image-shaped frames, flattened, so its shape is checked here
            maps, _ = parse_layers(net, None)
            sizes = (maps[0].n_in, *(m.n_out for m in maps))
            shape = tuple(input_shape) if input_shape is not None else None
            if shape is not None and math.prod(shape) != sizes[0]:
                raise ValueError(f"input_shape {shape} has {math.prod(shape)} features but layer 0 "
                                 f"takes {sizes[0]}")
            return Network(sizes, (), shape)
        maps, _ = parse_layers(net, input_shape)
        sizes = (maps[0].n_in, *(m.n_out for m in maps))
        return Network(sizes, tuple(maps) if needs_image_path(maps) else (), maps[0].in_shape)

    @property
    def image(self) -> bool:
        """True for networks on the computed (convolutional) delivery path."""
        return bool(self.maps)

    @cached_property
    def synapses(self) -> ImageSynapses:
        """Per-step delivery of a convolutional network (`image` only)."""
        return ImageSynapses(list(self.maps), self.offsets, self.width + 1)

    # --- sizes -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of weight layers L (= neuron layers)."""
        return len(self.layer_sizes) - 1

    @property
    def n_inputs(self) -> int:
        return self.layer_sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.layer_sizes[-1]

    @property
    def n_neurons(self) -> int:
        """Hidden + output neurons (the ones with a membrane)."""
        return sum(self.layer_sizes[1:])

    @property
    def n_hidden(self) -> int:
        return sum(self.layer_sizes[1:-1])

    @property
    def width(self) -> int:
        """N: inputs + neurons. State tensors are ``[B, N + 1]`` (dump column last)."""
        return sum(self.layer_sizes)

    @property
    def n_sources(self) -> int:
        """Flat indices below this can be pending (inputs and hidden neurons)."""
        return self.width - self.n_outputs

    @property
    def dump(self) -> int:
        return self.width

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Flat index of the first entry of each layer (``offsets[0] == 0``: inputs)."""
        out, acc = [], 0
        for n in self.layer_sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def output_slice(self) -> slice:
        return slice(self.offsets[-1], self.width)

    @property
    def neuron_slice(self) -> slice:
        return slice(self.n_inputs, self.width)

    @property
    def max_fan_out(self) -> int:
        return max(self.layer_sizes[1:])

    def fan_in_per_neuron(self) -> torch.Tensor:
        """int64 ``[n_neurons]``: sources that reach each neuron (the size of the previous
        layer; for convolutions, the in-bounds window x channels, x 4 when pooled)."""
        if self.image:
            return self.synapses.fan_in.clone()
        return torch.cat([torch.full((n,), self.layer_sizes[l], dtype=torch.int64)
                          for l, n in enumerate(self.layer_sizes[1:])])

    # --- index maps (cached per device) -------------------------------------------
    def tables(self, device: torch.device) -> "IndexTables":
        key = str(device)
        cache = self.__dict__.setdefault("_tables", {})
        if key not in cache:
            cache[key] = IndexTables.build(self, device)
        return cache[key]

    def weight_table(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """``[N + 1, F_max]``: row j = outgoing weights of flat source j (zeros for
        output neurons, the dump and padding). Differentiable in `weights`.
        Convolutional networks: the flat vector of all weights instead."""
        if self.image:
            return self.synapses.flat_params(weights)
        self.check_weights(weights)
        f = self.max_fan_out
        rows = [nn.functional.pad(w.t(), (0, f - w.shape[0])) for w in weights]
        tail = weights[0].new_zeros(self.n_outputs + 1, f)
        return torch.cat(rows + [tail], 0)

    def check_weights(self, weights: list[torch.Tensor]) -> None:
        if len(weights) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} weight matrices, got {len(weights)}")
        for l, w in enumerate(weights):
            want = (self.layer_sizes[l + 1], self.layer_sizes[l])
            if tuple(w.shape) != want:
                raise ValueError(f"weight {l} has shape {tuple(w.shape)}, expected {want}")


@dataclass(frozen=True)
class IndexTables:
    """Integer maps on one device, built once per network.

    Attributes:
        targets: int64 ``[N + 1, F_max]`` flat receiver of each fan-out entry
            (the dump for padding, output neurons and the dump row).
        fan_out: int64 ``[N + 1]`` number of real targets of each entry (synops per delivery).
        is_source: bool ``[N + 1]``.
        is_input: bool ``[N + 1]``.
        is_hidden: bool ``[N + 1]``.
        columns: int64 ``[N + 1]`` arange, for hashing and tie-breaking.
        source_slot: int64 ``[N + 1]`` layer of each source (L + 1 for the dump).
        receive_slot: int64 ``[N + 1]`` layer whose sources feed each column (L, the
            output layer, which never delivers, for inputs and the dump).
    """

    targets: torch.Tensor
    fan_out: torch.Tensor
    is_source: torch.Tensor
    is_input: torch.Tensor
    is_hidden: torch.Tensor
    columns: torch.Tensor
    source_slot: torch.Tensor
    receive_slot: torch.Tensor
    n_slots: int = 0  # L + 2 (the dump's source slot + 1): known here, never read off a device

    def received_counts(self, sel: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, N + 1]``: delivered sources that reached each column in one step.
        Fully connected: every neuron of layer l + 1 hears every delivered source of
        layer l, so a count per layer ([B, L + 2], from the [B, K] selection) gathered
        back to the columns replaces a [B, K x F] scatter."""
        b, n_slots = sel.shape[0], self.n_slots or int(self.source_slot[-1]) + 1
        per_layer = torch.zeros(b, n_slots, dtype=torch.int32, device=sel.device)
        ones = torch.ones((), dtype=torch.int32, device=sel.device).expand(sel.shape)
        per_layer.scatter_add_(1, self.source_slot[sel], ones)
        return per_layer.gather(1, self.receive_slot.expand(b, -1))

    @staticmethod
    def build(net: Network, device: torch.device) -> "IndexTables":
        n1 = net.width + 1
        f = 0 if net.image else net.max_fan_out  # conv targets are computed, not tabulated
        targets = torch.full((n1, f), net.dump, dtype=torch.int64)
        fan_out = torch.zeros(n1, dtype=torch.int64)
        for l in range(0 if net.image else net.n_layers):
            lo, n = net.offsets[l], net.layer_sizes[l]
            nxt, m = net.offsets[l + 1], net.layer_sizes[l + 1]
            targets[lo:lo + n, :m] = torch.arange(nxt, nxt + m)
            fan_out[lo:lo + n] = m
        if net.image:
            fan_out = net.synapses.fan_out
        cols = torch.arange(n1)
        is_source = cols < net.n_sources
        is_input = cols < net.n_inputs
        is_hidden = is_source & ~is_input
        layer = torch.cat([torch.full((n,), l) for l, n in enumerate(net.layer_sizes)]
                          + [torch.tensor([net.n_layers + 1])])
        source_slot = layer.clone()
        receive_slot = torch.where((layer >= 1) & (layer <= net.n_layers), layer - 1, net.n_layers)
        return IndexTables(*(t.to(device) for t in (targets, fan_out, is_source, is_input,
                                                     is_hidden, cols, source_slot, receive_slot)),
                           n_slots=net.n_layers + 2)


def linear_weights(net: nn.Module) -> list[torch.Tensor]:
    """The weight parameters of `net`'s weight layers (linear and conv), in order."""
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    return [m.weight for m in layers if isinstance(m, (nn.Linear, nn.Conv2d))]
