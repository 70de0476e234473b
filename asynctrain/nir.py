"""Models in and out through NIR, the Neuromorphic Intermediate Representation.

    graph = to_nir(snn)                    # nir.NIRGraph
    write("model.nir", snn)                # (or a graph) -> HDF5 file
    snn = from_nir(read("model.nir"))      # AsyncSNN, weights and execution settings
    snn = from_nir(snntorch_graph, SimConfig(dt=0.1, K=8))  # a graph without our metadata

Needs the `nir` package (``pip install -e ".[nir]"`` in the checkout, or ``pip install nir``).

What maps to what (everything the engine runs; anything else is refused, naming the
node and the parameter, never approximated):

| ours (`AsyncSNN`)                       | NIR                                            |
|-----------------------------------------|------------------------------------------------|
| bias-free ``nn.Linear``                 | ``Linear`` (or ``Affine`` with an all-zero bias) |
| bias-free ``nn.Conv2d`` 3x3, s1, p1     | ``Conv2d`` (zero bias, dilation 1, groups 1)   |
| ``nn.AvgPool2d(2)``                     | ``AvgPool2d`` (kernel 2, stride 2, padding 0)  |
| ``nn.Flatten()``                        | ``Flatten``                                    |
| LIF neurons after a weight layer        | ``LIF`` (v_leak = v_reset = 0)                 |
| IF neurons (tau = inf)                  | ``IF`` (v_reset = 0)                           |

The discretization (how the discrete model maps onto NIR's continuous LIF):

Ours (SPEC 2-5), per neuron, timestep t of ``dt`` ms: ``V <- V * exp(-dt / tau)``,
then ``V <- V + I`` for every delivered current ``I = W x spikes``, fire when
``V >= theta``, reset to 0. NIR's LIF is ``tau dv/dt = (v_leak - v) + r I``, fire
when ``v > v_threshold``, ``v <- v_reset``. NIR states no integration rule; the
libraries that write NIR (snnTorch 1.0 above all) step it with forward Euler at a
step ``dt``::

    v[t+1] = (1 - dt / tau_nir) v[t] + (r dt / tau_nir) I[t]

i.e. per-step decay ``beta = 1 - dt / tau_nir`` and input scale ``r dt / tau_nir``.
snnTorch writes ``snn.Leaky(beta)`` as ``tau = dt / (1 - beta)``, ``r = tau / dt``
(input scale 1), ``dt = 1e-4`` s, and its own importer inverts exactly that. This
module uses the same convention both ways:

- import: ``beta = 1 - dt / tau_nir`` becomes our per-neuron
  ``tau = -dt / ln(beta)`` ms (so ``exp(-dt / tau)`` is beta again, to float64
  rounding; beta = 0 becomes ``tau = dt / 1000``, whose decay ``exp(-1000)`` is
  exactly 0); an input scale ``s = r dt / tau_nir`` that is not 1 is folded into the
  weights (row i of the incoming weight matrix times ``s_i``; for a convolution,
  ``s`` must be the same across each output channel's positions). Scales within
  1e-6 of 1 are taken as exactly 1: snnTorch computes ``r = tau / dt`` in float32,
  which leaves ``s = 1 +- 6e-8`` (one float32 rounding), and folding that would move every weight by a
  float32 rounding and lose the exact match. IF: input scale ``r dt``, tau = inf.
  Reading a snnTorch graph with ``exp(-dt / tau_nir)`` as the decay instead is a
  different model: on the cross-library test network (tests/test_nir_snntorch.py:
  40-30-20-10, beta 0.05-0.95, 20 frames, 64 samples) 40 % of the per-sample output
  counts differ that way, none with this convention (on a network whose betas are all
  near 1 the two decays differ little: 1.6 % of the counts was measured on one).
- export: ``tau_nir = dt / (1 - exp(-dt / tau))``, ``r = tau_nir / dt`` (input scale
  1), v_leak = v_reset = 0; IF neurons (every tau of the layer infinite) as ``IF``
  with ``r = 1 / dt``. A layer mixing IF and LIF neurons is refused (NIR has one
  neuron type per node). NIR times are in seconds: ``dt`` is written as
  ``cfg.dt / 1000`` into the graph's metadata (key ``"dt"``). snnTorch's own importer
  (``snntorch.import_nir.import_from_nir``, which fixes dt = 0.1 ms and wants one
  threshold per layer) runs a graph of a model with ``dt = 0.1`` ms and such
  thresholds with our layered spikes exactly (tested).
- thresholds: NIR (and snnTorch) fire at ``v > v_threshold``, we at ``V >= theta``.
  For float32 potentials ``v > x`` is exactly ``v >= nextafter(x, +inf)``, so the
  export writes ``v_threshold = nextafter(float32(theta), -inf)`` and the import
  takes ``theta = nextafter(float32(v_threshold), +inf)``: both directions are
  exact in float32 (theta comes back as its float32 value).

Execution settings (K, policy, stop, refractoriness, sync thresholds, dropouts,
seed, ...) and ``dt`` travel in the graph's metadata (``"asynctrain_config"``, JSON);
`from_nir` restores them. For a graph without them (another library's), pass ``cfg``:
its settings are used, ``cfg.dt`` is the discretization step, and the graph's
neurons replace ``cfg.tau`` and ``cfg.theta``. A ``cfg`` passed with one of our graphs
overrides the stored settings (dt stays the graph's).

What stays exact when importing from another library, and what cannot:

- snnTorch ``snn.Leaky(reset_mechanism="zero")``, any ``reset_delay``: exact (spike
  counts of our layered execution equal snnTorch's, tested). snnTorch's delayed
  reset zeroes the membrane at the start of the next step instead of at the spike;
  the next potential is ``beta * 0 + I`` either way, so only the membrane trace it
  reports differs, never a spike.
- reset by subtraction (snnTorch's default) and no reset: not modelled; snnTorch's
  exporter writes the same LIF node for every reset mechanism, so `from_snntorch`
  checks the modules and refuses naming the layer and ``reset_mechanism``, and
  records the mechanism in each LIF node's metadata, which `from_nir` checks.
- ``Synaptic`` / ``CubaLIF`` (a current synapse), recurrent layers, biases,
  v_leak != 0, v_reset != 0: refused.
- Other libraries: their graphs import by the same forward-Euler rule (dt from the
  graph's metadata, else ``cfg.dt``). SpikingJelly's LIF update ``v += (x - v)
  / tau`` (tau in steps, decay_input) is that rule with dt = 1 step (decay ``1 -
  1/tau``, input scale ``1/tau``); Norse's default LIF carries a synaptic current
  (CubaLIF, refused). Neither library was installed here: their graphs were not
  checked against their own simulations, and their threshold, reset and scaling
  conventions on export are not verified.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import nir
except ImportError as err:  # pragma: no cover - the extra is installed in CI
    raise ImportError("asynctrain.nir needs the `nir` package: pip install nir (or pip install -e '.[nir]' "
                      "in the asynctrain checkout)") from err

from ._warn import warn
from .config import SimConfig
from .module import AsyncSNN
from .outdir import saving
from .nir_export import SETTINGS_KEY as _SETTINGS_KEY, to_nir
from .nir_nodes import (RESET_KEY, SNNTORCH_DT_MS, UNIT_SCALE_TOL, chain, fold_scale, io_shape,
                        layer_of, neurons_of, out_shape)

__all__ = ["to_nir", "from_nir", "write", "read", "from_snntorch", "SNNTORCH_DT_MS",
           "UNIT_SCALE_TOL"]



# ------------------------------------------------------------------------ import
def from_nir(graph: "nir.NIRGraph | str | os.PathLike", cfg: SimConfig | None = None, *,
             backend: str = "auto") -> AsyncSNN:
    """An `AsyncSNN` from a NIR graph (or a ``.nir`` file), exactly or not at all.

    Args:
        graph: a chain ``Input -> weight -> neurons [-> AvgPool2d] [-> Flatten] ->
            weight -> neurons ... -> Output`` (a leading ``Flatten`` after the input
            is allowed and kept as the input shape).
        cfg: execution settings for a graph without ours, or to override ours; its
            ``dt`` (ms) is the discretization step when the graph's metadata has no
            ``"dt"`` (seconds).
        backend: of the returned module.

    Mapping (snnTorch's forward-Euler rule, which its exporter and importer use):
    per-step decay ``beta = 1 - dt_s / tau_nir`` and input scale ``s = r dt_s / tau_nir``
    (IF: ``s = r dt_s``, no decay). The engine decays by ``exp(-cfg.dt / tau)`` with a
    per-neuron tau, so beta becomes ``tau = -dt / ln(beta)`` ms per neuron (beta = 0:
    ``tau = dt / 1000``, decay exactly 0); it adds currents unscaled, so ``s != 1`` is
    folded into the incoming weights (row i times ``s_i``; a convolution needs one s
    per output channel), and ``|s - 1| <= 1e-6`` counts as 1. Thresholds:
    ``theta = nextafter(float32(v_threshold), +inf)``, which makes our ``V >= theta``
    NIR's ``v > v_threshold`` for float32 potentials. A LIF node whose metadata says
    ``reset_mechanism`` other than "zero" is refused. With these, snnTorch's
    ``Leaky(reset_mechanism="zero")`` networks give snnTorch's spikes exactly.

    Returns: the module; ``snn.cfg`` has per-neuron ``tau`` and ``theta`` tensors
    ``[n_neurons]`` (hidden then output, layer order, channel-major) and the graph's dt.

    Raises: ValueError naming the node and the parameter for anything the engine
    cannot run exactly (see the module docstring), or when no dt is known.
    """
    source = None
    if isinstance(graph, (str, os.PathLike)):
        source, graph = os.fspath(graph), read(graph)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"from_nir takes a nir.NIRGraph or a .nir path, got {type(graph).__name__}")
    meta = graph.metadata if isinstance(graph.metadata, dict) else {}
    dt_ms, stored = _dt_and_settings(meta, cfg, source or getattr(graph, "_asynctrain_source", None))
    path = chain(graph)
    body = path[1:-1]
    in_shape = _input_shape(io_shape(graph.nodes[path[0]], "input"), graph.nodes[body[0]] if body else None)
    if body and isinstance(graph.nodes[body[0]], nir.Flatten):
        body = body[1:]  # a flat input: frames may be image-shaped or flat
        in_shape_eff: tuple[int, ...] = (math.prod(in_shape),)
    else:
        in_shape_eff = in_shape
    modules: list[nn.Module] = []
    taus, thetas = [], []
    shape = shape_before = in_shape_eff
    want_neurons: tuple[str, nn.Module] | None = None
    for name in body:
        node = graph.nodes[name]
        if want_neurons is not None:
            wname, mod = want_neurons
            tau, theta, scale = neurons_of(name, node, out_shape(mod, shape_before), dt_ms)
            fold_scale(mod, scale, name, wname)
            taus.append(tau.reshape(-1))
            thetas.append(theta.reshape(-1))
            want_neurons = None
            continue
        shape_before = shape
        mod, shape = layer_of(name, node, shape)
        modules.append(mod)
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            want_neurons = (name, mod)
    if want_neurons is not None:
        raise ValueError(f"node {want_neurons[0]!r} ({type(graph.nodes[want_neurons[0]]).__name__}) "
                         f"is not followed by a LIF or IF node before the output")
    if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in modules):
        raise ValueError("the graph has no weight layer (Linear, Affine or Conv2d)")
    if not isinstance(modules[-1], (nn.Linear, nn.Conv2d)):
        raise ValueError(f"the graph ends with {type(modules[-1]).__name__} before the output; the "
                         f"last node before Output must be a LIF or IF after a weight layer")
    net = nn.Sequential(*modules)
    if len(in_shape) == 3:
        net.input_shape = in_shape  # as asynctrain.models do: presets and checkpoints read it
    tau_all = torch.from_numpy(np.concatenate(taus))
    theta_all = torch.from_numpy(np.concatenate(thetas))
    base = cfg if cfg is not None else SimConfig(**stored)  # an explicit cfg wins
    run_cfg = base.replace(tau=tau_all, theta=theta_all, dt=dt_ms)
    return AsyncSNN(net, run_cfg, backend=backend,
                    input_shape=in_shape if len(in_shape) == 3 else None)


def _input_shape(shape: np.ndarray, first: Any) -> tuple[int, ...]:
    """The Input node's shape without leading singleton axes that exporters add for the
    batch (``(1, 20)`` before a Linear is 20 features, ``(1, C, H, W)`` before a
    Conv2d or a Flatten is an image)."""
    dims = [int(s) for s in shape]
    keep = 1 if isinstance(first, (nir.Linear, nir.Affine)) else 3
    while len(dims) > keep and dims[0] == 1:
        dims = dims[1:]
    return tuple(dims)


_DT_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3}
"""Units the graph metadata's ``dt_unit`` may name, in ms (NIR's own unit is seconds)."""


def _dt_and_settings(meta: dict, cfg: SimConfig | None,
                     source: str | None = None) -> tuple[float, dict[str, Any]]:
    where = f"{source}: " if source else ""
    stored: dict[str, Any] = {}
    stored_dt = None
    if _SETTINGS_KEY in meta:
        raw = meta[_SETTINGS_KEY]
        try:
            stored = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except ValueError as err:
            raise ValueError(f"{where}graph metadata {_SETTINGS_KEY!r} is not JSON ({err}); the file "
                             f"was not written by asynctrain.nir, or was damaged: remove the key "
                             f"and pass cfg=SimConfig(...) instead") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{where}graph metadata {_SETTINGS_KEY!r} must hold a JSON object, got "
                             f"{type(stored).__name__}")
        stored_dt = stored.pop("dt_ms", None)
        known = {f.name for f in dataclasses.fields(SimConfig)}
        unknown = sorted(set(stored) - known)
        if unknown:  # written by another version of asynctrain
            warn(f"{where}the graph's execution settings name field(s) {unknown} that this "
                 f"SimConfig does not have; they are ignored", UserWarning)
            stored = {k: v for k, v in stored.items() if k in known}
        for k, v in list(stored.items()):
            if isinstance(v, list):
                stored[k] = torch.tensor(v)
    if "dt" in meta:
        unit = meta.get("dt_unit", "s")
        unit = unit.decode() if isinstance(unit, bytes) else str(unit)
        if unit not in _DT_UNITS:
            raise ValueError(f"{where}graph metadata 'dt_unit' is {unit!r}; known units: "
                             f"{', '.join(_DT_UNITS)} (NIR's own unit is seconds)")
        try:
            dt_ms = float(np.asarray(meta["dt"], dtype=np.float64)) * _DT_UNITS[unit]
        except (TypeError, ValueError):
            dt_ms = math.nan
        if not (math.isfinite(dt_ms) and dt_ms > 0):
            raise ValueError(f"{where}graph metadata 'dt' must be a positive number (of {unit}), got "
                             f"{meta['dt']!r}")
        if stored_dt is not None and math.isclose(stored_dt, dt_ms, rel_tol=1e-9):
            dt_ms = float(stored_dt)  # our own ms value, without the round trip through s
        if cfg is not None and not math.isclose(cfg.dt, dt_ms, rel_tol=1e-12):
            warn(f"the graph's metadata fixes dt = {dt_ms:g} ms; cfg.dt = {cfg.dt:g} ms "
                 f"is ignored (the neurons' decay was exported for the graph's dt)", UserWarning)
        return dt_ms, stored
    if cfg is None:
        raise ValueError(f"{where}the graph's metadata has no 'dt' and no cfg was given: from_nir needs "
                         "the discretization step; pass cfg=SimConfig(dt=...) in ms (snnTorch "
                         f"1.0 exports assume dt = {SNNTORCH_DT_MS} ms)")
    return float(cfg.dt), stored


# ------------------------------------------------------------------------ files
def write(path: str | os.PathLike, model: "AsyncSNN | nir.NIRGraph") -> None:
    """Write `model` (an `AsyncSNN` or a graph) as a ``.nir`` (HDF5) file."""
    graph = to_nir(model) if isinstance(model, AsyncSNN) else model
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"write takes an AsyncSNN or a nir.NIRGraph, got {type(model).__name__}")
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is a folder: give a file name such as "
                         f"{os.path.join(os.fspath(path), 'model.nir')!r}")
    with saving(path, ".nir file") as tmp:
        nir.write(tmp, graph)


def read(path: str | os.PathLike) -> "nir.NIRGraph":
    """Read a ``.nir`` file (a graph; `from_nir` turns it into a module)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no .nir file at {os.fspath(path)!r}")
    try:
        graph = nir.read(path, type_check=False)  # from_nir checks every shape itself, naming the node
    except (OSError, KeyError, ValueError, TypeError, AssertionError) as err:
        raise ValueError(f"{os.fspath(path)!r} is not a readable NIR file (HDF5 written by "
                         f"nir.write): {type(err).__name__}: {str(err).splitlines()[0][:160]}") from None
    if isinstance(graph.metadata, dict):  # h5py gives strings back as bytes
        graph.metadata = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in graph.metadata.items()}
    graph._asynctrain_source = os.fspath(path)  # named by from_nir's errors
    return graph


# ----------------------------------------------------------------------- snnTorch
def from_snntorch(net: nn.Module, sample: torch.Tensor, cfg: SimConfig | None = None, *,
                  backend: str = "auto") -> tuple[AsyncSNN, "nir.NIRGraph"]:
    """Export an snnTorch model with snnTorch's own NIR exporter and import it.

    `net`: e.g. ``nn.Sequential(nn.Linear(64, 32, bias=False), snn.Leaky(beta=...,
    reset_mechanism="zero", init_hidden=True), ...)``. `sample`: one input ``[1, F]``
    (batch first, as snnTorch's exporter wants). Checked first, naming the layer:
    every ``snn.Leaky`` resets to zero (not by subtraction or not at all), has no
    inhibition, state quantization or graded spikes, and ``0 <= beta <= 1``; other
    snnTorch neurons (Synaptic, recurrent, ...) are refused. Scalar ``beta`` and
    ``threshold`` are expanded to the layer's shape (found by running `sample` through
    a copy; snnTorch 1.0's exporter needs per-neuron values to type its graph). The graph
    gets ``dt = 1e-4`` s and each LIF node its reset mechanism in its metadata.

    Returns (module, graph). `cfg`: execution settings (dt is 0.1 ms regardless).
    """
    import copy

    import snntorch as snn
    from snntorch.export_nir import export_to_nir

    # state left over from a training run (init_hidden membranes with autograd
    # history) cannot be deep-copied; the copy gets detached values
    memo: dict[int, Any] = {}
    for m in net.modules():
        for v in [*vars(m).values(), *m._buffers.values()]:
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    net = copy.deepcopy(net, memo)
    for path, m in net.named_modules():
        where = f"layer {path!r} ({type(m).__name__})"
        if type(m) is snn.Leaky:  # not its subclasses (DeltaLeaky has other dynamics)
            _check_leaky(m, where)
        elif isinstance(m, snn.SpikingNeuron) or type(m).__module__.startswith("snntorch"):
            raise ValueError(f"{where}: only snn.Leaky neurons are supported (Synaptic / CubaLIF, "
                             f"recurrent and other neuron models are not)")
    _per_neuron_leaky(net, sample, snn.Leaky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        graph = export_to_nir(net, sample, ignore_dims=[0])
    graph.metadata = dict(source="snntorch", dt=SNNTORCH_DT_MS / 1000.0, dt_unit="s")
    for node in graph.nodes.values():
        if isinstance(node, nir.LIF):
            node.metadata = dict(node.metadata or {}, **{RESET_KEY: "zero"})
    cfg = None if cfg is None else cfg.replace(dt=SNNTORCH_DT_MS)
    return from_nir(graph, cfg, backend=backend), graph


def _check_leaky(m: nn.Module, where: str) -> None:
    mech = getattr(m, "_reset_mechanism", None) or getattr(m, "reset_mechanism", None)
    if mech != "zero":
        raise ValueError(f"{where}: reset_mechanism = {mech!r}; only reset to zero is modelled "
                         f"(reset by subtraction keeps V - theta after a spike, which the engine "
                         f"does not do): use reset_mechanism='zero'")
    for attr in ("inhibition", "state_quant"):
        if getattr(m, attr, False) not in (False, None):
            raise ValueError(f"{where}: {attr} is not supported")
    g = torch.as_tensor(getattr(m, "graded_spikes_factor", 1.0))
    if float(g.max()) != 1.0 or float(g.min()) != 1.0:
        raise ValueError(f"{where}: graded_spikes_factor must be 1, got {g.tolist()}")
    beta = torch.as_tensor(m.beta).detach()
    if (beta < 0).any() or (beta > 1).any():
        raise ValueError(f"{where}: beta must lie in [0, 1], got {beta.tolist()}")


def _per_neuron_leaky(net: nn.Module, sample: torch.Tensor, leaky_type: type) -> None:
    """Expand scalar beta / threshold of every Leaky of `net` (a copy) to its layer's
    shape, read from a forward pass of `sample`."""
    shapes: dict[int, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple) -> None:  # returns None: the input is unchanged
        shapes.setdefault(id(mod), tuple(args[0].shape[1:]))

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, leaky_type)]
    try:
        with torch.no_grad():
            net(sample)
    finally:
        for h in hooks:
            h.remove()
    for m in net.modules():
        if not isinstance(m, leaky_type):
            continue
        m.reset_mem()
        shape = shapes.get(id(m))
        for attr in ("beta", "threshold"):
            v = torch.as_tensor(getattr(m, attr)).detach()
            if v.numel() == 1 and shape:
                new = v.reshape(()).expand(shape).clone()
                setattr(m, attr, nn.Parameter(new) if isinstance(getattr(m, attr), nn.Parameter)
                        else new)
