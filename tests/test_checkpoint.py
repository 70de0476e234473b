"""The one checkpoint format (`asynctrain.checkpoint`): round trips for MLP and conv
models, the model rebuilt from the file alone, and every bad file named in the error."""

from __future__ import annotations

import math

import pytest
import torch

import asynctrain as at
from asynctrain.checkpoint import (CheckpointError, check_writable, config_diff, describe_model,
                                   load_into, load_model, save_model)
from asynctrain.models import mlp, vgg7


def _snn(sizes=(6, 5, 3), **cfg):
    torch.manual_seed(0)
    return at.AsyncSNN(mlp(sizes=list(sizes)), at.SimConfig(**cfg))


def test_mlp_round_trip_rebuilds_model_config_and_meta(tmp_path):
    snn = _snn(policy="RS", forward_group_size=3, theta=0.25, tau=math.inf)
    save_model(tmp_path / "m.pt", snn, epoch=4, args={"lr": 1e-3, "out": tmp_path})
    got, info = load_model(tmp_path / "m.pt")
    assert list(got.graph.layer_sizes) == [6, 5, 3]
    assert got.cfg == snn.cfg and info["config"] == snn.cfg
    assert info["epoch"] == 4 and info["args"]["lr"] == 1e-3
    assert info["args"]["out"] == str(tmp_path)  # a Path is stored as text
    assert info["version"] == at.__version__ and info["layer_sizes"] == [6, 5, 3]
    for a, b in zip(snn.net.parameters(), got.net.parameters()):
        assert torch.equal(a, b)
    x = (torch.rand(3, 2, 6) < 0.5).float()
    assert torch.equal(snn(x, seed=1), got(x, seed=1))


def test_conv_model_with_per_neuron_theta_round_trips(tmp_path):
    net = vgg7(width=0.05, image_size=8)
    snn = at.AsyncSNN(net, at.SimConfig())
    theta = torch.full((snn.graph.n_neurons,), 0.2)
    theta[-10:] = 1e9
    snn.cfg = snn.cfg.replace(theta=theta, readout="potential")
    save_model(tmp_path / "c.pt", snn)
    got, info = load_model(tmp_path / "c.pt")
    assert got.graph.input_shape == (3, 8, 8) and got.cfg == snn.cfg
    assert describe_model(got.net) == describe_model(net)
    assert info["epoch"] is None and info["args"] == {}


@pytest.mark.parametrize("content, needle", [
    (b"", "empty"),
    (b"this is not a torch file at all", "not a readable torch file"),
])
def test_bad_files_are_named(tmp_path, content, needle):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        load_model(p)
    assert str(p) in str(e.value)


def test_truncated_missing_folder_and_foreign_files(tmp_path):
    snn = _snn()
    save_model(tmp_path / "m.pt", snn, epoch=1)
    raw = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"t\.pt.*not a readable torch file"):
        load_model(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(tmp_path)
    torch.save(dict(model={}, optimizer={}, epoch=1), tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old cifar_vgg7 checkpoint"):
        load_model(tmp_path / "old.pt")
    torch.save(dict(version=1, net={}), tmp_path / "fit1.pt")
    with pytest.raises(CheckpointError, match=r"old fit\(\) checkpoint"):
        load_model(tmp_path / "fit1.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_model(tmp_path / "list.pt")


def test_nan_weights_and_other_model_are_refused(tmp_path):
    snn = _snn()
    save_model(tmp_path / "nan.pt", snn)
    with torch.no_grad():
        snn.net[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"not saving .*nan\.pt: weight 0\.weight holds 1 NaN/inf "
                                         r"values \(load_model would refuse the file\)"):
        save_model(tmp_path / "nan.pt", snn)
    state = torch.load(tmp_path / "nan.pt", weights_only=True)  # a file written by other means
    state["weights"]["0.weight"][1, 2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt: weight 0\.weight holds 1 NaN"):
        load_model(tmp_path / "nan.pt")
    save_model(tmp_path / "m.pt", _snn())
    with pytest.raises(CheckpointError, match=r"another model \(layer 1: linear 5->3 there, "
                                              r"linear 5->4 here\)"):
        load_into(tmp_path / "m.pt", _snn((6, 5, 4)))


def test_config_diff_names_fields_and_summarises_tensors():
    a = at.SimConfig(theta=torch.full((8,), 0.3))
    b = a.replace(policy="RS", theta=torch.full((8,), 0.2))
    d = config_diff(a, b)
    assert [n for n, _, _ in d] == ["policy", "theta"]
    assert d[1][1] == "per-neuron [8], all 0.3"
    assert "tensor(" not in repr(d)


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, so no folder"):
        check_writable(tmp_path / "file" / "sub" / "m.pt")
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(tmp_path)
    assert check_writable(tmp_path / "new" / "m.pt") == tmp_path / "new" / "m.pt"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_writes_that_fail_name_the_file_and_keep_the_previous_one(tmp_path, monkeypatch):
    from asynctrain.outdir import OutputError

    save_model(tmp_path / "m.pt", _snn(), epoch=1)
    with pytest.raises(ValueError, match=r"checkpoint .* is a folder, not a file"):
        save_model(tmp_path, _snn())

    def full_disk(obj, f, *a, **k):  # what torch raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 774")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=rf"could not write checkpoint {tmp_path / 'm.pt'}: the write "
                                          r"stopped part way .*\(the previous one is intact\)"):
        save_model(tmp_path / "m.pt", _snn(), epoch=2)
    monkeypatch.undo()
    assert load_model(tmp_path / "m.pt")[1]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
