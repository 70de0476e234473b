"""Event data sets (N-MNIST, SHD, DVS Gesture) read with tonic, offline, and framed
into ``[T, F]`` spike counts. `asynctrain.data` re-exports everything public here;
its docstring has the table of data sets and the framing rules.

Offline use: tonic loads a data set without downloading when its archive file exists
(md5 not checked) and enough extracted files are present (`min_files`; tonic wants
10000 `.bin` for N-MNIST and 100 `.npy` for DVS Gesture). Pass a smaller `min_files`
for a partial or test copy. With `download=False` nothing is ever downloaded: missing
data raise FileNotFoundError listing the files expected under `data_dir`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datacheck import DataFileError, check_events, first_line

__all__ = ["EventFramer", "EventFrames", "nmnist", "shd", "dvs_gesture", "timesteps"]

_DOWNLOAD_HINT = "Pass --download (download=True) where internet is available."


# ----------------------------------------------------------------------- framing
def timesteps(dt: float, duration_ms: float) -> int:
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
    T = timesteps(dt, duration_ms)
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

    T = timesteps(dt, duration_ms)
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
    T = timesteps(dt, duration_ms)
    base = __getattr__("_OfflineDVSGesture")(os.fspath(data_dir), train, min_files=min_files,
                                             allow_download=download)
    framer = EventFramer((32, 32, 2), dt, T, spatial_factor=0.25)
    return EventFrames(base, framer, base.classes, base.targets)
