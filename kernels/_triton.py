"""What every Triton launcher in `kernels/` shares: the optional import, the device
rule, argument checks.

- Importing never needs a GPU, nor Triton itself: without Triton the kernels are
  plain (never launched) functions and the launchers raise with the reason.
- Launchers run compiled kernels on CUDA tensors. Triton decides compiled vs
  interpreted once, when it is imported: with ``TRITON_INTERPRET=1`` in the
  environment at that moment, ``@triton.jit`` (ours and the one behind `tl.sum`,
  `tl.cumsum`, ...) builds interpreted functions, and the launchers then also accept
  CPU tensors (the tests). Setting the variable later has no effect on Triton, so a
  launcher that sees it set with compiled kernels says so instead of failing inside
  the interpreter.

Versions: the kernels build and the interpreted tests pass with triton 3.6 (the GPU
machine's, with torch 2.11) and 3.8 (torch 2.14). Kept to what both have: plain
`triton.jit(do_not_specialize=...)` by parameter name (no parameter annotations to
force an int type, no `tl.range` unroll options); `tl.static_range`, `tl.sort`,
`tl.debug_barrier`, `atomic_add(sem="relaxed")`. Triton 3.6's interpreter converts a
scalar argument used as a loop bound with ``int()`` of a 1-element array, which
numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"): interpreting on
3.6 needs numpy < 2.4 (3.8 squeezes first). Built with triton 3.6's bundled ptxas,
the fused backward and the fp64 fused forward keep 16-48 byte stack frames (no
spilled registers) that 3.8's do not.
"""

from __future__ import annotations

import inspect
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction
except ImportError:  # the torch backend works without Triton
    triton = tl = JITFunction = None

HAS_TRITON = triton is not None


def jit(fn=None, *, do_not_specialize: tuple[str, ...] = ()):
    """``triton.jit`` when Triton is installed, else the function itself (never run).

    `do_not_specialize`: names of integer arguments that change from launch to launch
    (hashes, step counters, entry counts, per-layer sizes). Triton's JIT otherwise
    compiles one variant per value class of every int argument: 1 becomes a constant,
    multiples of 16 get their own variant, and the type is i32 or i64 by value. A name
    that is not a parameter raises (a typo would silently bring the recompiles back).
    Usable as ``@jit`` and ``@jit(do_not_specialize=(...))``.
    """
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    names = tuple(do_not_specialize)
    unknown = [n for n in names if n not in inspect.signature(fn).parameters]
    if unknown:
        raise ValueError(f"jit({fn.__name__}): do_not_specialize names {unknown} are not parameters")
    if not HAS_TRITON:
        return fn
    return triton.jit(fn, do_not_specialize=names) if names else triton.jit(fn)


def hash_arg(h: int) -> int:
    """A uint32 hash as a kernel argument of one type. Triton types an int argument
    i32 below 2**31 and i64 from there on, so raw hashes would compile two variants of
    every kernel that takes one; with bit 32 set every hash is an i64 in
    [2**32, 2**33), and the kernels keep the low 32 bits (``.to(tl.uint32)``). Hash
    parameters are also in their kernel's `do_not_specialize` (no 1 / multiple-of-16
    variants)."""
    if not 0 <= h < 2**32:
        raise ValueError(f"hash_arg: a hash is a uint32, got {h}")
    return h | (1 << 32)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return HAS_TRITON and not isinstance(kernel, JITFunction)


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_tensors(op: str, kernel, **tensors: torch.Tensor) -> torch.device:
    """Raise unless Triton can run `kernel` (`op`) on these tensors; returns their device."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed; use the torch backend")
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{op}: all tensors must be on one device, {name} is on {dev} "
                             f"but {first_name} is on {first}")
    if first.type != "cuda" and not is_interpreted(kernel):
        if _env_interpret():
            raise RuntimeError(f"{op}: {first_name} is on {first} and TRITON_INTERPRET=1 is set, but "
                               "Triton was imported before it was set, so the kernels are compiled "
                               "(CUDA only); set TRITON_INTERPRET=1 before the first import of "
                               "triton / asynctrain")
        raise RuntimeError(f"{op}: Triton kernels need CUDA tensors, {first_name} is on {first} "
                           "(use the torch backend, or run with TRITON_INTERPRET=1 set before "
                           "Triton is imported to interpret them on CPU)")
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` entries are ints or None (any size)."""
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


def check_accumulators(op: str, current: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> None:
    """The [B, W] buffers a deliver kernel adds into in place: current in `dtype`,
    counts int32 of the same shape, both contiguous."""
    check_dtype(op, "current", current, (dtype,))
    check_shape(op, "counts", counts, tuple(current.shape))
    check_dtype(op, "counts", counts, (torch.int32,))
    for name, t in (("current", current), ("counts", counts)):
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} is written in place and must be contiguous, got strides "
                             f"{t.stride()}")


def check_segment(op: str, segment: torch.Tensor | None, device: torch.device) -> None:
    """A launcher's optional `segment`: int64 ``[2]`` (start, count) on `device`. Its
    values are not checked (a host read): ``0 <= start`` and ``start + count <= E``."""
    if segment is None:
        return
    check_dtype(op, "segment", segment, (torch.int64,))
    check_shape(op, "segment", segment, (2,))
    if segment.device != device:
        raise ValueError(f"{op}: segment is on {segment.device}, the entries on {device}")
    if segment.stride(0) != 1:
        raise ValueError(f"{op}: segment must be contiguous, got stride {segment.stride(0)}")


def segment_live(segment: torch.Tensor, e: int, device) -> torch.Tensor:
    """bool ``[e]``: entries [start, start + count) of ``segment = (start, count)``."""
    at = torch.arange(e, device=device)
    return (at >= segment[0]) & (at < segment[0] + segment[1])


def segment_arg(segment: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor:
    """A kernel's seg_ptr: the segment, or (SEGMENT=False: never read) `sample`, whose
    dtype is in the cache key already, so no extra variant."""
    return sample if segment is None else segment


def segment_mask(segment: torch.Tensor | None, vals: torch.Tensor, sample: torch.Tensor, src: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The twins' `segment`: (vals, sample, src, live bool ``[E]`` or None). Outside
    entries [start, start + count) the value is 0 and sample and source are 0 (in
    range for any layer); the callers also drop them from `live`-masked counts and
    gradients. Compared on the device, in shapes fixed by E: no host read."""
    if segment is None:
        return vals, sample, src, None
    live = segment_live(segment, vals.shape[0], vals.device)
    return (torch.where(live, vals, vals.new_zeros(())), torch.where(live, sample, 0),
            torch.where(live, src, 0), live)


@jit
def entry_block(seg_ptr, e, BLOCK_E: tl.constexpr, SEGMENT: tl.constexpr, N_LOOP: tl.constexpr):
    """(entry indices, live lanes, trip count of the caller's loop) of this program's
    block of BLOCK_E entries (program axis 0). Without SEGMENT: entries [0, e) and
    N_LOOP, as the kernels were before segments. With SEGMENT: the entries
    [start, start + count) of ``seg_ptr = (start, count)`` (int64, read here: no host
    read); the grid still covers all e entries, so the blocks past the count have no
    live lane and a trip count of 0 (no early ``return``: masked lanes only)."""
    rel = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    if SEGMENT:
        start = tl.load(seg_ptr)
        count = tl.load(seg_ptr + 1)
        es = start + rel
        live = (rel < count) & (es < e)
        n_loop = tl.where(tl.program_id(0) * BLOCK_E < count, N_LOOP, 0)
    else:
        es = rel
        live = rel < e
        n_loop = N_LOOP
    return es, live, n_loop
