"""The per-step ops of one backend, chosen once per call.

`torch` (any device; the oracle of the kernels), `triton` (the kernels beside their
twins in `kernels/`, CUDA tensors, or CPU tensors when Triton was imported with
TRITON_INTERPRET=1) and `cpu` (the torch ops plus the fused C steps of
`kernels/cpu_step.py` for fully connected networks on CPU tensors; built on first
use with the system C compiler). The per-op entries share their signatures, so the
engine, its autograd Functions and the backward sweep never branch on the backend;
`select_at` selects from the listed pending entries (the engine lists them for
their random keys), `select_keyed` the same with no list and no host sync (CUDA):
the triton kernel computes the keys itself from the pending flags, potentials and
hashes (no [B, W] keys, order or packed tensors, no topk), the twin over every
column; it also fills free slots (SPEC 8). `image` holds the conv and rows
deliveries of convolutional networks (`conv.ImageSynapses`). `fused` (cpu:
kernels/cpu_step.py; triton: kernels/steps_triton.py, a persistent forward kernel
running many steps per launch) replaces whole forward steps, replays and backward
steps of the checkpointed path; `triton` with ``deterministic=True`` keeps the per-op
kernels (the fused backward sums the weight-table gradient with
float atomics). `auto`: triton on CUDA, cpu on CPU when it builds (else torch,
with a warning once).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import rng
from ._warn import warn
from .kernels import _triton
from .kernels import image_steps, listed_steps
from .kernels.conv_deliver import conv_deliver_backward_triton, conv_deliver_triton
from .kernels.rows_deliver import rows_deliver_backward_triton, rows_deliver_triton
from .kernels.deliver import deliver_backward_torch, deliver_backward_triton, deliver_torch, deliver_triton
from .kernels.lif import lif_backward_torch, lif_backward_triton, lif_torch, lif_triton
from .kernels.pass_stats import pass_stats_torch, pass_stats_triton
from .kernels.rng_triton import uniform_at_triton
from .kernels.select import (_select_kernel, select_keys_torch, select_pending_torch, select_torch,  # noqa: F401
                             select_triton)
from .kernels.select_keyed import select_keyed_torch, select_keyed_triton
from .kernels import cpu_step
from .kernels.steps_triton import TritonSteps

BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass(frozen=True)
class Ops:
    name: str
    select: Callable
    deliver: Callable
    deliver_backward: Callable
    lif: Callable
    lif_backward: Callable
    uniform_at: Callable
    # (pending bool [B, W], (rows, cols) int64 [P], keys float32 [P], k, order int64 [P] | None)
    # -> int64 [B, k]: the selection from the listed pending entries (`select_listed`)
    select_at: Callable
    # (pending bool [B, W], values [B, W], is_input bool [W], k, seed, t, step, *, policy_ms, noise,
    # input_random, sel) -> int64 [B, k]: the same selection with the keys computed from the
    # state (no list, no [B, W] keys: no host sync, CUDA), or (sel) its free slots filled
    # (`kernels/select_keyed.py` select_keyed_torch / select_keyed_triton)
    select_keyed: Callable
    # conv networks: map kind ("conv", "fc") -> (deliver, deliver_backward), conv.ImageSynapses
    image: dict
    # conv networks, sync-free: a step's deliveries through every layer in one launch
    # (`kernels/image_steps.py` image_deliver); None: each layer through `image`, over
    # its segment of the entries sorted by layer (what the twin computes)
    image_deliver: Callable | None = None
    # conv networks, listed steps: a step's receivers evaluated once each, with the
    # pass's bookkeeping or the backward record (`kernels/listed_steps.py` listed_step)
    listed_step: Callable = listed_steps.listed_step_torch
    # conv networks, the reverse of a step's deliveries through every layer in one
    # launch (`kernels/image_steps.py` image_deliver_backward; float atomics); None:
    # each layer through `image`, over its segment
    image_deliver_backward: Callable | None = None
    # conv networks, the reverse of a listed step's evaluation (`listed_backward`)
    listed_backward: Callable = listed_steps.listed_backward_torch
    fused: type | None = None  # CpuSteps / TritonSteps: whole steps (fully connected networks)
    deterministic: bool = False  # weight gradients without float atomics (triton)
    # a pass's stats from its per-step records, written in place (`kernels/pass_stats.py`)
    pass_stats: Callable = pass_stats_torch


def select_listed(pending: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
                  k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """The torch ops' selection: from the pending list (`select_pending_torch`, work
    O(pending)); `pending` is not read."""
    b, w = pending.shape
    return select_pending_torch(*at, keys, b, w, k, order=order)


def select_listed_kernel(select: Callable, pending: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor],
                 keys: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """A select kernel's selection: it reads float32 keys over the whole [B, W] state
    (only pending entries count). Its float keys cannot order the inputs of a random
    input order (``order >= 0``): the K inputs at the front are found from the list
    first (all at +inf, above every neuron: the kernel then takes exactly them)."""
    b, w = pending.shape
    if order is not None:
        is_in = order >= 0
        front = select_pending_torch(at[0][is_in], at[1][is_in], keys[is_in], b, w, k, order=order[is_in])
        keep = ~is_in | torch.zeros_like(pending).scatter_(1, front, True)[at]
        at, keys = (at[0][keep], at[1][keep]), keys[keep]
        pending = torch.zeros_like(pending).index_put_(at, torch.ones_like(keys, dtype=torch.bool))
    dense = torch.zeros(pending.shape, dtype=torch.float32, device=pending.device)
    return select(pending, dense.index_put_(at, keys), k)


TORCH_IMAGE = image_steps.TWINS  # map kind -> the torch twins (deliver, deliver_backward)

TORCH = Ops("torch", select_torch, deliver_torch, deliver_backward_torch, lif_torch, lif_backward_torch,
            rng.uniform_at, select_listed, select_keyed_torch, TORCH_IMAGE)
CPU = Ops("cpu", select_torch, deliver_torch, deliver_backward_torch, lif_torch, lif_backward_torch,
          rng.uniform_at, select_listed, select_keyed_torch, TORCH_IMAGE, fused=cpu_step.CpuSteps)


@functools.lru_cache(maxsize=2)
def triton_ops(deterministic: bool) -> Ops:
    """Triton ops; `deterministic` sums the weight-table gradient without float atomics
    (per-op kernels only: the fused steps' backward uses atomics)."""
    image = {"conv": (conv_deliver_triton,
                      functools.partial(conv_deliver_backward_triton, deterministic=deterministic)),
             "fc": (rows_deliver_triton,
                    functools.partial(rows_deliver_backward_triton, deterministic=deterministic))}
    return Ops("triton", select_triton, deliver_triton,
               functools.partial(deliver_backward_triton, deterministic=deterministic),
               lif_triton, lif_backward_triton, uniform_at_triton,
               functools.partial(select_listed_kernel, select_triton),
               select_keyed_triton, image, image_steps.image_deliver_triton, listed_steps.listed_step_triton,
               None if deterministic else image_steps.image_deliver_backward_triton,
               listed_steps.listed_backward_triton, None if deterministic else TritonSteps, deterministic,
               pass_stats_triton)


def resolve(backend: str, device: torch.device, *, deterministic: bool = False) -> Ops:
    """The ops for `backend` on `device`; an impossible choice raises with the reason.

    "auto" on CPU tensors with Triton's interpreter on (TRITON_INTERPRET=1 when Triton
    was imported) runs the interpreted kernels, as the tests of the triton backend
    want, but warns: left in a shell, the variable makes every call orders of
    magnitude slower without a word. A cache folder for the fused CPU steps that
    cannot be written falls back to "torch" with a warning ("auto") or raises naming
    it ("cpu")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" or (backend == "auto" and device.type == "cpu" and not _interpreting()):
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' needs CPU tensors, got {device}")
        try:
            if backend == "cpu":
                cpu_step.load()  # raises with the compiler's message
                return CPU
            return CPU if _cpu_builds() else TORCH
        except OSError as e:  # the build folder ($ASYNCTRAIN_CACHE) cannot be written
            why = (f"the fused CPU steps cannot be built: {e} (set ASYNCTRAIN_CACHE to a writable "
                   f"folder)")
            if backend == "cpu":
                raise RuntimeError(f"backend='cpu': {why}; or use backend='torch'") from None
            warn(f"{why}; using backend='torch' (slower)", RuntimeWarning)
            return TORCH
    runnable = _triton.HAS_TRITON and (device.type == "cuda" or _triton.is_interpreted(_select_kernel))
    if backend == "torch" or (backend == "auto" and not runnable):
        return TORCH
    if not _triton.HAS_TRITON:
        raise RuntimeError("backend='triton': Triton is not installed; use backend='torch'")
    if not runnable:
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {device} (or TRITON_INTERPRET=1 "
                           f"set before Triton is first imported, to interpret the kernels on CPU)")
    if backend == "auto" and device.type == "cpu":
        warn("TRITON_INTERPRET=1 was set when Triton was imported, so backend='auto' runs the "
             "Triton interpreter on these CPU tensors: thousands of times slower than the fused "
             "CPU steps. Unset TRITON_INTERPRET for normal runs, or pass backend='triton' to "
             "interpret on purpose", RuntimeWarning)
    return triton_ops(deterministic)


def _interpreting() -> bool:
    """Triton's interpreter is on (tests of the triton backend on CPU tensors)."""
    return _triton.is_interpreted(_select_kernel)


@functools.lru_cache(maxsize=1)
def _cpu_builds() -> bool:
    try:
        cpu_step.load()
    except RuntimeError as e:
        warnings.warn(f"the fused CPU steps are unavailable, using backend='torch' (slower): {e}",
                      RuntimeWarning, stacklevel=3)
        return False
    return True
