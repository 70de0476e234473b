"""The per-step ops of one backend, chosen once per call.

`torch` (any device; the oracle of the kernels), `triton` (the kernels beside their
twins in `kernels/`, CUDA tensors, or CPU tensors when Triton was imported with
TRITON_INTERPRET=1) and `cpu` (the torch ops plus the fused C steps of
`kernels/cpu_step.py` for fully connected networks on CPU tensors; built on first
use with the system C compiler). The per-op entries share their signatures, so the
engine, its autograd Functions and the backward sweep never branch on the backend;
`fused` (cpu: kernels/cpu_step.py; triton: kernels/steps_triton.py, a persistent
forward kernel running many steps per launch) replaces whole forward steps, replays
and backward steps of the checkpointed path; `triton` with ``deterministic=True``
keeps the per-op kernels (the fused backward sums the weight-table gradient with
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
from .kernels import _triton
from .kernels.deliver import deliver_backward_torch, deliver_backward_triton, deliver_torch, deliver_triton
from .kernels.lif import lif_backward_torch, lif_backward_triton, lif_torch, lif_triton
from .kernels.rng_triton import uniform_at_triton
from .kernels.select import _select_kernel, select_torch, select_triton
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
    fused: type | None = None  # CpuSteps / TritonSteps: whole steps (fully connected networks)
    deterministic: bool = False  # weight gradients without float atomics (triton)


TORCH = Ops("torch", select_torch, deliver_torch, deliver_backward_torch, lif_torch, lif_backward_torch,
            rng.uniform_at)
CPU = Ops("cpu", select_torch, deliver_torch, deliver_backward_torch, lif_torch, lif_backward_torch,
          rng.uniform_at, cpu_step.CpuSteps)


@functools.lru_cache(maxsize=2)
def triton_ops(deterministic: bool) -> Ops:
    """Triton ops; `deterministic` sums the weight-table gradient without float atomics
    (per-op kernels only: the fused steps' backward uses atomics)."""
    return Ops("triton", select_triton, deliver_triton,
               functools.partial(deliver_backward_triton, deterministic=deterministic),
               lif_triton, lif_backward_triton, uniform_at_triton,
               None if deterministic else TritonSteps, deterministic)


def resolve(backend: str, device: torch.device, *, deterministic: bool = False) -> Ops:
    """The ops for `backend` on `device`; an impossible choice raises with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" or (backend == "auto" and device.type == "cpu" and not _interpreting()):
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' needs CPU tensors, got {device}")
        if backend == "cpu":
            cpu_step.load()  # raises with the compiler's message
            return CPU
        if _cpu_builds():
            return CPU
        return TORCH
    runnable = _triton.HAS_TRITON and (device.type == "cuda" or _triton.is_interpreted(_select_kernel))
    if backend == "torch" or (backend == "auto" and not runnable):
        return TORCH
    if not _triton.HAS_TRITON:
        raise RuntimeError("backend='triton': Triton is not installed; use backend='torch'")
    if not runnable:
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {device} (or TRITON_INTERPRET=1 "
                           f"set before Triton is first imported, to interpret the kernels on CPU)")
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
