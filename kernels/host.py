"""The one host read of a step loop: the stop test.

On CUDA a value read on the host waits for every queued kernel (a sync). The step
loops (`asynctrain/loop.py`, the fused steps' `forward_batch`) read device values
only here, once per N steps (the per-op loop: `Plan.stop_every`; the fused steps:
once per launch of up to `n_max` steps), so a test can allow exactly these reads and
demand that nothing else in the loop syncs (tests/test_no_sync.py).
"""

from __future__ import annotations

import torch


def read(x: torch.Tensor) -> list | int | float | bool:
    """`x.tolist()`: the stop test's values on the host."""
    return x.tolist()
