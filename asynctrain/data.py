"""Data sets as input frames for the simulator.

Every loader returns a `torch.utils.data.Dataset` whose items are
`(frames [T, F] float32, label int)`: T timesteps of `dt` ms each, F flattened input
features. Event data sets hold spike counts (events of one feature inside one frame
of `dt` ms); CIFAR-10 holds analog input currents in [0, 1]; the digits demo set holds
Bernoulli spikes in {0, 1}. A DataLoader with the default collate gives [B, T, F];
the simulator wants time-major frames, so pass `collate_fn=collate_time_major`, which
returns `(frames [T, B, F], labels [B] int64)`.

| loader        | T (default)          | F    | frame of a feature                     |
|---------------|----------------------|------|----------------------------------------|
| `nmnist`      | 100 ms / 10 ms = 10  | 2312 | (34, 34, 2) sensor                     |
| `shd`         | 1000 ms / 10 ms = 100| 350  | 700 channels, pairs summed             |
| `dvs_gesture` | 1500 ms / 20 ms = 75 | 2048 | (128, 128, 2) sensor, 4x4 blocks summed|
| `cifar10`     | 1                    | 3072 | RGB 32x32 (or [1, 3, 32, 32] unflat)   |
| `digits`      | 16                   | 64   | 8x8 image, rate coded                  |

Flattened feature index of an event at pixel (x, y), polarity p, after downsampling:
`p * H * W + y * W + x` (tonic's frame layout (T, P, H, W)); for SHD, `channel // 2`.
Frame t holds the events with `t * dt <= timestamp < (t + 1) * dt`, timestamps measured
from the start of the recording (not from its first event); events at or after
`duration_ms` are dropped and shorter recordings end in zero frames, so T is fixed.

The event data sets (tonic, offline-capable) live in `asynctrain.events` and are
re-exported here; CIFAR-10 and the digits are read here.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datacheck import DataFileError
from .events import EventFramer, EventFrames, _fix_length, dvs_gesture, nmnist, shd, timesteps  # noqa: F401

__all__ = ["EventFramer", "EventFrames", "TensorFrames", "collate_time_major", "nmnist",
           "shd", "dvs_gesture", "cifar10", "digits", "CIFAR10_FOLDER", "DataFileError", "timesteps"]

CIFAR10_FOLDER = "cifar-10-batches-py"
_DOWNLOAD_HINT = "Pass --download (download=True) where internet is available."


class TensorFrames(Dataset):
    """Frames held in memory as uint8 [N, T, *shape]: items (frames, label).

    An item is `data[i] / divisor` as float32, flattened to [T, F] when `flatten`
    (else [T, *shape]). uint8 storage keeps CIFAR-10 at 150 MB instead of 600 MB.
    `dt` is None: these frames carry no physical time; the caller chooses dt.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor, classes: Sequence,
                 divisor: float = 1.0, flatten: bool = True):
        if data.dtype != torch.uint8 or data.dim() < 3 or len(data) != len(labels):
            raise ValueError(f"data must be uint8 [N, T, ...] with N = len(labels), got "
                             f"{data.dtype} {tuple(data.shape)} and {len(labels)} labels")
        self.data, self.labels = data, labels.to(torch.int64)
        self.divisor, self.flatten = float(divisor), flatten
        self.classes, self.num_classes = list(classes), len(classes)
        self.timesteps, self.num_features = data.shape[1], math.prod(data.shape[2:])
        self.dt = None
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames = self.data[index].to(torch.float32).div_(self.divisor)
        if self.flatten:
            frames = frames.reshape(self.timesteps, -1)
        return frames, int(self.labels[index])


def collate_time_major(batch: Sequence[tuple[torch.Tensor, int]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """[(frames [T, ...], label)] * B -> (frames [T, B, ...] contiguous, labels [B]).

    Stacking along dim 1 builds the time-major batch in one copy; frames[t] is then a
    contiguous [B, F] block, as the simulator reads one timestep at a time.
    """
    shapes = [tuple(f.shape) for f, _ in batch]
    if len(set(shapes)) > 1:
        i = next(i for i, s in enumerate(shapes) if s != shapes[0])
        raise ValueError(f"collate_time_major: sample {i} of the batch has frames of shape {shapes[i]}, "
                         f"sample 0 {shapes[0]}; samples stacked into one batch need the same T "
                         f"and features (crop or pad them to one length, e.g. a fixed duration_ms)")
    frames = torch.stack([f for f, _ in batch], dim=1)
    return frames, torch.tensor([int(y) for _, y in batch], dtype=torch.int64)


# ---------------------------------------------------------------------- CIFAR-10
class _CifarUnpickler(pickle.Unpickler):
    """Unpickling runs code named in the file; allow only what CIFAR pickles hold."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar"}

    def find_class(self, module: str, name: str) -> Any:
        if module == "_codecs" and name == "encode":  # bytes in protocol-2 pickles
            return super().find_class(module, name)
        if module.split(".")[0] == "numpy" and name in self._ALLOWED:
            # Pickles from numpy 1.x name numpy.core, which numpy 2 renamed _core.
            module = module.replace("numpy.core", "numpy._core")
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def _load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except Exception as err:
        raise DataFileError(f"{path}: not a CIFAR-10 python pickle ({err})") from err


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 [N, 3072], labels int64 [N]), validated."""
    batch = _load_pickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DataFileError(f"{path}: expected a dict with 'data' and 'labels', got "
                         f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise DataFileError(f"{path}: 'data' must be uint8 (N, 3072), got {desc}")
    labels = np.asarray(batch["labels"])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataFileError(f"{path}: 'labels' must be {len(data)} ints, got "
                         f"{labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataFileError(f"{path}: labels must lie in 0..9, got "
                         f"{labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def cifar10(data_dir: str | os.PathLike, train: bool = True, download: bool = False,
            flatten: bool = True) -> TensorFrames:
    """CIFAR-10 (Krizhevsky 2009) as one timestep of analog input currents in [0, 1].

    Items: frames [1, 3072] (`flatten`, channel-major R, G, B planes of 32x32) or
    [1, 3, 32, 32]. Reads `<data_dir>/cifar-10-batches-py/` (data_batch_1..5 or
    test_batch, plus batches.meta) directly: torchvision's class md5-checks every
    file, which small or repacked copies fail. `download=True` fetches missing files
    with torchvision first.
    """
    root = Path(data_dir) / CIFAR10_FOLDER
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    expected = [*names, "batches.meta"]
    if download and not all((root / n).is_file() for n in expected):
        from torchvision.datasets import CIFAR10

        CIFAR10(os.fspath(data_dir), train=train, download=True)
    missing = [n for n in expected if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 ({'train' if train else 'test'} split) not found; expected "
            f"under {root}: {', '.join(expected)} (latin1 pickles); "
            f"missing: {', '.join(missing)}. {_DOWNLOAD_HINT}")
    meta = _load_pickle(root / "batches.meta")
    classes = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or len(classes) != 10:
        raise DataFileError(f"{root / 'batches.meta'}: expected 'label_names', 10 names")
    batches = [_read_cifar_batch(root / n) for n in names]
    images = np.concatenate([b[0] for b in batches]).reshape(-1, 1, 3, 32, 32)
    labels = np.concatenate([b[1] for b in batches])
    return TensorFrames(torch.from_numpy(images), torch.from_numpy(labels), classes,
                        divisor=255.0, flatten=flatten)


# ------------------------------------------------------------------------ digits
def digits(train: bool = True, T: int = 16, seed: int = 0, test_fraction: float = 0.25,
           max_rate: float = 1.0) -> TensorFrames:
    """scikit-learn's handwritten digits, rate coded: frames [T, 64] of 0/1 spikes.

    Data: `sklearn.datasets.load_digits()`, 1797 8x8 images with values 0..16 and 10
    classes, a copy of the test set of the UCI "Optical Recognition of Handwritten
    Digits" data set (Alpaydin & Kaynak, 1998; UCI Machine Learning Repository).
    It ships with scikit-learn, so the demo needs no download.

    Pixel j of an image spikes in each frame independently with probability
    `value_j / 16 * max_rate`. All spikes are drawn once for all 1797 images from
    `numpy.random.default_rng(seed)`, so a sample's frames do not depend on `train`;
    the split is stratified by class and seeded with `seed` too. `indices` holds the
    positions of the chosen samples in `load_digits()`.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got T={T!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    if not 0.0 < max_rate <= 1.0:
        raise ValueError(f"max_rate must lie in (0, 1], got {max_rate!r}")
    bunch = load_digits()
    images, labels = bunch.data, bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    p = images[:, None, :] / 16.0 * max_rate
    spikes = (rng.random((len(images), T, 64)) < p).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_fraction, random_state=seed,
        stratify=labels)
    idx = np.sort(train_idx if train else test_idx)
    ds = TensorFrames(torch.from_numpy(spikes[idx]), torch.from_numpy(labels[idx]),
                      classes=list(range(10)))
    ds.indices = idx
    return ds
