"""Data-driven initialisation: scale each layer's weights so that its neurons fire at
a target rate on a batch of training data, before training.

    scales = calibrate_rates(snn, frames)     # frames [T, B, F] of the training data

With a default initialisation (uniform, scaled by 1 / sqrt(fan-in)) the first passes
of a sparse spike input are often silent: the input of a frame is too weak to cross
the threshold, so the layers above it, and the output, never fire, and an
unlayered model gets no gradient at all (a silent neuron is never delivered). Layer
by layer from the input, this multiplies the weights into layer l by the factor that
makes layer l fire `rate` spikes per neuron and timestep (mean over the batch, its
timesteps and the layer's neurons) under the layered execution, the layers below
already calibrated (as LSUV does for the variance of ANN activations). The search is
a bisection of log(scale): the rate of a layer grows with the scale of its weights.
The output layer's target is `output_rate` (default: `rate`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .module import AsyncSNN

__all__ = ["calibrate_rates", "layer_rates"]


def _linears(snn: AsyncSNN) -> list[nn.Module]:
    layers = [m for m in snn.net.modules() if isinstance(m, nn.Linear)]
    if len(layers) != len(snn.graph.layer_sizes) - 1:
        raise ValueError("calibrate_rates supports stacks of nn.Linear layers (MLPs); got "
                         f"{len(layers)} nn.Linear among {len(snn.graph.layer_sizes) - 1} "
                         f"weight layers (a convolutional network?)")
    return layers


def _per_neuron_prefix(value, n: int):
    return value[:n] if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def layer_rates(snn: AsyncSNN, frames: torch.Tensor) -> list[float]:
    """Spikes per neuron and timestep of every layer (hidden layers, then the output
    layer), layered execution, inference settings, on `frames` ``[T, B, F]``."""
    return [_rate(snn, frames, l) for l in range(len(_linears(snn)))]


def _rate(snn: AsyncSNN, frames: torch.Tensor, l: int) -> float:
    """Spikes per neuron and timestep of weight layer l's neurons: the counts of a
    network cut after layer l, run layered."""
    cfg = snn.cfg
    n = sum(snn.graph.layer_sizes[1:l + 2])  # neurons of layers 1..l+1
    sub = AsyncSNN(nn.Sequential(*_linears(snn)[:l + 1]), cfg.replace(
        policy="layered", readout="counts", theta=_per_neuron_prefix(cfg.theta, n),
        tau=_per_neuron_prefix(cfg.tau, n),
        sync_threshold=_per_neuron_prefix(cfg.sync_threshold, n)))
    sub.eval()
    return float(sub(frames, seed=0).mean())


@torch.no_grad()
def calibrate_rates(snn: AsyncSNN, frames: torch.Tensor, rate: float = 0.1,
                    output_rate: float | None = None, iterations: int = 20,
                    bounds: tuple[float, float] = (1e-2, 1e3)) -> list[float]:
    """Scale the weights of `snn` in place, layer by layer from the input, so that
    each layer fires `rate` (the output layer `output_rate`) spikes per neuron and
    timestep on `frames` ``[T, B, F]`` under the layered execution. Returns the
    factor applied to each weight layer. A layer that cannot reach its target within
    `bounds` gets the bound's factor (its rate is then as close as it gets; the
    returned factor says so)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must lie in (0, 1) spikes per neuron and timestep, got {rate!r}")
    output_rate = rate if output_rate is None else output_rate
    if not 0.0 < output_rate < 1.0:
        raise ValueError(f"output_rate must lie in (0, 1), got {output_rate!r}")
    layers = _linears(snn)
    scales = []
    for l, lin in enumerate(layers):
        target = output_rate if l == len(layers) - 1 else rate
        w0 = lin.weight.detach().clone()
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        for _ in range(iterations):
            mid = (lo + hi) / 2
            lin.weight.copy_(w0 * math.exp(mid))
            if _rate(snn, frames, l) < target:
                lo = mid
            else:
                hi = mid
        scale = math.exp((lo + hi) / 2)
        lin.weight.copy_(w0 * scale)
        scales.append(scale)
    return scales
