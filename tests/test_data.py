"""Loaders of asynctrain.data on tiny fixtures (tests/fixtures.py); nothing downloads.

Each event test writes an event at a known (x, y, p, t) and checks the exact frame
index (t // dt) and flattened feature (p * H * W + y * W + x after downsampling).
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from asynctrain import data
from fixtures import (CIFAR_NAMES, SHD_KEYS, write_cifar10, write_cifar_pickle,
                      write_dvs_gesture, write_nmnist, write_shd)


def _hits(frames: torch.Tensor) -> list[tuple[int, int, float]]:
    """Non-zero entries of frames [T, F] as (frame, feature, count)."""
    return [(int(t), int(f), float(frames[t, f])) for t, f in frames.nonzero()]


# ---------------------------------------------------------------------- N-MNIST
def test_nmnist_frames_labels_and_exact_bins(tmp_path):
    write_nmnist(tmp_path, [
        (3, [(5, 7, 1, 25_000), (5, 7, 1, 29_999), (0, 0, 0, 0)]),
        # 19_999 us ends frame 1, 20_000 us starts frame 2; >= 100 ms is cropped.
        (7, [(33, 33, 0, 19_999), (2, 1, 0, 20_000), (1, 1, 1, 100_000)]),
    ])
    ds = data.nmnist(tmp_path, min_files=2)
    assert (len(ds), ds.targets, ds.timesteps, ds.num_features) == (2, [3, 7], 10, 2312)
    frames, label = ds[0]
    assert frames.shape == (10, 2312) and frames.dtype == torch.float32 and label == 3
    assert _hits(frames) == [(0, 0, 1.0), (2, 1156 + 7 * 34 + 5, 2.0)]
    frames, label = ds[1]
    assert label == 7 and _hits(frames) == [(1, 33 * 34 + 33, 1.0), (2, 34 + 2, 1.0)]


def test_nmnist_dt_and_duration_set_T(tmp_path):
    write_nmnist(tmp_path, [(0, [(1, 2, 0, 150_000)])])
    ds = data.nmnist(tmp_path, dt=5.0, duration_ms=200.0, min_files=1)
    frames, _ = ds[0]
    assert ds.timesteps == 40 and _hits(frames) == [(30, 2 * 34 + 1, 1.0)]


def test_nmnist_missing_files_listed(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.nmnist(tmp_path / "none")
    msg = str(err.value)
    for part in ("NMNIST/train.zip", "NMNIST/Train/<digit>/<id>.bin", "10000",
                 "--download"):
        assert part in msg
    write_nmnist(tmp_path, [(1, [(0, 0, 0, 0)])])
    with pytest.raises(FileNotFoundError, match="found 1"):  # tonic wants 10000
        data.nmnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="NMNIST/test.zip"):
        data.nmnist(tmp_path, train=False, min_files=1)


@pytest.mark.parametrize("kwargs, bad", [
    (dict(dt=0.0), "dt=0.0"), (dict(dt=-1.0), "dt=-1.0"),
    (dict(duration_ms=5.0), "duration_ms=5.0"), (dict(duration_ms=105.0), "105.0"),
    (dict(min_files=0), "min_files"),
])
def test_nmnist_bad_arguments(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        data.nmnist(tmp_path, **kwargs)


def test_empty_and_unsorted_recordings_keep_T(tmp_path):
    write_nmnist(tmp_path, [(2, []), (4, [(3, 0, 0, 45_000), (3, 0, 0, 5_000)])])
    ds = data.nmnist(tmp_path, min_files=2)
    empty, unsorted = ds[0][0], ds[1][0]
    assert empty.shape == (10, 2312) and not empty.any()
    assert _hits(unsorted) == [(0, 3, 1.0), (4, 3, 1.0)]


def test_framer_pads_and_crops_to_T():
    ev = np.zeros(2, dtype=[("x", int), ("y", int), ("t", int), ("p", int)])
    ev["t"] = [1_000, 2_500]  # recording of 2.5 ms, frames of 1 ms
    frames = data.EventFramer((2, 1, 1), dt=1.0, timesteps=6)(ev)
    assert frames.shape == (6, 2) and frames[:, 0].tolist() == [0, 1, 1, 0, 0, 0]
    # dt = 1/3 ms: tonic's floor((end - start) / window) gives 7 frames for 8 windows
    # unless end_time carries the extra half window; the last frame must keep its event.
    ev["t"] = [7.5 * 1000 / 3, 10_000]
    frames = data.EventFramer((2, 1, 1), dt=1 / 3, timesteps=8)(ev)
    assert frames[:, 0].tolist() == [0] * 7 + [1]
    assert data._fix_length(torch.ones(8, 3), 6).shape == (6, 3)
    assert data._fix_length(torch.ones(2, 3), 6)[2:].sum() == 0


def test_collate_time_major_and_dataloader(tmp_path):
    write_nmnist(tmp_path, [(d, [(d, d, d % 2, 1_000 * d)]) for d in range(5)])
    ds = data.nmnist(tmp_path, min_files=5)
    frames, labels = next(iter(DataLoader(ds, batch_size=5,
                                          collate_fn=data.collate_time_major)))
    assert frames.shape == (10, 5, 2312) and frames.is_contiguous()
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4]
    for b in range(5):
        assert torch.equal(frames[:, b], ds[b][0])
    # Workers started with spawn unpickle the data set; the tonic subclass must resolve.
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])


# -------------------------------------------------------------------------- SHD
def test_shd_frames_labels_and_downsampling(tmp_path):
    # Times are float16 seconds in the real files: 0.0555 s reads back as 55.48 ms.
    write_shd(tmp_path, [
        (5, [0.0555, 0.0555, 0.25, 0.9], [3, 2, 699, 10]),
        (12, [1.5], [10]),  # after 1000 ms: cropped, an all-zero sample
    ])
    ds = data.shd(tmp_path)
    assert (len(ds), ds.targets, ds.timesteps, ds.num_features) == (2, [5, 12], 100, 350)
    assert ds.classes == SHD_KEYS and ds.num_classes == 20
    frames, label = ds[0]
    assert frames.shape == (100, 350) and frames.dtype == torch.float32 and label == 5
    # channels 2 and 3 both land in feature 1: a count of 2
    assert _hits(frames) == [(5, 1, 2.0), (25, 349, 1.0), (89, 5, 1.0)]
    frames, label = ds[1]
    assert label == 12 and not frames.any()


def test_shd_missing_files_listed(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.shd(tmp_path)
    assert "SHD/shd_train.h5.zip" in str(err.value) and "SHD/shd_train.h5" in str(err.value)
    write_shd(tmp_path, [(0, [0.1], [1])], train=False)  # only the test split
    with pytest.raises(FileNotFoundError, match="shd_train.h5"):
        data.shd(tmp_path)
    assert len(data.shd(tmp_path, train=False)) == 1


# ------------------------------------------------------------------ DVS Gesture
def _gesture_samples():
    return [(u, light, label, [(4 * u, 8, label % 2, 20 * label)])
            for u, light in [(3, "natural"), (1, "led"), (2, "fluorescent_led"),
                             (1, "fluorescent")]
            for label in (10, 2, 0)]


def test_dvs_gesture_frames_labels_and_downsampling(tmp_path):
    write_dvs_gesture(tmp_path, [
        (1, "led", 4, [(127, 5, 1, 41), (124, 7, 1, 59), (0, 0, 0, 1_499),
                       (0, 0, 0, 1_500)]),  # 1500 ms is past the last frame
    ])
    ds = data.dvs_gesture(tmp_path, min_files=1)
    assert (ds.timesteps, ds.num_features, ds.num_classes) == (75, 2048, 11)
    frames, label = ds[0]
    assert frames.shape == (75, 2048) and frames.dtype == torch.float32 and label == 4
    # x 127 and 124 share the 4x4 block x // 4 = 31, y 5 and 7 share y // 4 = 1
    assert _hits(frames) == [(2, 1024 + 32 + 31, 2.0), (74, 0, 1.0)]


def test_dvs_gesture_order_is_sorted_whatever_the_walk_order(tmp_path, monkeypatch):
    write_dvs_gesture(tmp_path, _gesture_samples())
    walk = os.walk

    def reversed_walk(top, *args, **kwargs):  # file-system order is arbitrary
        for path, dirs, files in walk(top, *args, **kwargs):
            dirs.reverse()
            yield path, dirs, files[::-1]

    first = data.dvs_gesture(tmp_path, min_files=12)
    monkeypatch.setattr(os, "walk", reversed_walk)
    second = data.dvs_gesture(tmp_path, min_files=12)
    assert first.events.data == second.events.data
    keys = [(u, light, y) for u, light, y in zip(first.events.users,
                                                  first.events.lighting, first.targets)]
    assert keys == sorted(keys) and len(keys) == 12
    assert keys[0] == (1, "fluorescent", 0) and keys[-1] == (3, "natural", 10)
    for i, (u, _, y) in enumerate(keys):  # labels and events still belong together
        frames, label = first[i]
        assert label == y and _hits(frames) == [(y, (y % 2) * 1024 + 2 * 32 + u, 1.0)]


def test_dvs_gesture_missing_files_listed(tmp_path):
    write_dvs_gesture(tmp_path, _gesture_samples()[:2])
    with pytest.raises(FileNotFoundError) as err:
        data.dvs_gesture(tmp_path)  # tonic wants 100 .npy
    msg = str(err.value)
    assert "DVSGesture/ibmGestureTrain.tar.gz" in msg and "found 2" in msg
    assert "DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy" in msg
    with pytest.raises(FileNotFoundError, match="ibmGestureTest.tar.gz"):
        data.dvs_gesture(tmp_path, train=False, min_files=1)


# --------------------------------------------------------------------- CIFAR-10
def test_cifar10_frames_and_labels(tmp_path):
    written = write_cifar10(tmp_path, n_per_batch=3)
    ds = data.cifar10(tmp_path)
    assert (len(ds), ds.timesteps, ds.num_features, ds.classes) == (15, 1, 3072, CIFAR_NAMES)
    frames, label = ds[4]  # second image of data_batch_2
    raw, labels = written["data_batch_2"]
    assert frames.shape == (1, 3072) and frames.dtype == torch.float32
    assert label == labels[1]
    assert torch.equal(frames[0], torch.from_numpy(raw[1]).float() / 255)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    test = data.cifar10(tmp_path, train=False, flatten=False)
    frames, label = test[2]
    raw, labels = written["test_batch"]
    assert frames.shape == (1, 3, 32, 32) and label == labels[2]
    # channel-major planes: red (0, y, x) is byte y * 32 + x, green starts at 1024
    assert frames[0, 1, 5, 7] == raw[2, 1024 + 5 * 32 + 7] / 255


@pytest.mark.parametrize("bad, match", [
    ({"labels": [0, 1, 2], "data": np.zeros((3, 3072), np.float32)}, "uint8"),
    ({"labels": [0, 1, 2], "data": np.zeros((3, 1024), np.uint8)}, r"\(3, 1024\)"),
    ({"labels": [0, 10, 2], "data": np.zeros((3, 3072), np.uint8)}, "0..9"),
    ({"labels": [0, 1], "data": np.zeros((3, 3072), np.uint8)}, "'labels'"),
    ({"data": np.zeros((3, 3072), np.uint8)}, "'data' and 'labels'"),
    ([1, 2, 3], "dict"),
])
def test_cifar10_bad_file_is_named(tmp_path, bad, match):
    write_cifar10(tmp_path)
    write_cifar_pickle(tmp_path / data.CIFAR10_FOLDER / "data_batch_3", bad)
    with pytest.raises(ValueError, match=match) as err:
        data.cifar10(tmp_path)
    assert "data_batch_3" in str(err.value)


def test_cifar10_rejects_foreign_pickles_and_lists_missing_files(tmp_path):
    write_cifar10(tmp_path)
    write_cifar_pickle(tmp_path / data.CIFAR10_FOLDER / "test_batch", {"x": os.getcwd})
    with pytest.raises(ValueError, match="test_batch.*unexpected global"):
        data.cifar10(tmp_path, train=False)
    (tmp_path / data.CIFAR10_FOLDER / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError) as err:
        data.cifar10(tmp_path)
    msg = str(err.value)
    assert "missing: data_batch_4." in msg and "cifar-10-batches-py" in msg
    assert "batches.meta" in msg and "--download" in msg


# ----------------------------------------------------------------------- digits
def test_digits_shapes_split_and_determinism():
    train, test = data.digits(train=True), data.digits(train=False)
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert not set(train.indices) & set(test.indices)
    frames, label = train[0]
    assert frames.shape == (16, 64) and frames.dtype == torch.float32
    assert set(frames.unique().tolist()) <= {0.0, 1.0} and 0 <= label <= 9
    again = data.digits(train=False)
    assert np.array_equal(again.indices, test.indices) and torch.equal(again.data, test.data)
    other = data.digits(train=False, seed=1)
    assert not np.array_equal(other.indices, test.indices)
    # stratified: every class keeps about its share of the test split
    counts = np.bincount(test.targets, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47


def test_digits_rate_code():
    from sklearn.datasets import load_digits

    images = load_digits().data
    ds = data.digits(train=True, T=8, max_rate=1.0)
    spikes = ds.data.float()  # [N, T, 64]
    img = torch.from_numpy(images[ds.indices]).float()
    assert torch.all(spikes[img[:, None, :].expand_as(spikes) == 0] == 0)
    assert torch.all(spikes[img[:, None, :].expand_as(spikes) == 16] == 1)
    half = data.digits(train=True, T=32, max_rate=0.5).data.float().mean(dim=1)
    expected = img / 16 * 0.5
    assert abs(half.mean() - expected.mean()) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(T=0), "T=0"), (dict(test_fraction=1.0), "test_fraction"),
    (dict(max_rate=0.0), "max_rate"), (dict(max_rate=1.5), "max_rate"),
])
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.digits(**kwargs)
