"""The per-step ops of one backend, chosen once per call.

`torch` (any device; the oracle of the kernels and the CPU path) and `triton` (the
kernels beside their twins in `kernels/`, CUDA tensors, or CPU tensors when Triton
was imported with TRITON_INTERPRET=1). Both expose the same signatures, so the
engine, its autograd Functions and the backward sweep never branch on the backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from . import rng
from .kernels import _triton
from .kernels.deliver import deliver_backward_torch, deliver_backward_triton, deliver_torch, deliver_triton
from .kernels.lif import lif_backward_torch, lif_backward_triton, lif_torch, lif_triton
from .kernels.rng_triton import uniform_at_triton
from .kernels.select import _select_kernel, select_torch, select_triton

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Ops:
    name: str
    select: Callable
    deliver: Callable
    deliver_backward: Callable
    lif: Callable
    lif_backward: Callable
    uniform_at: Callable


TORCH = Ops("torch", select_torch, deliver_torch, deliver_backward_torch, lif_torch, lif_backward_torch,
            rng.uniform_at)


@functools.lru_cache(maxsize=2)
def triton_ops(deterministic: bool) -> Ops:
    """Triton ops; `deterministic` sums the weight-table gradient without float atomics."""
    return Ops("triton", select_triton, deliver_triton,
               functools.partial(deliver_backward_triton, deterministic=deterministic),
               lif_triton, lif_backward_triton, uniform_at_triton)


def resolve(backend: str, device: torch.device, *, deterministic: bool = False) -> Ops:
    """The ops for `backend` on `device`; an impossible choice raises with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    runnable = _triton.HAS_TRITON and (device.type == "cuda" or _triton.is_interpreted(_select_kernel))
    if backend == "torch" or (backend == "auto" and not runnable):
        return TORCH
    if not _triton.HAS_TRITON:
        raise RuntimeError("backend='triton': Triton is not installed; use backend='torch'")
    if not runnable:
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {device} (or TRITON_INTERPRET=1 "
                           f"set before Triton is first imported, to interpret the kernels on CPU)")
    return triton_ops(deterministic)
