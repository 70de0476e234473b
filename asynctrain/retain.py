"""Storage for the small tensors a pass keeps per forward step, so that they do not
fragment the CPU heap.

On CPU, glibc serves the big transient tensors of a step (``[B, N + 1]``: 7.4 MB for
VGG-7 at B = 8) from its heap once its dynamic mmap threshold has risen. A small
tensor allocated in the loop and kept (a step's [B, K] record) lands in the hole a
freed big tensor left and splits it, so the next big tensor no longer fits and the
heap grows: measured +8 MB of resident memory per kept [8, 8] tensor with 232k-wide
steps, +19 MB per VGG-7 forward step at K = 8, B = 8 (a 17,000-step pass ran out of
24 GB). Copies into a few preallocated chunks keep those holes whole (resident
memory flat over 1000 steps in the same test). CUDA's caching allocator keeps small
and large blocks in separate pools, so this only matters on CPU, but it costs one
tiny copy per kept tensor anywhere.
"""

from __future__ import annotations

import torch


class ChunkStore:
    """Keeps copies of same-shaped small tensors in chunks of `per_chunk` rows;
    `keep(x)` returns a view of the copy."""

    def __init__(self, per_chunk: int = 256):
        self.per_chunk = per_chunk
        self._open: dict[tuple, list] = {}  # (dtype, device, shape) -> [chunk, next row]

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device, tuple(x.shape))
        slot = self._open.get(key)
        if slot is None or slot[1] == self.per_chunk:
            slot = [torch.empty((self.per_chunk, *x.shape), dtype=x.dtype, device=x.device), 0]
            self._open[key] = slot
        out = slot[0][slot[1]]
        out.copy_(x)
        slot[1] += 1
        return out


class FlatStore:
    """Keeps copies of 1-D tensors of varying length in large flat chunks (one chunk
    list per dtype); a chunk holds at least `min_chunk` elements."""

    def __init__(self, min_chunk: int = 1 << 22):
        self.min_chunk = min_chunk
        self._open: dict[tuple, list] = {}  # (dtype, device) -> [chunk, used]

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        out = self.empty(x.numel(), x.dtype, x.device)
        out.copy_(x.reshape(-1))
        return out

    def empty(self, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        """`n` uninitialised elements of a chunk, for a kernel to write (no copy)."""
        key = (dtype, torch.device(device))
        slot = self._open.get(key)
        if slot is None or slot[1] + n > slot[0].numel():
            slot = [torch.empty(max(self.min_chunk, n), dtype=dtype, device=device), 0]
            self._open[key] = slot
        out = slot[0][slot[1]:slot[1] + n]
        slot[1] += n
        return out


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class RecordStores:
    """Where a segment's recompute copies what its step records keep: conv networks
    into chunks (`small`: same-shaped [B, K] tensors; `flat`: 1-D receiver lists),
    other networks keep the step's own tensors."""

    def __init__(self, chunked: bool):
        self.small = ChunkStore().keep if chunked else identity
        flat = FlatStore() if chunked else None
        self.flat = flat.keep if chunked else identity
        # (n, dtype, device) -> n uninitialised elements for a kernel to write a record into
        self.flat_empty = flat.empty if chunked else \
            (lambda n, dtype, device: torch.empty(n, dtype=dtype, device=device))
