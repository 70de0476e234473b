"""Counter-based random numbers that replay exactly: the hash lives beside the kernels
that draw the same numbers (`kernels/rng.py`, installed as `asynctrain.kernels.rng`;
its docstring has the design), re-exported here for the library, plus the per-call
seed drawn from torch's RNG."""

from __future__ import annotations

import torch

from .kernels.rng import (STREAM_FILL, STREAM_INPUT_DROPOUT, STREAM_INPUT_ORDER,  # noqa: F401
                          STREAM_MOMENTUM_NOISE, STREAM_NETWORK_DROPOUT, STREAM_REFRACTORY_DROPOUT,
                          STREAM_RS_KEY, INPUT_ORDER_BITS, counter_hash, input_order_key, mix_index,
                          uniform, uniform_at)
from .kernels.rng import _C1, _C2, _GOLDEN, _MASK32, _finish, _fmix32, _fmix32_int  # noqa: F401


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh per-call seed from torch's RNG (so ``torch.manual_seed`` governs it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
