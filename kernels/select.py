"""Select: per sample, the K pending outboxes with the highest key (SPEC 5.1, 6).

Ties go to the lower flat index (SPEC 6: MS with zero noise is deterministic).
`torch.topk` does not break ties by index, so the key is packed into one int64:
the float32 key mapped to an order-preserving int32 in the high half, the reversed
column index in the low half. One topk over [B, N + 1] per step: O(N) per sample,
never a sort of the whole network.

The Triton kernel comes with the kernels issue; `select_torch` is the twin it will
be checked against.
"""

from __future__ import annotations

import torch

_INT64_MIN = torch.iinfo(torch.int64).min


def sortable_key(keys: torch.Tensor) -> torch.Tensor:
    """float32 keys -> int64 with the same order (negative floats flip their bits)."""
    bits = keys.to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def select_torch(pending: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of up to `k` pending entries per row, highest key first in rank.

    Args:
        pending: bool ``[B, W]``; the last column is the dump and is never pending.
        keys: float32 ``[B, W]`` priorities (no NaN; ``inf`` allowed).
        k: forward group size K >= 1.

    Returns:
        int64 ``[B, min(k, W)]`` flat indices; slots beyond the number of pending
        entries hold the dump index ``W - 1``. Order within a row is unspecified.
    """
    width = keys.shape[1]
    cols = torch.arange(width, device=keys.device, dtype=torch.int64)
    packed = (sortable_key(keys) << 32) | (width - 1 - cols)
    packed = packed.masked_fill(~pending, _INT64_MIN)
    top, idx = packed.topk(min(k, width), dim=1, sorted=False)
    return torch.where(top != _INT64_MIN, idx, width - 1)
