"""fit (training loop, log, checkpoints, NaN abort), evaluate (metrics on a case
checked by hand) and report (table layout, files)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import asynctrain as at
from asynctrain.data import collate_time_major
from asynctrain import report
from asynctrain.evaluate import UBRAIN_ENERGY_PER_SO, Execution, evaluate
from asynctrain.checkpoint import load_model
from asynctrain.train import TrainingDiverged, fit, load_checkpoint, save_checkpoint


def _toy_loader(n: int = 48, T: int = 4, n_in: int = 12, seed: int = 0) -> DataLoader:
    """Two classes firing different halves of the inputs; shuffled, time-major."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    rate = torch.full((n, n_in), 0.05)
    rate[labels == 0, : n_in // 2] = 0.6
    rate[labels == 1, n_in // 2:] = 0.6
    frames = (torch.rand(n, T, n_in, generator=g) < rate[:, None]).float()
    return DataLoader(TensorDataset(frames, labels), batch_size=16, shuffle=True,
                      collate_fn=collate_time_major)


def _toy_snn(policy: str = "MS", seed: int = 0) -> at.AsyncSNN:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False), torch.nn.Linear(10, 2, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(2.0)
    cfg = at.SimConfig(policy=policy, forward_group_size=4, theta=0.3, tau=20.0, dt=10.0,
                       surrogate_steepness=2.0, refractory_dropout=0.5, momentum_noise=0.1,
                       input_dropout=0.1)
    return at.AsyncSNN(net, cfg)


@pytest.mark.parametrize("policy", ["layered", "MS"])
def test_fit_runs_logs_and_checkpoints(tmp_path, policy):
    snn = _toy_snn(policy)
    hist = fit(snn, _toy_loader(), epochs=3, lr=2e-2, seed=1, progress=False,
               log_path=tmp_path / "log.jsonl", checkpoint_path=tmp_path / "m.pt")
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples"] == 48 for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]  # two separable classes: it learns
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [l["event"] for l in lines] == ["start", "epoch", "epoch", "epoch"]
    assert {"loss", "train_accuracy", "synops_per_sample", "forward_steps_per_pass",
            "capped_passes", "seconds"} <= set(lines[-1])
    _, ck = load_model(tmp_path / "m.pt")
    assert ck["epoch"] == 3 and len(ck["history"]) == 3 and ck["config"] == snn.cfg
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_resume_gives_identical_weights(tmp_path):
    loader = _toy_loader()
    straight = _toy_snn("RS")
    fit(straight, loader, epochs=2, lr=1e-2, seed=7, progress=False)
    first = _toy_snn("RS")
    fit(first, loader, epochs=1, lr=1e-2, seed=7, progress=False, checkpoint_path=tmp_path / "m.pt")
    resumed = _toy_snn("RS", seed=99)  # other initial weights: all must come from the file
    hist = fit(resumed, loader, epochs=2, lr=1e-2, seed=7, progress=False,
               checkpoint_path=tmp_path / "m.pt", log_path=tmp_path / "log.jsonl")
    assert [r["epoch"] for r in hist] == [1, 2]
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])["event"] == "resume"
    # Finished: nothing more to do; other settings are refused, not silently mixed.
    assert len(fit(resumed, loader, epochs=2, lr=1e-2, seed=7, progress=False,
                   checkpoint_path=tmp_path / "m.pt")) == 2
    with pytest.raises(ValueError, match="lr: 0.01 there, 0.02 here"):
        fit(resumed, loader, epochs=3, lr=2e-2, seed=7, progress=False,
            checkpoint_path=tmp_path / "m.pt")


def test_a_run_stopped_by_max_steps_inside_an_epoch_resumes_exactly(tmp_path):
    loader = _toy_loader()  # 3 batches per epoch
    straight = _toy_snn("MS")
    fit(straight, loader, epochs=3, lr=1e-2, seed=4, progress=False)
    stopped = _toy_snn("MS")
    hist = fit(stopped, loader, epochs=3, lr=1e-2, seed=4, progress=False, max_steps=4,
               checkpoint_path=tmp_path / "m.pt", log_path=tmp_path / "log.jsonl")
    assert len(hist) == 1  # epoch 1 complete; epoch 2 stopped after 1 of its 3 batches
    meta = load_model(tmp_path / "m.pt")[1]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 4)
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["event"] == "stop"
    resumed = _toy_snn("MS", seed=5)
    hist = fit(resumed, loader, epochs=3, lr=1e-2, seed=4, progress=False,
               checkpoint_path=tmp_path / "m.pt")
    assert [r["epoch"] for r in hist] == [1, 2, 3] and hist[1]["resumed_at_batch"] == 1
    assert hist[1]["batches"] == 2 and hist[-1]["step"] == 9
    for a, b in zip(straight.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    # a stop on an epoch's last batch completes that epoch
    fit(_toy_snn("MS"), loader, epochs=3, lr=1e-2, seed=4, progress=False, max_steps=3,
        checkpoint_path=tmp_path / "e.pt")
    meta = load_model(tmp_path / "e.pt")[1]
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 0, 3)


def test_nan_loss_aborts_with_a_clear_message(tmp_path):
    snn = _toy_snn("layered")
    calls = []

    def nan_on_second_epoch(out, labels, readout):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(out.sum(0), labels)
        return loss * float("nan") if len(calls) > 3 else loss

    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, batch 1 .*smaller lr"):
        fit(snn, _toy_loader(), epochs=3, lr=1e-2, progress=False, loss=nan_on_second_epoch,
            checkpoint_path=tmp_path / "m.pt", log_path=tmp_path / "log.jsonl")
    assert load_model(tmp_path / "m.pt")[1]["epoch"] == 1  # last finite state
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["event"] == "abort"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    snn = _toy_snn()
    save_checkpoint(tmp_path / "m.pt", snn, None, epoch=1)
    before = (tmp_path / "m.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", snn, None, epoch=2)
    assert (tmp_path / "m.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "m.pt", snn)["epoch"] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        fit(_toy_snn(), _toy_loader(), epochs=-1, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        fit(_toy_snn(), _toy_loader(), epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match="loss must be one of"):
        fit(_toy_snn(), _toy_loader(), epochs=1, lr=1e-3, loss="hinge")


# ------------------------------------------------------------------------ evaluate
def _hand_case():
    """2 inputs -> 2 hidden -> 2 outputs, identity weights, theta 0.5, no memory
    between passes (tau 1 ms, dt 10 ms). Sample 0 fires input 0 at t = 0 and 1;
    sample 1 fires input 1 at t = 0 only. Every spike is relayed one layer on."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[1].weight.copy_(torch.eye(2))
    snn = at.AsyncSNN(net, at.SimConfig(theta=0.5, tau=1.0, dt=10.0))
    frames = torch.tensor([[[1., 0.], [0., 1.]], [[1., 0.], [0., 0.]]])  # [T=2, B=2, 2]
    return snn, [(frames, torch.tensor([0, 1]))]


def test_evaluate_metrics_by_hand():
    snn, loader = _hand_case()
    res = evaluate(snn, loader, ["layered", "RS", "MS:drain"], steps_after_output=[0, 2])
    assert list(res) == ["layered", "RS", "MS:drain"]
    lay, rs = res["layered"], res["RS"]
    for r in res.values():
        assert r.samples == 2 and r.accuracy == 1.0
        # hidden spikes: 2 (sample 0) + 1 (sample 1) over 2 samples x 2 hidden neurons
        assert r.density == pytest.approx(3 / 4)
        # each spike (input or hidden) reaches its 2 targets: sample 0 has 4 spikes, sample 1 has 2
        assert r.per_sample["synops"] == [8, 4] and r.synops == 6.0
        assert r.energy == pytest.approx(6.0 * UBRAIN_ENERGY_PER_SO)
        assert r.per_sample["latency_spikes"] == [4, 2] and r.latency_spikes == 3.0
        assert r.first_output_step == 2.0 and r.passes_with_output == 0.75
    # layered: 2 forward steps per pass, 2 passes, with or without input
    assert lay.per_sample["latency_steps"] == [4, 4]
    # async: a spike per forward step; an empty pass takes none
    assert rs.per_sample["latency_steps"] == [4, 2]
    # 3 hidden + 3 output spikes; layered neurons integrate their whole fan-in (2)
    assert lay.currents_to_spike == [0, 0, 6] and rs.currents_to_spike == [0, 6, 0]
    assert lay.accuracy_vs_steps_after_output == {}
    assert rs.accuracy_vs_steps_after_output == {"0": 1.0, "2": 1.0, "drain": 1.0}
    assert snn.cfg.policy == "MS" and snn.record_currents is False  # restored


def test_evaluate_energy_override_and_errors():
    snn, loader = _hand_case()
    r = evaluate(snn, loader, ["RS:K=1"], steps_after_output=None, energy_per_so=2e-12,
                 energy_unit="J")["RS:K=1"]
    assert r.energy == pytest.approx(12e-12) and r.energy_unit == "J"
    with pytest.raises(ValueError, match="energy_per_so"):
        evaluate(snn, loader, ["RS"], energy_per_so=-1.0)
    with pytest.raises(ValueError, match="policy must be"):
        evaluate(snn, loader, ["async"])


@pytest.mark.parametrize("spec, name, overrides", [
    ("layered", "layered", dict(policy="layered")),
    ("rs", "RS", dict(policy="RS", stop="output", steps_after_output=1)),
    ("MS:K=4:F=2", "MS:K=4:F=2", dict(policy="MS", stop="output", steps_after_output=2,
                                      forward_group_size=4)),
    ("RS:drain", "RS:drain", dict(policy="RS", stop="spiking_done", steps_after_output=1)),
])
def test_execution_parse(spec, name, overrides):
    ex = Execution.parse(spec)
    assert ex.name == name and Execution.parse(ex.name) == ex and ex.overrides() == overrides


def test_execution_labels_and_bad_specs():
    assert Execution.parse("MS:K=4:drain").label == "Async MS (K=4, drain)"
    assert Execution.parse("layered").label == "Layered"
    for bad, msg in (("MS:K", "name=value"), ("MS:Q=1", "unknown setting"), ("", "execution")):
        with pytest.raises(ValueError, match=msg):
            Execution.parse(bad)


# -------------------------------------------------------------------------- report
def _results():
    snn, loader = _hand_case()
    one = evaluate(snn, loader, ["layered", "RS"], steps_after_output=[0, 1])
    two = evaluate(snn, loader, ["layered", "RS"], steps_after_output=[0, 1], seed=1)
    two["RS"].accuracy = 0.5  # a spread between seeds
    return {"Layered": [one, two], "Unlayered RS": [{"RS": one["RS"]}, {"RS": two["RS"]}]}


def test_markdown_table_layout():
    rows = report.table_rows(_results())
    text = report.markdown_table(rows, title="hand case")
    lines = text.strip().splitlines()
    assert lines[0] == "**hand case** (mean ± std over 2 seeds)"
    assert lines[2].startswith("| Training | Inference | Acc. | Density | SOs | Energy [")
    assert lines[3].startswith("|---|---|---:|")
    body = [l.split(" | ") for l in lines[4:]]
    assert [(b[0].strip("| "), b[1]) for b in body] == [
        ("Layered", "Layered"), ("Layered", "Async RS"), ("Unlayered RS", "Async RS")]
    assert body[1][2] == "0.750 ± 0.354"  # accuracy mean ± sample std of (1.0, 0.5)
    assert body[0][3] == "0.750 ± 0.000"
    single = report.markdown_table(report.table_rows({"Layered": _results()["Layered"][0]}))
    assert "±" not in single and "| Layered | Layered | 1.000 | 0.750 | 6 | 1.56 |" in single


def test_write_report_files(tmp_path):
    paths = report.write_report(tmp_path / "out", _results(), title="hand", extra={"note": 1})
    for key in ("latency", "accuracy_vs_steps", "currents_to_spike"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["results"].read_text())
    assert data["extra"] == {"note": 1} and len(data["results"]["Layered"]) == 2
    assert data["results"]["Layered"][0]["RS"]["per_sample"]["synops"] == [8, 4]
    assert paths["table"].read_text().startswith("**hand**")
