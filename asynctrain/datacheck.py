"""Checks of data read from files: a bad file raises `DataFileError` naming the
file (and the sample) and the check that failed, instead of a numpy / tonic / h5py
traceback that names neither."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DataFileError", "check_events", "first_line"]


class DataFileError(ValueError):
    """A data file that cannot be used: the message names the file (and the sample
    index for data sets read per sample) and the check that failed."""


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else "no message"


def check_events(events: Any, sensor: Any, where: str) -> None:
    """Events must be a structured array with t (and x, y, p inside the sensor)."""
    names = getattr(getattr(events, "dtype", None), "names", None)
    if not names or "t" not in names:
        raise DataFileError(f"{where}: expected events with fields x, y, p, t; got "
                            f"{type(events).__name__} {getattr(events, 'dtype', '')}")
    if len(events) == 0:
        return
    t = events["t"]
    if np.issubdtype(t.dtype, np.floating) and not np.isfinite(t).all():
        raise DataFileError(f"{where}: event {int(np.argmax(~np.isfinite(t)))} has a "
                            f"non-finite timestamp")
    if (t < 0).any():
        i = int(np.argmax(t < 0))
        raise DataFileError(f"{where}: event {i} has a negative timestamp {t[i]}")
    if sensor is None:
        return
    for axis, size in zip(("x", "y", "p"), sensor):
        if axis not in names or (axis == "p" and size == 1):
            continue  # one-polarity sensors (SHD) carry p = 1 for every event
        v = events[axis].astype(np.int64)
        bad = (v < 0) | (v >= size)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataFileError(f"{where}: event {i} has {axis}={v[i]}, outside the sensor's "
                                f"0..{size - 1} ({axis} of sensor size {tuple(sensor)})")
