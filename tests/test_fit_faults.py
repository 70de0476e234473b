"""Faults `fit` must stop at or report, never train through silently: non-finite
gradients / weights, huge frames, empty and batch-first loaders, a silent network,
unusable checkpoint paths and files, resumes with other settings."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asynctrain as at
from asynctrain.checkpoint import CheckpointError, load_model
from asynctrain.data import collate_time_major
from asynctrain.train import TrainingDiverged, fit


def _data(n=32, T=3, n_in=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    rate = torch.full((n, n_in), 0.1)
    rate[labels == 0, : n_in // 2] = 0.7
    rate[labels == 1, n_in // 2:] = 0.7
    return (torch.rand(n, T, n_in, generator=g) < rate[:, None]).float(), labels


def _loader(frames=None, labels=None, **kw):
    if frames is None:
        frames, labels = _data()
    return DataLoader(TensorDataset(frames, labels), batch_size=8, shuffle=True,
                      collate_fn=kw.pop("collate_fn", collate_time_major), **kw)


def _snn(policy="MS", gain=2.0, **cfg):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False), torch.nn.Linear(10, 2, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(gain)
    return at.AsyncSNN(net, at.SimConfig(**{"policy": policy, "forward_group_size": 4, "theta": 0.3, **cfg}))


def _events(log):
    return [json.loads(s)["event"] for s in log.read_text().splitlines()] if log.exists() else []


def test_nan_in_one_weight_is_refused_by_the_first_forward(tmp_path):
    snn = _snn()
    with torch.no_grad():
        snn.net[0].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"weight net\.0\.weight holds 1 NaN/inf value\(s\) of 120, "
                                         r"first at \[3, 4\]"):
        fit(snn, _loader(), 2, 1e-2, progress=False, checkpoint_path=tmp_path / "m.pt",
            log_path=tmp_path / "log.jsonl")
    assert not (tmp_path / "m.pt").exists()
    assert _events(tmp_path / "log.jsonl") == ["start"]


def test_inf_weight_is_refused_by_the_module_itself():
    snn = _snn()
    with torch.no_grad():
        snn.net[1].weight[1, 2] = float("inf")
    frames, _ = _data()
    with pytest.raises(ValueError, match=r"weight net\.1\.weight holds 1 NaN/inf value\(s\) of 20"):
        snn(frames[:4].transpose(0, 1).contiguous())


def test_huge_finite_frames_stop_training(tmp_path):
    frames, labels = _data()
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, batch 1"):
        fit(_snn(), _loader(frames * 3e38, labels), 2, 1e-2, progress=False,
            checkpoint_path=tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_nan_weight_after_a_step_is_caught(tmp_path, monkeypatch):
    snn = _snn()
    step = torch.optim.Adam.step

    def bad_step(self, *a, **k):
        out = step(self, *a, **k)
        with torch.no_grad():
            snn.net[1].weight[0, 0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", bad_step)
    with pytest.raises(TrainingDiverged, match=r"weight net\.1\.weight holds 1 of 20 NaN/inf "
                                               r"values at epoch 1, batch 1"):
        fit(snn, _loader(), 1, 1e-2, progress=False)


def test_empty_loader_is_an_error_before_any_epoch(tmp_path):
    frames, labels = _data()
    empty = DataLoader(TensorDataset(frames[:0], labels[:0]), batch_size=8,
                       collate_fn=collate_time_major)
    with pytest.raises(ValueError, match=r"train_loader is empty \(0 batches\)"):
        fit(_snn(), empty, 1, 1e-2, progress=False, checkpoint_path=tmp_path / "m.pt")
    few = _loader(frames[:3], labels[:3], drop_last=True)
    with pytest.raises(ValueError, match="train_loader is empty"):
        fit(_snn(), few, 1, 1e-2, progress=False, checkpoint_path=tmp_path / "m.pt")

    class NoLen:  # an iterable without len() that yields nothing
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="yielded no batch in epoch 1"):
        fit(_snn(), NoLen(), 1, 1e-2, progress=False, checkpoint_path=tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_batch_first_loaders_are_refused():
    frames, labels = _data()
    default = DataLoader(TensorDataset(frames, labels), batch_size=8)  # [B, T, F]
    with pytest.raises(ValueError, match=r"default collate.*\[B, T, F\].*collate_time_major"):
        fit(_snn(), default, 1, 1e-2, progress=False)
    batch_first = [(frames[:8], labels[:8])]  # [8, 3, 12]: 8 labels on axis 0
    with pytest.raises(ValueError, match=r"epoch 1, batch 1: frames \(8, 3, 12\) look batch-first"):
        fit(_snn(), batch_first, 1, 1e-2, progress=False)
    wrong = [(frames[:8].transpose(0, 1), labels[:5])]
    with pytest.raises(ValueError, match=r"hold 8 samples on axis 1 .* 5 labels"):
        fit(_snn(), wrong, 1, 1e-2, progress=False)


def test_silent_network_is_warned_about_in_the_first_epoch():
    snn = _snn(gain=0.0)
    with pytest.warns(RuntimeWarning, match=r"epoch 1: no output spike in 100% of training passes"):
        hist = fit(snn, _loader(), 1, 1e-2, progress=False)
    assert hist[0]["passes_with_output"] == 0.0


def test_checkpoint_path_under_a_file_fails_before_training(tmp_path):
    (tmp_path / "f").write_text("x")
    calls = []
    snn = _snn()
    snn.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"checkpoint_path .*f/run/m\.pt: .*f is a file"):
        fit(snn, _loader(), 1, 1e-2, progress=False, checkpoint_path=tmp_path / "f" / "run" / "m.pt")
    with pytest.raises(ValueError, match=r"log_path .* is a folder"):
        fit(snn, _loader(), 1, 1e-2, progress=False, log_path=tmp_path)
    assert not calls


@pytest.mark.parametrize("content", [b"", b"garbage", "truncated"])
def test_unreadable_checkpoint_on_resume_names_the_file(tmp_path, content):
    p = tmp_path / "m.pt"
    if content == "truncated":
        fit(_snn(), _loader(), 1, 1e-2, progress=False, checkpoint_path=p)
        content = p.read_bytes()[:200]
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"checkpoint {p}: "):
        fit(_snn(), _loader(), 2, 1e-2, progress=False, checkpoint_path=p)


def test_resume_prints_and_names_the_one_changed_setting(tmp_path, capsys):
    p = tmp_path / "m.pt"
    fit(_snn(), _loader(), 1, 1e-2, progress=False, checkpoint_path=p)
    hist = fit(_snn(), _loader(), 2, 1e-2, progress=False, checkpoint_path=p)
    assert len(hist) == 2 and f"resumed from {p} at epoch 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"\(loss: 'counts' there, 'rate' here\).*--fresh"):
        fit(_snn(), _loader(), 3, 1e-2, progress=False, checkpoint_path=p, loss="rate")
    with pytest.raises(ValueError) as e:
        fit(_snn(theta=0.25), _loader(), 3, 1e-2, progress=False, checkpoint_path=p)
    msg = str(e.value)
    assert "(theta: 0.3 there, 0.25 here)" in msg and "--fresh" in msg and len(msg) < 400
    with pytest.raises(CheckpointError, match=r"another model \(layer 0: linear 12->10 there, "
                                              r"linear 12->6 here\)"):
        net = torch.nn.Sequential(torch.nn.Linear(12, 6, bias=False), torch.nn.Linear(6, 2, bias=False))
        fit(at.AsyncSNN(net, _snn().cfg), _loader(), 3, 1e-2, progress=False, checkpoint_path=p)
    assert load_model(p)[1]["epoch"] == 2


def test_progress_bar_stays_and_counts_epochs_from_one(capsys):
    fit(_snn(), _loader(), 2, 1e-2, progress=True, desc="toy")
    err = capsys.readouterr().err
    assert "toy" in err and "8/8" in err and err.rstrip().endswith("]")  # the final bar is kept
    assert "epoch=2" in err and "epoch=0" not in err


# ---- what a first user hits (each a clear error before or at the first batch)
def test_a_loader_of_triples_is_named():
    frames, labels = _data()
    triples = [(frames[:8].transpose(0, 1), labels[:8], torch.zeros(8))]
    with pytest.raises(ValueError, match=r"train_loader, epoch 1, batch 1: the loader must yield "
                                         r"\(frames, labels\) pairs, got a tuple of 3 items"):
        fit(_snn(), triples, 1, 1e-2, progress=False)


@pytest.mark.parametrize("labels, match", [
    (torch.full((8,), 0.0), r"labels must be class indices \(an integer dtype\), got torch.float32"),
    (torch.full((8,), 2), r"label 2 is outside 0\.\.1 \(the model has 2 outputs"),
    (torch.full((8,), -1), r"label -1 is outside 0\.\.1"),
])
def test_labels_that_are_not_class_indices_are_named(labels, match):
    frames, _ = _data()
    with pytest.raises(ValueError, match=match):
        fit(_snn(), [(frames[:8].transpose(0, 1), labels)], 1, 1e-2, progress=False)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_fit_under_no_grad_or_inference_mode_is_refused(mode, tmp_path):
    with mode(), pytest.raises(RuntimeError, match=rf"fit was called under torch\.{mode.__name__}\(\)"):
        fit(_snn(), _loader(), 1, 1e-2, progress=False, checkpoint_path=tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_a_device_that_is_not_there_or_not_the_models_is_named():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda': no CUDA device is available here"):
            fit(_snn(), _loader(), 1, 1e-2, progress=False, device="cuda")
    with pytest.raises(ValueError, match=r"device='meta' but the weights are on cpu: move the model"):
        fit(_snn(), _loader(), 1, 1e-2, progress=False, device="meta")


def test_a_loss_that_is_not_a_scalar_is_named():
    def per_sample(out, labels, readout):
        return torch.nn.functional.cross_entropy(out.sum(0), labels, reduction="none")

    with pytest.raises(ValueError, match=r"batch 1: the loss must be a scalar, got a tensor of shape \(8,\)"):
        fit(_snn(), _loader(), 1, 1e-2, progress=False, loss=per_sample)


def test_an_empty_val_loader_is_refused_before_training_and_a_late_failure_keeps_the_epoch(tmp_path):
    calls = []
    snn = _snn()
    snn.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"val_loader is empty \(0 batches\)"):
        fit(snn, _loader(), 1, 1e-2, progress=False, val_loader=[], checkpoint_path=tmp_path / "m.pt")
    assert not calls and not (tmp_path / "m.pt").exists()

    class NoLen:  # passes the up-front check, yields nothing
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match=r"val_loader: the evaluation loader yielded no batch"):
        fit(_snn(), _loader(), 1, 1e-2, progress=False, val_loader=NoLen(),
            checkpoint_path=tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt")[1]["epoch"] == 1  # the trained epoch was saved
