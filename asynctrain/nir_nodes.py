"""Reading NIR nodes for `asynctrain.nir.from_nir`: the chain of a graph, and each
node checked and turned into a layer or per-neuron parameters (the rules are in
`asynctrain.nir`'s docstring). Every refusal names the node and the parameter."""

from __future__ import annotations

import math
from typing import Any

import nir
import numpy as np
import torch
from torch import nn

SNNTORCH_DT_MS = 0.1
"""The step snnTorch 1.0's NIR export assumes (``dt = 1e-4`` s)."""
UNIT_SCALE_TOL = 1e-6
"""Input scales ``r dt / tau`` within this of 1 are 1 (see `asynctrain.nir`)."""
RESET_KEY = "reset_mechanism"
"""LIF node metadata key: the source library's reset (only "zero" is imported)."""


def _above(thr: np.ndarray) -> np.ndarray:
    """``v >= above(thr)`` is ``v > thr`` for float32 v."""
    t = np.asarray(thr, dtype=np.float64).astype(np.float32)
    return np.nextafter(t, np.float32(np.inf)).astype(np.float64)


def chain(graph: "nir.NIRGraph") -> list[str]:
    """Node names from Input to Output; refuses cycles, branches and sub-graphs."""
    nodes = graph.nodes
    for name, node in nodes.items():
        if isinstance(node, nir.NIRGraph):
            raise ValueError(f"node {name!r} is a sub-graph (a recurrent layer such as snnTorch's "
                             f"RLeaky or RSynaptic); recurrent connections are not supported")
    edges = [(str(a), str(b)) for a, b in graph.edges]
    for a, b in edges:
        for x in (a, b):
            if x not in nodes:
                raise ValueError(f"edge {a!r} -> {b!r} names a node {x!r} that is not in the graph")
        if a == b:
            raise ValueError(f"recurrent edge {a!r} -> {b!r}: self-connections are not supported")
    edges = list(dict.fromkeys(edges))  # duplicates say nothing more
    outs: dict[str, list[str]] = {k: [] for k in nodes}
    ins: dict[str, list[str]] = {k: [] for k in nodes}
    for a, b in edges:
        outs[a].append(b)
        ins[b].append(a)
    back = _back_edge(list(nodes), outs)
    if back is not None:
        raise ValueError(f"recurrent edge {back[0]!r} -> {back[1]!r}: the graph has a cycle; "
                         f"recurrent connections are not supported")
    inputs = [k for k, v in nodes.items() if isinstance(v, nir.Input)]
    outputs = [k for k, v in nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"the graph must have one Input and one Output node, has inputs {inputs} "
                         f"and outputs {outputs}")
    chain, seen = [inputs[0]], {inputs[0]}
    while not isinstance(nodes[chain[-1]], nir.Output):
        cur = chain[-1]
        if len(outs[cur]) != 1:
            raise ValueError(f"the graph is not a chain: node {cur!r} has {len(outs[cur])} outgoing "
                             f"edges {outs[cur]} (only one path Input -> ... -> Output is supported)")
        nxt = outs[cur][0]
        if nxt in seen:
            raise ValueError(f"recurrent edge {cur!r} -> {nxt!r}: the graph has a cycle; recurrent "
                             f"connections are not supported")
        if len(ins[nxt]) != 1:
            raise ValueError(f"the graph is not a chain: node {nxt!r} has {len(ins[nxt])} incoming "
                             f"edges from {ins[nxt]}")
        chain.append(nxt)
        seen.add(nxt)
    rest = sorted(set(nodes) - seen)
    if rest:
        raise ValueError(f"the graph is not a chain: node(s) {rest} are off the path from "
                         f"{inputs[0]!r} to {outputs[0]!r}")
    return chain


def _back_edge(names: list[str], outs: dict[str, list[str]]) -> tuple[str, str] | None:
    """An edge that closes a cycle (depth-first search), or None."""
    state = dict.fromkeys(names, 0)  # 0 new, 1 on the stack, 2 done
    for root in names:
        if state[root]:
            continue
        stack = [(root, iter(outs[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state[nxt] == 1:
                return node, nxt
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(outs[nxt])))
    return None


def io_shape(node: Any, key: str) -> np.ndarray:
    t = node.input_type if key == "input" else node.output_type
    return np.asarray(next(iter(t.values()))).reshape(-1)


def _zero(name: str, kind: str, param: str, v: Any) -> None:
    a = np.asarray(v, dtype=np.float64)
    if a.size and np.any(a != 0):
        raise ValueError(f"node {name!r} ({kind}): {param} must be 0 (the engine has no "
                         f"{'biases' if param == 'bias' else param}), got max |{param}| = "
                         f"{float(np.abs(a).max()):g}")


def _ints(v: Any, n: int = 2) -> tuple[int, ...]:
    a = np.asarray(v).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, n)
    return tuple(int(x) for x in a)


def _finite_weight(name: str, kind: str, weight: Any) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype.kind == "f" and not np.isfinite(w).all():
        raise ValueError(f"node {name!r} ({kind}): weight holds {int((~np.isfinite(w)).sum())} NaN/inf "
                         f"value(s) of {w.size}; the model cannot run (a diverged training?)")
    return w


def layer_of(name: str, node: Any, shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    kind = type(node).__name__
    if isinstance(node, (nir.Linear, nir.Affine)):
        if isinstance(node, nir.Affine):
            _zero(name, kind, "bias", node.bias)
        w = _finite_weight(name, kind, node.weight)
        if w.ndim != 2:
            raise ValueError(f"node {name!r} ({kind}): weight must be 2-D [out, in], got {w.shape}")
        if len(shape) != 1 or w.shape[1] != shape[0]:
            raise ValueError(f"node {name!r} ({kind}): weight takes {w.shape[1]} inputs but gets "
                             f"shape {shape}" + (" (insert a Flatten node)" if len(shape) == 3 else ""))
        m = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        return m, (w.shape[0],)
    if isinstance(node, nir.Conv2d):
        w = _finite_weight(name, kind, node.weight)
        if w.ndim != 4 or w.shape[2:] != (3, 3):
            raise ValueError(f"node {name!r} (Conv2d): kernel size must be 3x3, got weight shape "
                             f"{tuple(w.shape)}")
        for param, want in (("stride", (1, 1)), ("dilation", (1, 1))):
            if _ints(getattr(node, param)) != want:
                raise ValueError(f"node {name!r} (Conv2d): {param} must be 1, got "
                                 f"{getattr(node, param)!r}")
        pad = node.padding
        if not (isinstance(pad, str) and pad == "same") and (isinstance(pad, str) or _ints(pad) != (1, 1)):
            raise ValueError(f"node {name!r} (Conv2d): padding must be 1, got {pad!r}")
        if int(np.asarray(node.groups)) != 1:
            raise ValueError(f"node {name!r} (Conv2d): groups must be 1, got {node.groups!r}")
        _zero(name, kind, "bias", node.bias)
        if len(shape) != 3 or shape[0] != w.shape[1]:
            raise ValueError(f"node {name!r} (Conv2d): takes {w.shape[1]} channels but gets shape "
                             f"{shape}")
        m = nn.Conv2d(w.shape[1], w.shape[0], 3, stride=1, padding=1, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
        return m, (w.shape[0], shape[1], shape[2])
    if isinstance(node, nir.AvgPool2d):
        for param, want in (("kernel_size", (2, 2)), ("stride", (2, 2)), ("padding", (0, 0))):
            if _ints(getattr(node, param)) != want:
                raise ValueError(f"node {name!r} (AvgPool2d): {param} must be {want[0]}, got "
                                 f"{getattr(node, param)!r} (only 2x2 average pooling is supported)")
        if len(shape) != 3:
            raise ValueError(f"node {name!r} (AvgPool2d) needs an image-shaped input, gets {shape}")
        return nn.AvgPool2d(2), (shape[0], shape[1] // 2, shape[2] // 2)
    if isinstance(node, nir.Flatten):
        if len(shape) == 1:
            raise ValueError(f"node {name!r} (Flatten) follows a flat layer {shape}")
        if int(node.start_dim) != 0 or int(node.end_dim) not in (-1, len(shape) - 1):
            raise ValueError(f"node {name!r} (Flatten): start_dim must be 0 and end_dim -1 (all "
                             f"of C, H, W), got {node.start_dim}, {node.end_dim}")
        return nn.Flatten(), (math.prod(shape),)
    if isinstance(node, (nir.LIF, nir.IF)):
        raise ValueError(f"node {name!r} ({kind}) does not follow a weight layer; neurons come "
                         f"after Linear, Affine or Conv2d")
    raise ValueError(f"node {name!r}: {kind} is not supported (supported: Linear, zero-bias "
                     f"Affine, Conv2d 3x3/s1/p1, AvgPool2d 2, Flatten, LIF, IF)"
                     + (" - a current-based synapse (CubaLIF) has a second state the engine does "
                        "not model" if kind in ("CubaLIF", "CubaLI") else ""))


def out_shape(mod: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(mod, nn.Linear):
        return (mod.out_features,)
    return (mod.out_channels, shape[1], shape[2])


def _param(name: str, kind: str, param: str, v: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.size == 1:
        return np.full(shape, float(a.reshape(-1)[0]))
    if a.size != math.prod(shape):
        raise ValueError(f"node {name!r} ({kind}): {param} has shape {a.shape}, the layer before "
                         f"it has {shape} neurons")
    return a.reshape(shape)


def neurons_of(name: str, node: Any, shape: tuple[int, ...], dt_ms: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tau [ms], theta, input scale) per neuron, shaped like the layer."""
    kind = type(node).__name__
    if not isinstance(node, (nir.LIF, nir.IF)):
        raise ValueError(f"node {name!r}: {kind} after a weight layer is not supported; neurons "
                         f"must be LIF or IF"
                         + (" (CubaLIF: a current-based synapse the engine does not model)"
                            if kind in ("CubaLIF", "CubaLI") else ""))
    reset = (node.metadata or {}).get(RESET_KEY) if isinstance(node.metadata, dict) else None
    if reset is not None:
        reset = reset.decode() if isinstance(reset, bytes) else str(reset)
        if reset != "zero":
            raise ValueError(f"node {name!r} ({kind}): {RESET_KEY} = {reset!r}; only reset to zero "
                             f"is modelled (reset by subtraction keeps V - theta)")
    _zero(name, kind, "v_reset", node.v_reset)
    dt_s = dt_ms / 1000.0
    thr = _param(name, kind, "v_threshold", node.v_threshold, shape)
    if not np.isfinite(thr).all() or (thr < 0).any():
        raise ValueError(f"node {name!r} ({kind}): v_threshold must be finite and >= 0, got min "
                         f"{float(np.nanmin(thr)):g}")
    theta = _above(thr)
    r = _param(name, kind, "r", node.r, shape)
    if not np.isfinite(r).all() or (r <= 0).any():
        raise ValueError(f"node {name!r} ({kind}): r must be finite and > 0")
    if isinstance(node, nir.IF):
        scale = r * dt_s
        return np.full(shape, math.inf), theta, scale
    _zero(name, kind, "v_leak", node.v_leak)
    tau_nir = _param(name, kind, "tau", node.tau, shape)
    if np.isnan(tau_nir).any() or (tau_nir <= 0).any():
        raise ValueError(f"node {name!r} (LIF): tau must be > 0, got min {float(np.nanmin(tau_nir)):g}")
    if np.isinf(tau_nir).any():
        raise ValueError(f"node {name!r} (LIF): tau = inf (no leak, and no input under forward "
                         f"Euler, whose input scale is r dt / tau); write such neurons as an IF node")
    beta = 1.0 - dt_s / tau_nir
    if (beta < 0).any():
        bad = float(tau_nir[beta < 0].reshape(-1)[0])
        raise ValueError(f"node {name!r} (LIF): tau = {bad:g} s is shorter than dt = {dt_s:g} s, so "
                         f"the forward-Euler decay 1 - dt/tau is negative; is dt right (cfg.dt in "
                         f"ms; snnTorch exports use {SNNTORCH_DT_MS} ms)?")
    with np.errstate(divide="ignore"):
        tau = np.where(beta >= 1.0, math.inf,
                       np.where(beta > 0, -dt_ms / np.log(np.where(beta > 0, beta, 0.5)), dt_ms / 1000.0))
    scale = r * dt_s / tau_nir
    return tau, theta, scale


def fold_scale(mod: nn.Module, scale: np.ndarray, name: str, wname: str) -> None:
    if np.all(np.abs(scale - 1.0) <= UNIT_SCALE_TOL):
        return
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"node {name!r}: input scale r*dt/tau must be finite and > 0")
    with torch.no_grad():
        if isinstance(mod, nn.Linear):
            s = torch.from_numpy(scale.reshape(-1)).to(mod.weight.dtype)
            mod.weight.mul_(s[:, None])
            return
        per_chan = scale.reshape(scale.shape[0], -1)
        if not np.all(per_chan == per_chan[:, :1]):
            raise ValueError(f"node {name!r}: the input scale r*dt/tau varies inside a channel; "
                             f"it cannot be folded into the shared weights of convolution "
                             f"{wname!r} (make r the same for every position of a channel)")
        s = torch.from_numpy(per_chan[:, 0].copy()).to(mod.weight.dtype)
        mod.weight.mul_(s[:, None, None, None])
