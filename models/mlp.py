"""The paper's multilayer perceptrons (table 6) by name, and custom ones, as plain
``nn.Sequential`` of bias-free ``nn.Linear`` (neurons follow every layer when run by
`AsyncSNN`; the same module runs layered).

| name          | inputs                              | hidden    | outputs |
|---------------|-------------------------------------|-----------|---------|
| `nmnist`      | 2312 (34 x 34 x 2)                  | 64 x 3    | 10      |
| `shd`         | 350 (700 channels, pairs summed)    | 128 x 3   | 20      |
| `dvs_gesture` | 2048 (32 x 32 x 2 after 4x4 blocks) | 128 x 3   | 11      |

Inputs match the loaders of `asynctrain.data`. Initialisation is PyTorch's default.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

PAPER_MLPS = {
    "nmnist": (2312, (64, 64, 64), 10),
    "shd": (350, (128, 128, 128), 20),
    "dvs_gesture": (2048, (128, 128, 128), 11),
}


def mlp(name: str | None = None, *, sizes: Sequence[int] | None = None) -> nn.Sequential:
    """``mlp("shd")`` -> 350-128-128-128-20; ``mlp(sizes=[64, 32, 32, 10])`` -> custom
    (inputs first, outputs last, at least one weight layer)."""
    if (name is None) == (sizes is None):
        raise ValueError("give exactly one of a paper model name "
                         f"({', '.join(PAPER_MLPS)}) or sizes=[n_in, ..., n_out]")
    if name is not None:
        if name not in PAPER_MLPS:
            raise ValueError(f"unknown model {name!r}; paper models: {', '.join(PAPER_MLPS)} "
                             f"(or pass sizes=[...])")
        n_in, hidden, n_out = PAPER_MLPS[name]
        sizes = [n_in, *hidden, n_out]
    sizes = list(sizes)
    if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be >= 2 ints >= 1 (inputs, ..., outputs), got {sizes}")
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])])
