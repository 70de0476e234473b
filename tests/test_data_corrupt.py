"""Corrupt data files: every error names the file, the sample and the check that
failed (tiny corrupt fixtures written in the real formats, `tests/fixtures.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from asynctrain import data
from asynctrain.data import DataFileError
from fixtures import write_cifar10, write_dvs_gesture, write_nmnist, write_shd


def test_nmnist_event_outside_the_sensor(tmp_path):
    paths = write_nmnist(tmp_path, [(0, [(1, 2, 0, 1000)]), (3, [(200, 2, 0, 1000)])])
    ds = data.nmnist(tmp_path, min_files=1)
    ds[0]
    with pytest.raises(DataFileError, match=rf"{paths[1]} \(sample 1\): event 0 has x=200, "
                                            r"outside the sensor's 0..33"):
        ds[1]


def test_nmnist_truncated_file(tmp_path):
    paths = write_nmnist(tmp_path, [(0, [(1, 2, 0, 1000), (3, 4, 1, 2000)])])
    paths[0].write_bytes(paths[0].read_bytes()[:7])
    with pytest.raises(DataFileError, match=rf"{paths[0]} \(sample 0\): 7 bytes, not a whole "
                                            r"number of 5-byte events"):
        data.nmnist(tmp_path, min_files=1)[0]


def test_shd_unit_out_of_range_and_bad_label(tmp_path):
    path = write_shd(tmp_path, [(5, [0.1], [900]), (25, [0.1], [3])])
    ds = data.shd(tmp_path)
    with pytest.raises(DataFileError, match=rf"{path}, sample 0: event 0 has x=900, outside "
                                            r"the sensor's 0..699"):
        ds[0]
    with pytest.raises(DataFileError, match=rf"{path}, sample 1: label 25 outside 0..19"):
        ds[1]


def test_shd_truncated_file(tmp_path):
    path = write_shd(tmp_path, [(5, [0.1], [9])])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataFileError, match=rf"{path}: not a readable HDF5 file"):
        data.shd(tmp_path)


def test_dvs_gesture_bad_files(tmp_path):
    paths = write_dvs_gesture(tmp_path, [(1, "led", 4, [(500, 5, 1, 41)]),
                                         (1, "led", 5, [(5, 5, 1, 41)]),
                                         (1, "led", 6, [(5, 5, 1, 41)])])
    paths[1].write_bytes(b"garbage, not numpy")
    np.save(paths[2], np.zeros((3, 3), dtype=np.int64))
    ds = data.dvs_gesture(tmp_path, min_files=1)
    with pytest.raises(DataFileError, match=r"4\.npy \(sample 0\): event 0 has x=500, outside "
                                            r"the sensor's 0..127"):
        ds[0]
    with pytest.raises(DataFileError, match=r"5\.npy \(sample 1\): not a numpy \.npy array"):
        ds[1]
    with pytest.raises(DataFileError, match=r"6\.npy \(sample 2\): array of shape \(3, 3\), "
                                            r"expected \(N, 4\)"):
        ds[2]


def test_cifar_garbage_batch_is_a_data_file_error(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataFileError, match=rf"{bad}: not a CIFAR-10 python pickle"):
        data.cifar10(tmp_path, train=False)
