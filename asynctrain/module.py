"""`AsyncSNN`: a drop-in ``nn.Module`` that executes a stack of layers as an
asynchronous (or layered) spiking network and trains it by unlayered backpropagation.

    snn = AsyncSNN(net, SimConfig(forward_group_size=8, policy="MS"))
    counts = snn(frames)          # frames [T, B, n_inputs] -> [T, B, n_outputs]
    counts.sum(0) -> logits; loss.backward() trains net's weights
    snn.stats                     # what the engine measured in that call

The weights stay in `net` (``snn.net``), so one state_dict serves every execution.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from . import rng
from ._warn import warn
from .backends import BACKENDS, resolve
from .config import SimConfig, per_neuron
from .backward import EventFunction
from .engine import Engine
from .layered import layered_forward
from .loop import CallLoop
from .network import Network, linear_weights


class AsyncSNN(nn.Module):
    """Asynchronous SNN around `net`.

    Args:
        net: ``nn.Sequential`` of bias-free ``nn.Linear`` layers (or one ``nn.Linear``),
            or of bias-free ``nn.Conv2d`` (3x3, stride 1, padding 1), ``nn.AvgPool2d(2)``,
            ``nn.Flatten`` and ``nn.Linear``. Every weight layer is followed by LIF
            neurons; the last layer's are the outputs. Pooling is folded into the next
            layer's synaptic map (SPEC 1), so it adds no neurons.
        cfg: execution config (`SimConfig`); default ``SimConfig()``.
        backend: "torch" (per-op tensor ops, any device), "cpu" (CPU tensors: the
            torch ops plus fused C steps for fully connected networks, built on first
            use with the system C compiler; `kernels/cpu_step.py`), "triton" (the
            kernels of `kernels/`: CUDA tensors, or CPU tensors when Triton was
            imported with TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors, cpu
            for CPU tensors when it builds, else torch with a warning). The layered
            path always runs dense torch ops.
        deterministic: with the triton backend, sum weight-table gradients without
            float atomics (bitwise reproducible, slower: per-op kernels instead of the
            fused steps).
        checkpoint_every: forward ops between state checkpoints for the backward.
            None (default): adaptive, about sqrt(ops) checkpoints of about sqrt(ops)
            ops each. 0: no checkpointing, plain autograd through every forward step
            (memory grows with the number of steps). C >= 1: fixed spacing.
        input_shape: ``(C, H, W)`` of an input frame, needed for convolutions (default:
            ``net.input_shape`` if the module carries one, as `asynctrain.models.vgg7`
            does). Frames may then be ``[T, B, C, H, W]`` or flat ``[T, B, C*H*W]``.
            Convolutional networks deliver through `kernels/conv_deliver.py` and
            `kernels/rows_deliver.py` (Triton kernels on the triton backend).

    Attributes:
        stats: dict of the last call (all detached): ``forward_steps [T, B]``,
            ``synops [T, B]``, ``spikes_processed [T, B]`` (nonzero outbox entries
            delivered: spikes, not barrier messages),
            ``first_output_step [T, B]`` (1-based forward step of the pass's first
            output spike, -1 if none), ``capped [T, B]`` and ``capped_passes`` (passes
            stopped by ``max_steps``), ``hidden_spikes [B]``, ``final_v [B, n_neurons]``
            (membranes after the last pass), ``seed`` (the call's seed),
            ``spikes_to_first_output [T, B]`` (spikes delivered up to and
            including the step of the first output spike; -1 if none) and, with
            ``record_currents=True``, ``currents_to_spike [max fan-in + 1]``: how many
            spikes were emitted after integrating n currents in the pass (SPEC 9).
        record_currents: also record the currents-to-spike histogram (a bincount per
            forward step; off by default to keep the hot loop lean).
    """

    def __init__(self, net: nn.Module, cfg: SimConfig | None = None, *, backend: str = "auto",
                 checkpoint_every: int | None = None, record_currents: bool = False,
                 deterministic: bool = False, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.net = net
        self.graph = Network.from_module(net, input_shape)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if checkpoint_every is not None and (isinstance(checkpoint_every, bool)
                                             or not isinstance(checkpoint_every, int)
                                             or checkpoint_every < 0):
            raise ValueError(f"checkpoint_every must be None or an int >= 0, got {checkpoint_every!r}")
        self.backend = backend
        self.deterministic = bool(deterministic)
        self.checkpoint_every = checkpoint_every
        self.record_currents = bool(record_currents)
        self.cfg = cfg if cfg is not None else SimConfig()
        self.stats: dict[str, Any] | None = None
        self._calls = 0

    # --- config ------------------------------------------------------------------
    @property
    def cfg(self) -> SimConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: SimConfig) -> None:
        if not isinstance(cfg, SimConfig):
            raise TypeError(f"cfg must be a SimConfig, got {type(cfg).__name__}")
        n = self.graph.n_neurons
        for name in ("theta", "tau", "sync_threshold"):
            per_neuron(getattr(cfg, name), n, name, torch.float64)  # raises on a wrong length
        _warn_if_unsyncable(self.graph, cfg)
        self._cfg = cfg

    @contextlib.contextmanager
    def configured(self, **changes: Any) -> Iterator["AsyncSNN"]:
        """Run with other execution settings, same weights::

            with snn.configured(policy="RS", stop="output"):
                counts = snn(frames)
        """
        old = self._cfg
        self.cfg = old.replace(**changes)
        try:
            yield self
        finally:
            self._cfg = old

    # --- forward -----------------------------------------------------------------
    def forward(self, frames: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """Args:
            frames: float ``[T, B, n_inputs]``: spike counts (or analog currents) per
                input feature per frame of ``cfg.dt`` ms.
            seed: seed of this call's randomness (RS keys, dropouts, noise); default
                see `SimConfig.seed`.

        Returns: ``[T, B, n_outputs]`` output spike counts per pass (or output
        potentials after each pass with ``readout="potential"``).
        """
        weights = linear_weights(self.net)
        frames = self._check_frames(frames, weights)
        cfg, graph = self.cfg, self.graph
        seed = self._call_seed(seed)
        if self.training and cfg.input_dropout > 0:
            frames = _input_dropout(frames, cfg.input_dropout, seed)
        T, B = frames.shape[:2]
        if cfg.policy == "layered":
            out, stats = layered_forward(
                graph, cfg, weights, frames, training=self.training, seed=seed,
                histogram=self.record_currents,
                theta=per_neuron(cfg.theta, graph.n_neurons, "theta", frames.dtype).to(frames.device),
                decay=torch.exp(-cfg.dt / per_neuron(cfg.tau, graph.n_neurons, "tau", torch.float64))
                .to(frames.device, frames.dtype))
        else:
            ops = resolve(self.backend, frames.device, deterministic=self.deterministic)
            engine = Engine(graph, cfg, batch=B, device=frames.device, dtype=frames.dtype, ops=ops,
                            training=self.training, seed=seed, checkpoint_every=self.checkpoint_every,
                            histogram=self.record_currents)
            wt = graph.weight_table(weights)
            if self.checkpoint_every == 0 or not (torch.is_grad_enabled() and wt.requires_grad):
                res = CallLoop(engine).forward(frames, wt, keep_checkpoints=False)
                out, stats = res.out, res.stats
            else:
                out = EventFunction.apply(engine, frames, wt)
                stats = engine.stats
        stats["capped_passes"] = int(stats["capped"].sum())
        stats["seed"] = seed
        if stats["capped_passes"]:
            warn(f"{stats['capped_passes']} of {T * B} passes reached max_steps="
                 f"{cfg.max_steps} with spikes still pending (see stats['capped'])", RuntimeWarning)
        self.stats = stats
        return out

    def _check_frames(self, frames: Any, weights: list[torch.Tensor]) -> torch.Tensor:
        n_in, w = self.graph.n_inputs, weights[0]
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor [T, B, {n_in}], got {type(frames).__name__}")
        shape = self.graph.input_shape
        if shape is not None and len(shape) > 1 and frames.dim() == 2 + len(shape):
            if tuple(frames.shape[2:]) != shape:
                raise ValueError(f"frames must be [T, B, {', '.join(map(str, shape))}] (or flat "
                                 f"[T, B, {n_in}]), got shape {tuple(frames.shape)}")
            frames = frames.flatten(2)
        if frames.dim() != 3 or frames.shape[2] != n_in:
            raise ValueError(f"frames must be [T, B, {n_in}] (time, batch, input features), "
                             f"got shape {tuple(frames.shape)}")
        if frames.shape[0] == 0 or frames.shape[1] == 0:
            raise ValueError(f"frames must have T >= 1 and B >= 1, got shape {tuple(frames.shape)}")
        if not frames.is_floating_point():
            raise TypeError(f"frames must be floating point (spike counts as float), got {frames.dtype}; "
                            f"use frames.float()")
        if frames.device != w.device:
            raise ValueError(f"frames are on {frames.device} but the weights on {w.device}")
        # one reduction and one host read when all is well (NaN/inf propagate into the
        # sums); a finite sum that overflows only sends us to the exact checks
        sums = torch.stack([frames.detach().sum().to(w.dtype), *(v.detach().sum() for v in weights)])
        if not bool(torch.isfinite(sums).all()):
            for (name, v) in zip(_weight_names(self.net), weights):
                bad = ~torch.isfinite(v.detach())
                if bad.any():
                    raise ValueError(f"weight {name} holds {int(bad.sum())} NaN/inf value(s) of "
                                     f"{v.numel()}, first at {[int(i) for i in bad.nonzero()[0]]}; "
                                     f"the module cannot run (a diverged training or a corrupt import?)")
            bad = ~torch.isfinite(frames)
            if bad.any():
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(f"frames contain {int(bad.sum())} NaN/inf value(s), first at "
                                 f"[t, b, feature] = {list(where)}")
        return frames.to(w.dtype)

    def _call_seed(self, seed: int | None) -> int:
        self._calls += 1
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
                raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
            return seed
        if self.cfg.seed is not None:
            return rng.counter_hash(self.cfg.seed, 0, self._calls - 1, 0)
        return rng.draw_seed()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"layers={list(self.graph.layer_sizes)}, policy={c.policy}, K={c.K}, "
                f"backend={self.backend}")


def _input_dropout(frames: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Drop input entries (all spikes of one feature in one frame) with probability p.
    The numbers are drawn at the nonzero entries only (`rng.uniform_at`: the same
    numbers as a draw over every feature), so sparse frames cost their spikes, not
    their width."""
    t, rows, cols = frames.nonzero(as_tuple=True)
    drop = rng.uniform_at(seed, rng.STREAM_INPUT_DROPOUT, t, 0, rows, cols) < p
    out = frames.clone()
    out[t[drop], rows[drop], cols[drop]] = 0.0
    return out


def _weight_names(net: nn.Module) -> list[str]:
    """Parameter names of `linear_weights(net)`, in the same order (``net.0.weight``)."""
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    prefix = "net." if isinstance(net, nn.Sequential) else "net"
    return [f"{prefix}{i}.weight" if prefix == "net." else "net.weight"
            for i, m in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d))]


def _warn_if_unsyncable(graph: Network, cfg: SimConfig) -> None:
    """Warn when some neurons' sync threshold exceeds the currents they can receive in
    a pass: they can never fire (SPEC 5). With refractoriness every source is delivered
    at most once per pass, plus once more with barrier messages (a barrier, then a
    spike) and with carried outboxes; without it there is no bound."""
    sync = cfg.sync_threshold
    if not cfg.refractory or (not isinstance(sync, torch.Tensor) and sync <= 1):
        return
    reach = graph.fan_in_per_neuron() * (1 + int(cfg.barrier_messages) + int(cfg.carry_pending))
    never = per_neuron(sync, graph.n_neurons, "sync_threshold", torch.float64) > reach.to(torch.float64)
    if not bool(never.any()):
        return
    layers, lo = [], 0
    for l, n in enumerate(graph.layer_sizes[1:]):
        k = int(never[lo:lo + n].sum())
        if k:
            layers.append(f"layer {l + 1}: {k} of {n}")
        lo += n
    outputs = bool(never[-graph.n_outputs:].all())
    shown = sync if not isinstance(sync, torch.Tensor) else f"up to {int(sync.max())}"
    warn(f"sync_threshold={shown} is above what {int(never.sum())} neurons can receive in a pass "
         f"(their fan-in {int(reach[never].min())}..{int(reach[never].max())}; {', '.join(layers)}): "
         f"they can never fire" + ("; no output neuron can, so the network outputs nothing"
                                   if outputs else "") + ". Lower sync_threshold (a barrier preset "
         "sets it to the fan-in: SimConfig.preset('loihi', net)).", RuntimeWarning)
