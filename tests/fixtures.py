"""Tiny, format-faithful copies of the data sets, written into a temporary folder, and
`load_recipe` (a recipe script imported as a module).

Each writer produces the files tonic 1.7.0 (or the CIFAR-10 reader) looks for, in the
byte format of the real releases, so the loaders run their real code paths offline:

- N-MNIST: `NMNIST/Train/<digit>/<id>.bin`, 5 bytes per event (x, y, polarity bit 7
  + timestamp bits 22-16, timestamp bits 15-8, bits 7-0; timestamps in us), plus an
  empty `NMNIST/train.zip` (tonic only checks that the archive exists).
- SHD: `SHD/shd_train.h5` with `spikes/times` (vlen float16, seconds),
  `spikes/units` (vlen uint16, 0..699), `labels`, `extra/keys`, `extra/speaker`,
  plus an empty `SHD/shd_train.h5.zip`.
- DVS Gesture: `DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy`, (N, 4)
  int64 columns x, y, p, t (ms; tonic multiplies by 1000), plus an empty
  `DVSGesture/ibmGestureTrain.tar.gz`.
- CIFAR-10: `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`,
  protocol-2 pickles of {'batch_label', 'labels', 'data' uint8 (N, 3072), 'filenames'}.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Event = tuple[int, int, int, int]  # (x, y, p, t) in the data set's own time unit

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str, alias: str | None = None):
    """``recipes/<name>.py`` imported as a fresh module (recipes/ is not a package);
    `alias`: its module name, when one test needs two independent copies."""
    spec = importlib.util.spec_from_file_location(alias or f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_nmnist(root: Path, samples: Sequence[tuple[int, Iterable[Event]]],
                 train: bool = True) -> list[Path]:
    """samples: (digit, events (x, y, p, t_us)); returns the .bin paths in order."""
    base = Path(root, "NMNIST")
    base.mkdir(parents=True, exist_ok=True)
    Path(base, "train.zip" if train else "test.zip").touch()
    paths = []
    for i, (digit, events) in enumerate(samples):
        raw = bytearray()
        for x, y, p, t in events:
            # tonic treats y == 240 as a timestamp-overflow marker, not an event.
            assert 0 <= x < 256 and 0 <= y < 240 and p in (0, 1) and 0 <= t < 2**23
            raw += bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])
        path = Path(base, "Train" if train else "Test", str(digit), f"{i:05d}.bin")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(raw))
        paths.append(path)
    return paths


SHD_KEYS = [f"english-{w}" for w in ("zero", "one", "two", "three", "four", "five",
                                     "six", "seven", "eight", "nine")] + \
           [f"german-{w}" for w in ("null", "eins", "zwei", "drei", "vier", "fuenf",
                                    "sechs", "sieben", "acht", "neun")]


def write_shd(root: Path, samples: Sequence[tuple[int, Sequence[float], Sequence[int]]],
              train: bool = True) -> Path:
    """samples: (label 0..19, spike times in s, units 0..699); returns the .h5 path."""
    import h5py

    base = Path(root, "SHD")
    base.mkdir(parents=True, exist_ok=True)
    name = "shd_train.h5" if train else "shd_test.h5"
    Path(base, name + ".zip").touch()
    path = Path(base, name)
    with h5py.File(path, "w") as f:
        times = f.create_dataset("spikes/times", (len(samples),),
                                 dtype=h5py.vlen_dtype(np.float16))
        units = f.create_dataset("spikes/units", (len(samples),),
                                 dtype=h5py.vlen_dtype(np.uint16))
        for i, (_, t, u) in enumerate(samples):
            assert len(t) == len(u)
            times[i] = np.asarray(t, dtype=np.float16)
            units[i] = np.asarray(u, dtype=np.uint16)
        f["labels"] = np.array([s[0] for s in samples], dtype=np.uint16)
        f["extra/keys"] = np.array([k.encode() for k in SHD_KEYS])
        f["extra/speaker"] = np.arange(len(samples), dtype=np.uint16) % 10
    return path


def write_dvs_gesture(root: Path,
                      samples: Sequence[tuple[int, str, int, Iterable[Event]]],
                      train: bool = True) -> list[Path]:
    """samples: (user, lighting, label 0..10, events (x, y, p, t_ms)); returns paths."""
    base = Path(root, "DVSGesture")
    base.mkdir(parents=True, exist_ok=True)
    split = "ibmGestureTrain" if train else "ibmGestureTest"
    Path(base, split + ".tar.gz").touch()
    paths = []
    for user, lighting, label, events in samples:
        path = Path(base, split, f"user{user:02d}_{lighting}", f"{label}.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(list(events), dtype=np.int64).reshape(-1, 4))
        paths.append(path)
    return paths


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
               "horse", "ship", "truck"]


def write_cifar10(root: Path, n_per_batch: int = 3, seed: int = 0
                  ) -> dict[str, tuple[np.ndarray, list[int]]]:
    """All six batches of random images; returns {file name: (data, labels)}."""
    base = Path(root, "cifar-10-batches-py")
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        write_cifar_pickle(base / name, {
            "batch_label": name, "labels": labels, "data": data,
            "filenames": [f"img_{name}_{j}.png" for j in range(n_per_batch)]})
        written[name] = (data, labels)
    write_cifar_pickle(base / "batches.meta", {
        "label_names": CIFAR_NAMES, "num_cases_per_batch": n_per_batch, "num_vis": 3072})
    return written


def write_cifar_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
