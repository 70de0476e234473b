"""Counter-based random numbers that replay exactly.

Every random draw of the simulator (RS keys, momentum noise, network spike dropout,
refractory dropout, input dropout) is a pure function of
``(seed, stream, timestep, forward_step, sample, index)``. The backward pass recomputes
checkpointed segments and must see the same refractory-dropout decisions as the
forward pass; a stateful generator would need its state saved per step, a hash needs
nothing. The same hash is cheap to write in a Triton kernel (uint32 multiply/xor), so
a kernel and its torch twin draw identical numbers.

The mixer is the 32-bit finalizer of MurmurHash3 (``fmix32``), applied to a running
hash of the counters and to the sample and index; the two are combined with xor
and one multiply-xorshift round. Values are uniform on [0, 1) with 24 bits of
resolution.

This module lives in `kernels/` because the Triton kernels draw the same numbers
(kernels/rng_triton.py, kernels/steps_triton.py) and nothing under `kernels/` imports
from `asynctrain`; `asynctrain.rng` re-exports it (and adds `draw_seed`).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9

# Stream ids: one per kind of random decision, so that e.g. enabling network dropout
# does not change which neurons RS selects.
STREAM_RS_KEY = 1
STREAM_MOMENTUM_NOISE = 2
STREAM_NETWORK_DROPOUT = 3
STREAM_REFRACTORY_DROPOUT = 4
STREAM_INPUT_DROPOUT = 5
STREAM_INPUT_ORDER = 6   # MS, queued input: the order among input entries (step 0 for a whole pass)
STREAM_FILL = 7          # RS fill_slots: the ranking of the fillers

# Bits of the input-order key: a pending input's packed selection key is
# (0x7F800000 + q) << 32 | (W - 1 - column), above every float32 neuron key
# (+inf is 0x7F800000), so q < 2**23.
INPUT_ORDER_BITS = 23


def _fmix32_int(h: int) -> int:
    h &= _MASK32
    h ^= h >> 16
    h = (h * _C1) & _MASK32
    h ^= h >> 13
    h = (h * _C2) & _MASK32
    h ^= h >> 16
    return h


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic: a 32-bit value times a 32-bit constant can pass 2**63 and wrap,
    # but the low 32 bits (all we keep) are exact in two's complement.
    h = h ^ (h >> 16)
    h = (h * _C1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _C2) & _MASK32
    return h ^ (h >> 16)


def counter_hash(seed: int, stream: int, timestep: int, step: int) -> int:
    """Scalar part of the hash: mixes the counters shared by a whole [B, M] draw."""
    h = _fmix32_int(seed ^ _GOLDEN)
    for c in (stream, timestep, step):
        h = _fmix32_int(h ^ ((c * _GOLDEN) & _MASK32))
    return h


def uniform(seed: int, stream: int, timestep: int, step: int, index: torch.Tensor, *,
            mixed: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform [0, 1) numbers, one per entry of ``index``.

    Args:
        seed: per-call seed (non-negative int below 2**32).
        stream: one of the ``STREAM_*`` constants.
        timestep: timestep ``t`` (0-based).
        step: forward step inside the pass (0-based; the prioritized input step is 0).
        index: int64 ``[B, M]`` neuron (or feature) indices; row ``b`` is sample ``b``.
            The value for ``(b, j)`` does not depend on the tensor's width, so a draw
            over all neurons and a draw at selected indices agree.
        mixed: ``mix_index(index)`` (anything broadcasting to it), precomputed by a
            caller that draws over the same indices at every step.

    Returns:
        float32 ``[B, M]`` on ``index.device``.
    """
    if index.dim() != 2:
        raise ValueError(f"index must be [B, M], got shape {tuple(index.shape)}")
    rows = torch.arange(index.shape[0], device=index.device, dtype=torch.int64)
    return uniform_at(seed, stream, timestep, step, rows[:, None], index, mixed=mixed)


def uniform_at(seed: int, stream: int, timestep: int | torch.Tensor, step: int, rows: torch.Tensor,
               index: torch.Tensor, *, mixed: torch.Tensor | None = None) -> torch.Tensor:
    """The same numbers as `uniform` at explicit (sample, index) pairs: `rows` and
    `index` are int64 tensors that broadcast together (e.g. the two halves of a
    ``nonzero(as_tuple=True)``). Drawing only where needed (the few neurons that
    fired in a step) costs a fraction of a draw over the whole network. `timestep` may
    also be an int64 tensor broadcasting with them (the nonzero entries of a whole
    [T, B, F] input at once)."""
    if isinstance(timestep, torch.Tensor):
        n = int(timestep.max()) + 1 if timestep.numel() else 0
        table = torch.tensor([counter_hash(seed, stream, t, step) for t in range(n)], dtype=torch.int64)
        h0 = table.to(timestep.device)[timestep]
    else:
        h0 = counter_hash(seed, stream, timestep, step)
    hb = _fmix32(((rows * _GOLDEN) & _MASK32) ^ h0)
    return _finish(hb ^ (mix_index(index) if mixed is None else mixed))


def input_order_key(seed: int, timestep: int, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**23) of input entries at (sample, index) pairs: under MS the
    pending inputs of a pass are taken by decreasing key, ties to the lower index
    (SPEC 6, ``input_order="random"``). Keyed by (seed, timestep, sample, index) and
    not by the forward step: one permutation per pass, replayed exactly."""
    h0 = counter_hash(seed, STREAM_INPUT_ORDER, timestep, 0)
    hb = _fmix32(((rows * _GOLDEN) & _MASK32) ^ h0)
    return _finish_bits(hb ^ mix_index(index)) >> (32 - INPUT_ORDER_BITS)


def mix_index(index: torch.Tensor) -> torch.Tensor:
    """fmix32 of each index: the per-index half of the hash (int64)."""
    return _fmix32(index.to(torch.int64) & _MASK32)


def _finish_bits(h: torch.Tensor) -> torch.Tensor:
    # one multiply-xorshift round over two well-mixed halves (32 bits, int64)
    h = (h * _C1) & _MASK32
    return h ^ (h >> 15)


def _finish(h: torch.Tensor) -> torch.Tensor:
    # keep the top 24 bits
    return (_finish_bits(h) >> 8).to(torch.float32) * (1.0 / (1 << 24))
