"""Classification tasks generated offline by code, for studying unlayered training
beyond one data set. Every task has fixed train / validation / test splits, fixed
seeds and the time-major frames of `asynctrain.data` (items ``(frames [T, F], label)``
as `data.TensorFrames`; a DataLoader with ``collate_fn=data.collate_time_major``
gives ``[T, B, F]``):

    from asynctrain import tasks
    task = tasks.get("order")
    train, val = task.split("train"), task.split("val")   # choose settings on these
    test = task.split("test")                             # read once, at the end
    task.n_inputs, task.n_classes, task.timesteps, task.dt, task.tau, task.hidden

| task       | kind                                         | F   | classes | T  | tau / dt   | chance |
|------------|----------------------------------------------|-----|---------|----|------------|--------|
| `digits`   | rate-coded 8x8 images (scikit-learn)         | 64  | 10      | 8  | 1 / 10 ms  | 0.10   |
| `rates`    | many classes, rate code, noise, distractors  | 96  | 20      | 8  | 1 / 10 ms  | 0.05   |
| `order`    | temporal order of two symbols (memory)       | 40  | 9       | 10 | 30 / 10 ms | 0.11   |
| `manifold` | one spike per channel, timing on a manifold  | 100 | 10      | 10 | 10 / 10 ms | 0.10   |

- **rates**: each class has two random rate prototypes over 64 channels; a sample
  takes one of them, scales it by a random gain and adds rate noise; 32 distractor
  channels fire at a random rate unrelated to the class. Bernoulli frames.
- **order**: three symbols (disjoint groups of 10 channels) on a background of noise;
  symbol s1 is shown in one frame, symbol s2 in a later one (1-3 frames later);
  the class is (s1, s2), 9 classes. Without memory across timesteps the frames of
  (a, b) and (b, a) are the same multiset, so a model whose timesteps are
  independent (tau << dt) is capped at 6/9 = 0.667; tau = 30 ms (a decay of 0.72
  per 10 ms frame) carries a symbol's trace to the next one.
- **manifold**: each class is a random smooth 2-d manifold in a 100-d space (as
  Zenke and Vogels' "Randman"); a sample is a random point of it, coded as one
  spike per channel at the frame ``floor(value * T)``, 10 % of spikes deleted and
  10 % moved by one frame. Every channel fires once in every sample of every class:
  the rate says nothing, only the timing does.

`manifold` is the **held-out** task (`Task.held_out`): it was not used for any
tuning decision of docs/unlayered_training.md ("Round 3"), and it is only run at
the very end. `digits` wraps `data.digits(T=8)`: its validation split is the 300
samples of the training split that earlier studies held out (seed 0), its test
split the data set's own.

Sizes: 2400 training, 600 validation and 1000 test samples (digits: 1047 / 300 /
450); classes are balanced in every split (counts differ by at most one). The
splits are drawn from separate random streams of the task's seed, and the task's
"world" (prototypes, symbols, manifolds) from another, so the test split does not
depend on the other splits' sizes. Generated in well under a second and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import TensorFrames

__all__ = ["Task", "TASKS", "SPLITS", "get", "names", "tuning_names"]

SPLITS = ("train", "val", "test")
Generator = Callable[[np.random.Generator, np.random.Generator, int, int],
                     tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Task:
    """One task: its data, the physical time of its frames and the network it is for.

    Attributes:
        name, description: the registry key and one line of what it tests.
        n_inputs, n_classes, timesteps: F, the number of classes, T.
        dt, tau: frame length and the membrane time constant the task is meant for
            (ms); `theta`: the firing threshold used with it (0.3: the demo's).
        hidden: hidden layer sizes of the network the task is sized for.
        sizes: samples in (train, val, test).
        held_out: kept out of every tuning decision (only run at the very end).
        seed: root of the task's random streams (world and one per split).
    """

    name: str
    description: str
    n_inputs: int
    n_classes: int
    timesteps: int
    dt: float
    tau: float
    hidden: tuple[int, ...]
    sizes: tuple[int, int, int]
    make: Generator | None = None
    theta: float = 0.3
    held_out: bool = False
    seed: int = 0

    def split(self, split: str) -> TensorFrames:
        """The `split` ("train", "val" or "test") as `TensorFrames`: items
        ``(frames [T, F] float32 in {0, 1}, label)``; ``.dt`` is the task's dt."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return _split(self.name, split)

    @property
    def chance(self) -> float:
        return 1.0 / self.n_classes


# ------------------------------------------------------------------ generators
def _labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """`n` labels, each class n // C or n // C + 1 times, in random order."""
    return rng.permutation(np.arange(n) % n_classes).astype(np.int64)


def _bernoulli(rng: np.random.Generator, rates: np.ndarray, T: int) -> np.ndarray:
    """rates [N, F] in [0, 1] -> spikes uint8 [N, T, F], independent per frame."""
    return (rng.random((len(rates), T, rates.shape[1])) < rates[:, None, :]).astype(np.uint8)


def _rates(world: np.random.Generator, rng: np.random.Generator, n: int, T: int
           ) -> tuple[np.ndarray, np.ndarray]:
    C, informative, distractors, prototypes = 20, 64, 32, 2
    # skewed to low rates (mean ~0.14): most channels of a class are quiet, a few loud
    protos = 0.55 * world.beta(0.6, 1.8, size=(C, prototypes, informative))
    y = _labels(rng, n, C)
    k = rng.integers(0, prototypes, size=n)
    gain = rng.uniform(0.6, 1.4, size=(n, 1))
    info = protos[y, k] * gain + rng.normal(0.0, 0.06, size=(n, informative))
    dist = rng.uniform(0.0, 0.4, size=(n, distractors))  # unrelated to the class
    rates = np.clip(np.concatenate([info, dist], axis=1) + 0.01, 0.0, 1.0)
    return _bernoulli(rng, rates, T), y


def _order(world: np.random.Generator, rng: np.random.Generator, n: int, T: int
           ) -> tuple[np.ndarray, np.ndarray]:
    S, width, F = 3, 10, 40
    groups = world.permutation(F)[:S * width].reshape(S, width)  # disjoint symbol channels
    y = _labels(rng, n, S * S)
    s1, s2 = y // S, y % S
    t1 = rng.integers(0, T - 6, size=n)
    t2 = t1 + rng.integers(1, 4, size=n)  # 1..3 frames later
    rates = np.full((n, T, F), 0.04)  # background noise on every channel
    rows = np.arange(n)[:, None]
    rates[rows, t1[:, None], groups[s1]] = 0.7
    rates[rows, t2[:, None], groups[s2]] = 0.7
    spikes = (rng.random((n, T, F)) < rates).astype(np.uint8)
    return spikes, y


def _manifold(world: np.random.Generator, rng: np.random.Generator, n: int, T: int
              ) -> tuple[np.ndarray, np.ndarray]:
    C, F, D, freqs, alpha = 10, 100, 2, 4, 2.0
    # per class, channel and manifold dimension: a random Fourier series of `freqs`
    # terms with 1/k^alpha amplitudes (smooth); a channel's value is their sum
    amp = world.uniform(0.0, 1.0, size=(C, F, D, freqs)) / np.arange(1, freqs + 1) ** alpha
    phase = world.uniform(0.0, 1.0, size=(C, F, D, freqs))

    def embed(c: np.ndarray, theta: np.ndarray) -> np.ndarray:  # [N], [N, D] -> [N, F]
        k = np.arange(1, freqs + 1)
        arg = 2 * np.pi * (k * theta[:, None, :, None] + phase[c])  # [N, F, D, freqs]
        return (amp[c] * np.sin(arg)).sum(axis=(2, 3))

    # min-max of each class's channel over a fixed grid of the manifold -> [0, 1]
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, 33)] * D), -1).reshape(-1, D)
    lo = np.stack([embed(np.full(len(grid), c), grid).min(0) for c in range(C)])
    hi = np.stack([embed(np.full(len(grid), c), grid).max(0) for c in range(C)])
    y = _labels(rng, n, C)
    v = (embed(y, rng.random((n, D))) - lo[y]) / (hi[y] - lo[y])
    t = np.clip(np.floor(v * T), 0, T - 1).astype(np.int64)  # [N, F]
    jitter = rng.random((n, F)) < 0.1
    t = np.clip(t + jitter * rng.choice([-1, 1], size=(n, F)), 0, T - 1)
    keep = rng.random((n, F)) >= 0.1
    spikes = np.zeros((n, T, F), np.uint8)
    rows, cols = np.nonzero(keep)
    spikes[rows, t[rows, cols], cols] = 1
    return spikes, y


# -------------------------------------------------------------------- registry
_SIZES = (2400, 600, 1000)
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", "scikit-learn's 8x8 digits, rate coded (the demo's data)", 64, 10, 8,
         dt=10.0, tau=1.0, hidden=(32, 32, 32), sizes=(1047, 300, 450)),
    Task("rates", "20 classes, rate code with gain and rate noise, 32 distractor channels",
         96, 20, 8, dt=10.0, tau=1.0, hidden=(64, 64, 64), sizes=_SIZES, make=_rates, seed=1),
    Task("order", "temporal order of two symbols: needs memory across timesteps", 40, 9, 10,
         dt=10.0, tau=30.0, hidden=(64, 64, 64), sizes=_SIZES, make=_order, seed=2),
    Task("manifold", "one spike per channel, timing on random smooth manifolds (held out)",
         100, 10, 10, dt=10.0, tau=10.0, hidden=(64, 64, 64), sizes=_SIZES, make=_manifold,
         held_out=True, seed=3),
)}


def names() -> list[str]:
    return list(TASKS)


def tuning_names() -> list[str]:
    """The tasks settings may be chosen on (every task but the held-out one)."""
    return [n for n, t in TASKS.items() if not t.held_out]


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


@functools.lru_cache(maxsize=None)
def _split(name: str, split: str) -> TensorFrames:
    task = TASKS[name]
    if task.make is None:
        ds = _digits_split(split)
    else:
        i = SPLITS.index(split)
        world = np.random.default_rng([task.seed, 0])
        rng = np.random.default_rng([task.seed, 1 + i])
        spikes, labels = task.make(world, rng, task.sizes[i], task.timesteps)
        ds = TensorFrames(torch.from_numpy(spikes), torch.from_numpy(labels),
                          classes=list(range(task.n_classes)))
    ds.dt = task.dt
    return ds


def _digits_split(split: str) -> TensorFrames:
    from .data import digits

    if split == "test":
        return digits(train=False, T=8, seed=0)
    full = digits(train=True, T=8, seed=0)
    n_val = TASKS["digits"].sizes[1]
    perm = np.random.default_rng(0).permutation(len(full))  # the earlier studies' split
    idx = np.sort(perm[n_val:] if split == "train" else perm[:n_val])
    ds = TensorFrames(full.data[idx], full.labels[idx], classes=full.classes)
    ds.indices = full.indices[idx]
    return ds
