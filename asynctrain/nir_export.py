"""Export of an `AsyncSNN` as a NIR graph (`asynctrain.nir.to_nir`; the mapping and
why are in `asynctrain.nir`'s docstring)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import nir
import numpy as np
import torch
from torch import nn

from .config import SimConfig, per_neuron
from .module import AsyncSNN

__all__ = ["to_nir", "SETTINGS_KEY"]

SETTINGS_KEY = "asynctrain_config"
"""Graph metadata key of the execution settings (JSON)."""
_NODE_KNOBS = ("tau", "theta", "dt")
"""Knobs that live in the neuron nodes or in "dt", not in the settings JSON."""


def to_nir(snn: AsyncSNN) -> "nir.NIRGraph":
    """`snn` (weights, neurons, execution settings) as a NIR graph.

    Node names: ``input``, ``layer<i>`` for ``snn.net[i]`` (weights, pooling,
    flattening), ``neurons<l>`` after weight layer l, ``output``. Weights are written
    as float32 copies (the module's dtype when it is float64), neuron parameters in
    float64. Raises ValueError for a layer that mixes IF and LIF neurons.

    Mapping (module docstring for the why): our per-step decay ``d = exp(-dt / tau)``
    becomes forward-Euler parameters ``tau_nir = dt_s / (1 - d)``, ``r = tau_nir / dt_s``
    (input scale ``r dt_s / tau_nir = 1``), ``v_leak = v_reset = 0``, with ``dt_s =
    cfg.dt / 1000`` in the graph's metadata (``"dt"``, seconds); IF layers as ``IF``
    with ``r = 1 / dt_s``; ``v_threshold = nextafter(float32(theta), -inf)`` (NIR fires
    at ``v > v_threshold``). Every other `SimConfig` field goes into
    ``metadata["asynctrain_config"]`` (JSON), so `from_nir` restores the execution.
    """
    if not isinstance(snn, AsyncSNN):
        raise TypeError(f"to_nir takes an AsyncSNN, got {type(snn).__name__}")
    cfg, graph = snn.cfg, snn.graph
    dt_s = float(cfg.dt) / 1000.0
    n = graph.n_neurons
    tau = per_neuron(cfg.tau, n, "tau", torch.float64).cpu().numpy()
    theta = per_neuron(cfg.theta, n, "theta", torch.float64).cpu().numpy()
    layers = list(snn.net) if isinstance(snn.net, nn.Sequential) else [snn.net]
    in_shape = graph.input_shape if graph.input_shape is not None else (graph.n_inputs,)
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(in_shape)})}
    order = ["input"]
    shape = tuple(in_shape)
    if len(shape) > 1 and isinstance(layers[0], nn.Linear):
        # image-shaped frames into a fully connected layer: NIR wants the flattening said
        nodes["flatten_input"] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                             end_dim=-1)
        order.append("flatten_input")
        shape = (math.prod(shape),)
    lo, l = 0, 0
    for i, m in enumerate(layers):
        name = f"layer{i}"
        if isinstance(m, nn.Linear):
            nodes[name] = nir.Linear(weight=_np_weight(m.weight))
            shape = (m.out_features,)
        elif isinstance(m, nn.Conv2d):
            nodes[name] = nir.Conv2d(
                input_shape=tuple(shape[1:]), weight=_np_weight(m.weight), stride=1, padding=1,
                dilation=1, groups=1, bias=np.zeros(m.out_channels, dtype=np.float32))
            shape = (m.out_channels, *shape[1:])
        elif isinstance(m, nn.AvgPool2d):
            nodes[name] = nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                        padding=np.array([0, 0]))
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
            order.append(name)
            continue
        elif isinstance(m, nn.Flatten):
            nodes[name] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0,
                                      end_dim=-1)
            shape = (math.prod(shape),)
            order.append(name)
            continue
        else:  # Network.from_module accepted the module, so this cannot happen
            raise TypeError(f"layer {i} ({type(m).__name__}) has no NIR mapping")
        order.append(name)
        size = math.prod(shape)
        sl = slice(lo, lo + size)
        nodes[f"neurons{l}"] = _neuron_node(tau[sl].reshape(shape), theta[sl].reshape(shape),
                                            cfg.dt, dt_s, l)
        order.append(f"neurons{l}")
        lo, l = lo + size, l + 1
    nodes["output"] = nir.Output(output_type={"output": np.array(shape)})
    order.append("output")
    meta = {"source": "asynctrain", "dt": dt_s, "dt_unit": "s",
            "discretization": "forward Euler: beta = 1 - dt/tau, input scale r*dt/tau",
            SETTINGS_KEY: json.dumps(_settings(cfg))}
    return nir.NIRGraph(nodes=nodes, edges=list(zip(order[:-1], order[1:])), metadata=meta)


def _np_weight(w: torch.Tensor) -> np.ndarray:
    w = w.detach().cpu()
    return w.numpy().copy() if w.dtype == torch.float64 else w.to(torch.float32).numpy().copy()


def _neuron_node(tau: np.ndarray, theta: np.ndarray, dt_ms: float, dt_s: float, l: int) -> Any:
    decay = np.exp(-dt_ms / tau)  # float64, 1.0 where tau is inf
    thr = _below(theta)
    if (decay == 1.0).all():
        return nir.IF(r=np.full(tau.shape, 1.0 / dt_s), v_threshold=thr,
                      v_reset=np.zeros(tau.shape))
    if (decay == 1.0).any():
        raise ValueError(f"neuron layer {l} mixes IF (tau = inf, or so long that exp(-dt/tau) "
                         f"rounds to 1) and LIF neurons; NIR has one neuron type per node: "
                         f"give the layer one kind")
    tau_nir = dt_s / (1.0 - decay)
    return nir.LIF(tau=tau_nir, r=tau_nir / dt_s, v_leak=np.zeros(tau.shape), v_threshold=thr,
                   v_reset=np.zeros(tau.shape))


def _below(theta: np.ndarray) -> np.ndarray:
    """``v > below(theta)`` is ``v >= theta`` for float32 v (theta rounded to float32)."""
    t = theta.astype(np.float32)
    return np.nextafter(t, np.float32(-np.inf)).astype(np.float64)


def _settings(cfg: SimConfig) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in _NODE_KNOBS:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = v.tolist() if isinstance(v, torch.Tensor) else v
    out["dt_ms"] = float(cfg.dt)
    return out
