"""The counter hash of `kernels/rng.py` (`asynctrain.rng`) in Triton: uniform [0, 1) numbers at
(sample, index) pairs, bit-exact with `rng.uniform_at` (tested under the interpreter).

The twin computes in int64 and masks to 32 bits; here every step is a uint32
operation (multiplication wraps mod 2**32, shifts are logical), which is the same
arithmetic. The scalar part of the hash (seed, stream, timestep, step) is mixed on
the host by `rng.counter_hash` and passed in; the kernel mixes the sample row and the
index (fmix32 of each, xor, one multiply-xorshift round, top 24 bits). If
`rng.uniform_at` changes, this must change with it: tests/test_kernels_triton.py
compares the two bit for bit. `_fmix32` is a `@triton.jit` helper so that fused kernels (RS keys, dropout
inside select or LIF) can call it with the same bits.
"""

from __future__ import annotations

import torch

from . import rng
from ._triton import check_tensors, hash_arg, jit, tl, triton

_BLOCK = 1024


@jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on a uint32 tensor."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@jit
def _bits_at_from_hash(h0, rows, index):
    """uint32 scalar `h0` (the host-side counter hash), int tensors `rows`, `index` ->
    the finished uint32 hash (`rng._finish_bits`)."""
    hb = _fmix32((rows.to(tl.uint32) * 0x9E3779B9) ^ h0)
    h = (hb ^ _fmix32(index.to(tl.uint32))) * 0x85EBCA6B
    h ^= h >> 15
    return h


@jit
def _uniform_at_from_hash(h0, rows, index):
    """uint32 scalar `h0` (the host-side counter hash), int tensors `rows`, `index` ->
    float32 uniforms in [0, 1) with 24 bits, as `rng.uniform_at`."""
    return (_bits_at_from_hash(h0, rows, index) >> 8).to(tl.float32) * (1.0 / 16777216.0)


# Constants: BLOCK. Per launch (not specialised on): the hash h0 (i64, `hash_arg`), the
# number of draws n, the broadcast shape's columns and the operands' strides (0 where
# broadcast, 1 or the row length otherwise: a variant per pattern), and the 16-byte
# alignment of `rows` / `index` (callers pass views at varying offsets: a second
# variant per pointer otherwise).
@jit(do_not_specialize=("h0", "n", "n_cols", "rs0", "rs1", "is0", "is1", "rows_ptr", "index_ptr"))
def _uniform_at_kernel(rows_ptr, index_ptr, out_ptr, h0, n, n_cols, rs0, rs1, is0, is1, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # n < 2**31: int32 index math
    inside = offs < n
    i = offs // n_cols
    j = offs - i * n_cols
    i, j = i.to(tl.int64), j.to(tl.int64)
    rows = tl.load(rows_ptr + i * rs0 + j * rs1, mask=inside, other=0)
    index = tl.load(index_ptr + i * is0 + j * is1, mask=inside, other=0)
    tl.store(out_ptr + offs, _uniform_at_from_hash(h0.to(tl.uint32), rows, index), mask=inside)


def _as_2d(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` broadcast to `shape` as a 2-D view ``[rows, columns]`` (zero strides where
    broadcast: nothing is materialised); more than 2 dims: a contiguous copy."""
    t = t.expand(shape)
    if t.dim() <= 2:
        return t.reshape((1,) * (2 - t.dim()) + tuple(shape))
    return t.contiguous().view(-1, shape[-1])


def uniform_at_triton(seed: int, stream: int, timestep: int, step: int, rows: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
    """The same numbers as `uniform` at explicit (sample, index) pairs: `rows` and
    `index` are int64 tensors that broadcast together (e.g. the two halves of a
    ``nonzero(as_tuple=True)``, or ``[B, 1]`` x ``[1, W]``: read through their strides,
    never materialised as two ``[B, W]`` index tensors). Returns float32 of the
    broadcast shape."""
    op = "uniform_at_triton"
    check_tensors(op, _uniform_at_kernel, rows=rows, index=index)
    for name, t in (("rows", rows), ("index", index)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    shape = torch.broadcast_shapes(rows.shape, index.shape)
    out = torch.empty(shape, dtype=torch.float32, device=rows.device)
    n = out.numel()
    if n >= 2**31:
        raise ValueError(f"{op}: {n} draws in one call; at most 2**31 - 1")
    if n:
        r2, i2 = _as_2d(rows, shape), _as_2d(index, shape)
        h0 = rng.counter_hash(seed, stream, timestep, step)
        _uniform_at_kernel[(triton.cdiv(n, _BLOCK),)](
            r2, i2, out.view(-1), hash_arg(h0), n, r2.shape[1], *r2.stride(), *i2.stride(), BLOCK=_BLOCK)
    return out


uniform_at_torch = rng.uniform_at  # the twin: same signature, same numbers
