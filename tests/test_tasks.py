"""asynctrain.tasks: the generated tasks have the promised shapes, splits, balance and
determinism, and a layered model learns each above chance in a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from asynctrain import tasks
from asynctrain.data import collate_time_major
from asynctrain.experiment import Hyper, build_snn
from asynctrain.train import fit

GENERATED = [n for n, t in tasks.TASKS.items() if t.make is not None]


def _generate(task: tasks.Task, i: int):
    """One split generated afresh (not from the cache)."""
    world = np.random.default_rng([task.seed, 0])
    rng = np.random.default_rng([task.seed, 1 + i])
    return task.make(world, rng, task.sizes[i], task.timesteps)


def test_registry():
    assert len(GENERATED) >= 3 and "digits" in tasks.names()
    held = [n for n, t in tasks.TASKS.items() if t.held_out]
    assert held == ["manifold"] and "manifold" not in tasks.tuning_names()
    with pytest.raises(ValueError, match="unknown task 'mnist'; choose one of digits"):
        tasks.get("mnist")
    with pytest.raises(ValueError, match="split must be one of .* got 'dev'"):
        tasks.get("rates").split("dev")


@pytest.mark.parametrize("name", tasks.names())
def test_shapes_balance_and_time_major_batches(name):
    task = tasks.get(name)
    for i, split in enumerate(tasks.SPLITS):
        ds = task.split(split)
        assert len(ds) == task.sizes[i] and ds.dt == task.dt
        frames, label = ds[0]
        assert frames.shape == (task.timesteps, task.n_inputs) and frames.dtype == torch.float32
        assert set(frames.unique().tolist()) <= {0.0, 1.0} and 0 <= label < task.n_classes
        counts = torch.bincount(ds.labels, minlength=task.n_classes)
        if task.make is not None:  # generated: balanced to within one sample
            assert int(counts.max() - counts.min()) <= 1, counts
        else:  # digits: a random validation part of a stratified split (23..37 of 300)
            assert int(counts.min()) > 0.7 * len(ds) / task.n_classes
    x, y = next(iter(DataLoader(task.split("val"), batch_size=5, collate_fn=collate_time_major)))
    assert x.shape == (task.timesteps, 5, task.n_inputs) and y.shape == (5,)


@pytest.mark.parametrize("name", GENERATED)
def test_deterministic_and_splits_distinct(name):
    task = tasks.get(name)
    a, ya = _generate(task, 2)
    b, yb = _generate(task, 2)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    test = task.split("test")
    assert torch.equal(test.data, torch.from_numpy(a)) and torch.equal(test.labels, torch.from_numpy(ya))
    train = task.split("train").data.reshape(task.sizes[0], -1).numpy()
    seen = {row.tobytes() for row in train}
    assert not any(row.tobytes() in seen for row in a.reshape(len(a), -1))


def test_digits_split_is_the_earlier_studies_validation_split():
    from asynctrain.data import digits

    full = digits(train=True, T=8, seed=0)
    train, val = tasks.get("digits").split("train"), tasks.get("digits").split("val")
    perm = np.random.default_rng(0).permutation(len(full))
    assert val.indices.tolist() == full.indices[np.sort(perm[:300])].tolist()
    assert len(set(train.indices.tolist()) | set(val.indices.tolist())) == len(full)


def test_order_class_is_the_order_of_two_symbols():
    task = tasks.get("order")
    ds = task.split("train")
    x = ds.data.float().numpy()  # [N, T, F]
    # the two symbol frames stand out of the background (0.04) by their 10 channels
    busiest = np.sort(np.argsort(x.sum(2), axis=1)[:, -2:], axis=1)
    first, second = x[np.arange(len(x)), busiest[:, 0]], x[np.arange(len(x)), busiest[:, 1]]
    y = ds.labels.numpy()
    for s in range(3):  # a symbol's channels fire at 0.7 in the frame that shows it
        group_first = first[y // 3 == s].mean(0)
        group_second = second[y % 3 == s].mean(0)
        top_first = set(np.argsort(group_first)[-10:])
        assert top_first == set(np.argsort(group_second)[-10:])
        assert group_first[list(top_first)].mean() > 0.5


def test_manifold_codes_by_timing_only():
    ds = tasks.get("manifold").split("train")
    spikes = ds.data.numpy()
    per_channel = spikes.sum(1)  # [N, F]: at most one spike per channel
    assert per_channel.max() == 1 and 0.85 < per_channel.mean() < 0.95
    # the rate of a channel says nothing about the class: ~0.9 in every class
    rates = np.stack([per_channel[ds.labels.numpy() == c].mean(0) for c in range(10)])
    assert np.abs(rates - 0.9).max() < 0.06


@pytest.mark.filterwarnings("ignore:.*no output spike:RuntimeWarning")  # the first epochs
@pytest.mark.parametrize("name", GENERATED)
def test_layered_model_learns_above_chance(name):
    torch.set_num_threads(1)
    task = tasks.get(name)
    h = Hyper(hidden=task.hidden, tau=task.tau, dt=task.dt, theta=task.theta, lr=5e-3)
    snn = build_snn(task.n_inputs, task.n_classes, h, "layered", seed=0)
    train = Subset(task.split("train"), range(1200))
    dl = DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate_time_major)
    val = DataLoader(task.split("val"), batch_size=300, collate_fn=collate_time_major)
    hist = fit(snn, dl, 4, h.lr, seed=0, progress=False, val_loader=val)
    # measured: rates 0.66, order 0.54, manifold 0.57 after 4 epochs (chance 0.05-0.11)
    assert hist[-1]["val_accuracy"] > task.chance + 0.3
