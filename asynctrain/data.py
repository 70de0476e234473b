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

Offline use: tonic loads a data set without downloading when its archive file exists
(md5 not checked) and enough extracted files are present (`min_files`; tonic wants
10000 `.bin` for N-MNIST and 100 `.npy` for DVS Gesture). Pass a smaller `min_files`
for a partial or test copy. With `download=False` nothing is ever downloaded: missing
data raise FileNotFoundError listing the files expected under `data_dir`.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datacheck import DataFileError, check_events, first_line

__all__ = ["EventFramer", "EventFrames", "TensorFrames", "collate_time_major", "nmnist",
           "shd", "dvs_gesture", "cifar10", "digits", "CIFAR10_FOLDER", "DataFileError"]

CIFAR10_FOLDER = "cifar-10-batches-py"
_DOWNLOAD_HINT = "Pass --download (download=True) where internet is available."




# ----------------------------------------------------------------------- framing
def _timesteps(dt: float, duration_ms: float) -> int:
    """T = duration_ms / dt, which must be a whole number >= 1."""
    for name, value in (("dt", dt), ("duration_ms", duration_ms)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number of ms > 0, got {name}={value!r}")
    if duration_ms < dt:
        raise ValueError(f"duration_ms={duration_ms} must be >= dt={dt} (one frame)")
    steps = duration_ms / dt
    T = round(steps)
    if abs(steps - T) > 1e-9 * steps:
        raise ValueError(
            f"duration_ms={duration_ms} is not a whole number of dt={dt} ms frames")
    return T


@dataclass(frozen=True)
class EventFramer:
    """Events (tonic structured array, timestamps in us) -> frames [T, F] float32.

    Attributes:
        sensor_size: (W, H, P) after downsampling, tonic's order; F = W * H * P.
        dt: frame length in ms.
        timesteps: T; the frames cover [0, T * dt) ms of the recording.
        spatial_factor: tonic `Downsample` factor applied to x (and y) first;
            coordinates are truncated, so 0.25 sums 4x4 pixel blocks.
    """

    sensor_size: tuple[int, int, int]
    dt: float
    timesteps: int
    spatial_factor: float = 1.0

    @property
    def num_features(self) -> int:
        return math.prod(self.sensor_size)

    def __call__(self, events: np.ndarray) -> torch.Tensor:
        from tonic.transforms import Downsample, ToFrame

        T, window_us = self.timesteps, self.dt * 1000.0
        t = events["t"]
        events = events[(t >= 0) & (t < T * window_us)]  # boolean index: a copy
        # tonic slices with searchsorted, which silently misbins unsorted timestamps.
        if len(events) > 1 and np.any(np.diff(events["t"]) < 0):
            events = events[np.argsort(events["t"], kind="stable")]
        if self.spatial_factor != 1.0:
            events = Downsample(spatial_factor=self.spatial_factor)(events)
        if len(events) == 0:  # tonic returns one frame of its own shape here
            return torch.zeros(T, self.num_features)
        # start_time=0: frames count from the recording's start, not its first event.
        # tonic makes floor((end - start) / window) frames; the extra half window keeps
        # a rounding error in T * window from losing the last frame.
        frames = ToFrame(sensor_size=self.sensor_size, time_window=window_us,
                         start_time=0.0, end_time=(T + 0.5) * window_us)(events)
        frames = torch.from_numpy(frames.reshape(len(frames), -1).astype(np.float32))
        return _fix_length(frames, T)


def _fix_length(frames: torch.Tensor, T: int) -> torch.Tensor:
    """Crop, or pad with zero frames at the end, to exactly T frames so batches stack."""
    if len(frames) >= T:
        return frames[:T]
    return torch.cat([frames, frames.new_zeros(T - len(frames), *frames.shape[1:])])


# ---------------------------------------------------------------------- datasets
class EventFrames(Dataset):
    """An event data set (tonic) framed on access: items (frames [T, F], label).

    Attributes: `events` (the tonic data set), `framer`, `timesteps` (T),
    `num_features` (F), `dt` (ms), `classes`, `num_classes`, `targets` (labels).
    """

    def __init__(self, events: Any, framer: EventFramer, classes: Sequence,
                 targets: Sequence[int]):
        self.events, self.framer = events, framer
        self.classes, self.targets = list(classes), [int(y) for y in targets]
        self.timesteps, self.num_features = framer.timesteps, framer.num_features
        self.dt, self.num_classes = framer.dt, len(self.classes)

    def __len__(self) -> int:
        # Cached: tonic's SHD reopens its HDF5 file for every len().
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        where = self.where(index)
        try:
            events, label = self.events[index]
        except DataFileError as err:
            raise DataFileError(f"{where}: {err}") from err
        except Exception as err:  # noqa: BLE001 - tonic / numpy / h5py raise many kinds
            raise DataFileError(f"{where}: unreadable ({type(err).__name__}: "
                                f"{first_line(err)})") from err
        check_events(events, getattr(self.events, "sensor_size", None), where)
        if not 0 <= int(label) < self.num_classes:
            raise DataFileError(f"{where}: label {int(label)} outside 0..{self.num_classes - 1}")
        return self.framer(events), int(label)

    def where(self, index: int) -> str:
        """The file (and sample) behind item `index`, for error messages."""
        files = getattr(self.events, "data", None)
        if isinstance(files, list) and 0 <= index < len(files) and isinstance(files[index], str):
            return f"{files[index]} (sample {index})"
        loc = getattr(self.events, "location_on_system", None)
        name = getattr(self.events, "data_filename", None)
        if loc and name:
            return f"{os.path.join(loc, name)}, sample {index}"
        return f"{type(self.events).__name__} sample {index}"


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


# ------------------------------------------------------- tonic, offline-capable
def _build_tonic_classes() -> dict[str, type]:
    import tonic.datasets as td

    class _Offline:
        """Mixin: never downloads unless allowed; optional smaller `min_files`."""

        _ext, _layout, _pretty = "", "", ""

        def __init__(self, save_to: str, train: bool = True, *,
                     min_files: int | None = None, allow_download: bool = False):
            if min_files is not None and (not isinstance(min_files, int) or min_files < 1):
                raise ValueError(f"min_files must be None or an int >= 1, got {min_files!r}")
            self._split, self._min_files = ("train" if train else "test"), min_files
            self._allow_download = allow_download
            super().__init__(save_to, train=train)

        def _check_exists(self) -> bool:
            if self._min_files is None:
                return super()._check_exists()
            return self._is_file_present() and \
                self._folder_contains_at_least_n_files_of_type(self._min_files, self._ext)

        def download(self) -> None:
            if self._allow_download:
                return super().download()
            raise FileNotFoundError(self._missing_message())

        def _expected_extracted(self, root: Path) -> list[str]:
            need = self._min_files or self._tonic_min_files
            found = len(list(Path(root, self.folder_name).glob(f"**/*{self._ext}")))
            return [f"  {root / self.folder_name}/{self._layout}  "
                    f"[at least {need} files, found {found}; a smaller copy: min_files=N]"]

        def _missing_message(self) -> str:
            root = Path(self.location_on_system)
            archive = root / self.filename
            return "\n".join([
                f"{self._pretty} ({self._split} split) not found; expected under {root}:",
                f"  {archive}  [{'present' if archive.is_file() else 'missing'}; "
                "archive or an empty placeholder, md5 not checked]",
                *self._expected_extracted(root), _DOWNLOAD_HINT])

    class _OfflineNMNIST(_Offline, td.NMNIST):
        _ext, _layout, _pretty, _tonic_min_files = ".bin", "<digit>/<id>.bin", "N-MNIST", 10000

        def __getitem__(self, index: int) -> Any:
            size = os.path.getsize(self.data[index])
            if size % 5:
                raise DataFileError(f"{size} bytes, not a whole number of 5-byte events "
                                    f"(truncated?)")
            return super().__getitem__(index)

    class _OfflineDVSGesture(_Offline, td.DVSGesture):
        _ext, _layout, _pretty = ".npy", "userNN_<lighting>/<label>.npy", "DVS Gesture"
        _tonic_min_files = 100

        def __getitem__(self, index: int) -> Any:
            try:
                arr = np.load(self.data[index], allow_pickle=False, mmap_mode="r")
            except Exception as err:  # noqa: BLE001 - numpy raises many kinds
                raise DataFileError(f"not a numpy .npy array ({first_line(err)})") from err
            if arr.ndim != 2 or arr.shape[1] != 4:
                raise DataFileError(f"array of shape {arr.shape}, expected (N, 4) columns "
                                    f"x, y, p, t")
            return super().__getitem__(index)

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # tonic walks the user folders and files in file-system order; sort them
            # so sample i is the same recording on every machine.
            order = sorted(range(len(self.data)), key=lambda i: (
                self.users[i], self.lighting[i], self.targets[i], self.data[i]))
            for name in ("data", "targets", "users", "lighting"):
                values = getattr(self, name)
                setattr(self, name, [values[i] for i in order])

    class _OfflineSHD(_Offline, td.SHD):
        _pretty = "SHD"

        def _check_exists(self) -> bool:
            # tonic accepts any .h5 in the folder (e.g. only shd_test.h5 for train).
            return self._is_file_present() and os.path.isfile(
                os.path.join(self.location_on_system, self.data_filename))

        def _expected_extracted(self, root: Path) -> list[str]:
            path = root / self.filename[:-len(".zip")]
            return [f"  {path}  [{'present' if path.is_file() else 'missing'}]"]

    classes = {c.__name__: c for c in (_OfflineNMNIST, _OfflineDVSGesture, _OfflineSHD)}
    for attr, cls in classes.items():
        # tonic reads <save_to>/<class __name__>/, so keep tonic's name; pickle
        # (DataLoader workers under spawn) finds the class by __qualname__ through
        # the module __getattr__ below.
        cls.__name__ = cls.__mro__[2].__name__
        cls.__qualname__ = attr
    return classes


_TONIC_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """Builds the tonic subclasses on first use: importing tonic is not free."""
    if name in ("_OfflineNMNIST", "_OfflineDVSGesture", "_OfflineSHD"):
        if not _TONIC_CLASSES:
            _TONIC_CLASSES.update(_build_tonic_classes())
        return _TONIC_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nmnist(data_dir: str | os.PathLike, train: bool = True, dt: float = 10.0,
           duration_ms: float = 100.0, download: bool = False,
           min_files: int | None = None) -> EventFrames:
    """N-MNIST (Orchard et al. 2015) via tonic: frames [T, 2312] of spike counts.

    The paper uses only the first 100 ms (the first of three saccades): T = 10 at
    dt = 10 ms. Features: p * 1156 + y * 34 + x. Files: `<data_dir>/NMNIST/train.zip`
    + `NMNIST/Train/<digit>/<id>.bin` (test: `test.zip`, `Test/`).
    """
    T = _timesteps(dt, duration_ms)
    base = __getattr__("_OfflineNMNIST")(os.fspath(data_dir), train, min_files=min_files,
                                         allow_download=download)
    return EventFrames(base, EventFramer((34, 34, 2), dt, T), base.classes, base.targets)


def shd(data_dir: str | os.PathLike, train: bool = True, dt: float = 10.0,
        duration_ms: float = 1000.0, download: bool = False) -> EventFrames:
    """Spiking Heidelberg Digits (Cramer et al. 2020) via tonic: frames [T, 350].

    The 700 cochlea channels are downsampled to 350 as in the paper (channels 2k and
    2k + 1 sum into feature k). Files: `<data_dir>/SHD/shd_train.h5.zip` +
    `SHD/shd_train.h5` (test: `shd_test.*`).
    """
    import h5py

    T = _timesteps(dt, duration_ms)
    try:
        base = __getattr__("_OfflineSHD")(os.fspath(data_dir), train, allow_download=download)
    except OSError as err:  # tonic opens the HDF5 file in its constructor
        if isinstance(err, FileNotFoundError):
            raise
        name = f"shd_{'train' if train else 'test'}.h5"
        raise DataFileError(f"{Path(data_dir, 'SHD', name)}: not a readable HDF5 file "
                            f"(truncated or corrupt?): {first_line(err)}") from err
    path = os.path.join(base.location_on_system, base.data_filename)
    try:
        with h5py.File(path, "r") as f:
            targets = f["labels"][()].astype(np.int64)
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["extra/keys"][()]]
            n_times, n_units = len(f["spikes/times"]), len(f["spikes/units"])
    except (OSError, KeyError) as err:
        raise DataFileError(f"{path}: not a readable SHD HDF5 file (needs spikes/times, "
                            f"spikes/units, labels, extra/keys): {first_line(err)}") from err
    if not len(targets) == n_times == n_units:
        raise DataFileError(f"{path}: {len(targets)} labels but {n_times} spike-time and "
                            f"{n_units} unit lists")
    framer = EventFramer((350, 1, 1), dt, T, spatial_factor=0.5)
    return EventFrames(base, framer, keys, targets)


def dvs_gesture(data_dir: str | os.PathLike, train: bool = True, dt: float = 20.0,
                duration_ms: float = 1500.0, download: bool = False,
                min_files: int | None = None) -> EventFrames:
    """IBM DVS Gesture (Amir et al. 2017) via tonic: frames [T, 2048], 11 classes.

    The 128x128 sensor is downsampled to 32x32 (4x4 pixel blocks summed) as in the
    paper: features p * 1024 + (y // 4) * 32 + x // 4. The paper does not state how
    much of each (~6 s) recording it used; the default keeps the first 1.5 s (T = 75).
    Samples are sorted by (user, lighting, label) so their order is deterministic.
    Files: `<data_dir>/DVSGesture/ibmGestureTrain.tar.gz` +
    `DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy` (test: `ibmGestureTest`).
    """
    T = _timesteps(dt, duration_ms)
    base = __getattr__("_OfflineDVSGesture")(os.fspath(data_dir), train, min_files=min_files,
                                             allow_download=download)
    framer = EventFramer((32, 32, 2), dt, T, spatial_factor=0.25)
    return EventFrames(base, framer, base.classes, base.targets)


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
