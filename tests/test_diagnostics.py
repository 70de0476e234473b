"""diagnostics (gradient norms, reach, cosine with layered) and fit's research
options (training stop, warm start, validation, evaluate without training-only
settings)."""

from __future__ import annotations

import math

import pytest
import torch

import asynctrain as at
from asynctrain.diagnostics import fit_history, gradient_report
from asynctrain.evaluate import evaluate, inference_overrides
from asynctrain.train import fit, save_checkpoint
from test_train_eval import _toy_loader, _toy_snn


def _batch():
    frames, labels = next(iter(_toy_loader()))
    return frames, labels


def _net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10, bias=False), torch.nn.Linear(10, 8, bias=False),
                              torch.nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        for m in net:
            m.weight.mul_(2.0)
    return net


def test_barrier_preset_gradient_equals_layered():
    net = _net()
    cfg = at.SimConfig.preset("barrier", net, policy="MS", theta=0.3, tau=20.0,
                              surrogate_steepness=2.0)
    snn = at.AsyncSNN(net, cfg)
    rep = gradient_report(snn, *_batch(), seed=3)
    assert all(c > 0.999999 for c in rep["cosine_layered"]), rep["cosine_layered"]
    assert rep["reached"] == rep["ref_reached"]
    assert rep["loss"] == pytest.approx(rep["ref_loss"], rel=1e-6)
    for a, b in zip(rep["grad_norm"], rep["ref_grad_norm"]):
        assert a == pytest.approx(b, rel=1e-5)


def test_small_k_unlayered_differs_and_reaches_fewer():
    snn = at.AsyncSNN(_net(), at.SimConfig(policy="MS", K=2, theta=0.3, tau=20.0,
                                           surrogate_steepness=2.0))
    rep = gradient_report(snn, *_batch(), seed=3, training=False)
    assert len(rep["grad_norm"]) == 3 and len(rep["reached"]) == 2
    assert all(0.0 <= r <= 1.0 for r in rep["reached"] + rep["ref_reached"])
    assert rep["ref_reached"][0] == 1.0  # layered delivers every neuron
    finite = [c for c in rep["cosine_layered"] if not math.isnan(c)]
    assert finite and min(finite) < 0.999  # a different execution, a different gradient


def test_fit_stop_validation_and_history():
    snn = _toy_snn("MS")
    hist = fit(snn, _toy_loader(), epochs=2, lr=2e-2, seed=1, progress=False,
               stop="output", steps_after_output=1, val_loader=_toy_loader(seed=5))
    assert snn.cfg.stop == "spiking_done"  # the training stop was for the call only
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_execution"] == "MS" for r in hist)
    rows = fit_history(hist)
    assert [r["epoch"] for r in rows] == [1, 2] and "train_accuracy" in rows[0]
    # training stopped at the output: fewer forward steps than draining every pass
    deep = lambda: at.AsyncSNN(_net(), at.SimConfig(policy="MS", K=2, theta=0.3, tau=20.0))  # noqa
    early = fit(deep(), _toy_loader(), epochs=1, lr=1e-3, seed=1, progress=False, stop="output",
                steps_after_output=0)
    drained = fit(deep(), _toy_loader(), epochs=1, lr=1e-3, seed=1, progress=False)
    assert early[0]["forward_steps_per_pass"] < drained[0]["forward_steps_per_pass"]
    with pytest.raises(ValueError, match="stop"):
        fit(_toy_snn("MS"), _toy_loader(), epochs=1, lr=1e-2, progress=False, stop="never")


def test_fit_init_from_checkpoint(tmp_path):
    layered = _toy_snn("layered", seed=1)
    fit(layered, _toy_loader(), epochs=2, lr=2e-2, seed=1, progress=False)
    save_checkpoint(tmp_path / "layered.pt", layered, None, epoch=2)
    fresh = _toy_snn("MS", seed=2)
    fit(fresh, _toy_loader(), epochs=0, lr=1e-2, progress=False, init_from=tmp_path / "layered.pt")
    for a, b in zip(fresh.net.parameters(), layered.net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fit(_toy_snn("MS"), _toy_loader(), epochs=1, lr=1e-2, progress=False,
            init_from=tmp_path / "missing.pt")


def test_evaluate_drops_training_only_settings():
    snn = _toy_snn("MS")
    cfg = snn.cfg.replace(barrier_messages=True)
    over = inference_overrides(cfg, dict(policy="MS"))
    assert over["barrier_messages"] is False and over["input_dropout"] == 0.0
    # with sync thresholds above 1 barrier messages are the chip's semantics: kept
    net = _net()
    barrier = at.SimConfig.preset("barrier", net)
    assert "barrier_messages" not in inference_overrides(barrier, {})
    # evaluating a model configured with the workaround equals evaluating it without
    loader = list(_toy_loader(seed=4))  # one fixed order of batches
    with_fill = evaluate(at.AsyncSNN(snn.net, cfg), loader, ["RS"], steps_after_output=None)
    plain = evaluate(at.AsyncSNN(snn.net, snn.cfg), loader, ["RS"], steps_after_output=None)
    assert with_fill["RS"].accuracy == plain["RS"].accuracy
    assert with_fill["RS"].synops == plain["RS"].synops


def test_hyper_gradient_fill_is_a_deprecated_alias_of_fill_slots():
    from asynctrain.experiment import Hyper, train_config

    with pytest.warns(FutureWarning, match="fill_slots"):
        cfg = train_config(Hyper(gradient_fill=True), "MS")
    assert cfg.fill_slots and not cfg.barrier_messages
    assert not train_config(Hyper(fill_slots=True), "layered").fill_slots  # unlayered only
    assert train_config(Hyper(train_stop="output", train_F=2), "RS").steps_after_output == 2


def test_hyper_defaults_train_unlayered_models_with_the_round_3_recipe():
    """Hyper()'s unlayered-only settings reach the unlayered training configs and not
    the layered one (docs/unlayered_training.md, round 3)."""
    from asynctrain.experiment import Hyper, train_config

    h = Hyper()
    assert (h.lr, h.epochs, h.lr_schedule) == (5e-3, 40, "cosine")
    for policy in ("RS", "MS"):
        cfg = train_config(h, policy)
        assert (cfg.stop, cfg.steps_after_output, cfg.surrogate_at) == ("output", 1, "fire_or_last")
        assert cfg.detach_reset and cfg.fill_slots
    lay = train_config(h, "layered")
    assert (lay.stop, lay.surrogate_at, lay.detach_reset, lay.fill_slots) == \
        ("spiking_done", "every", False, False)
    pinned = Hyper(train_stop="spiking_done", surrogate_at="every", detach_reset=False)
    cfg = train_config(pinned, "RS")
    assert (cfg.stop, cfg.surrogate_at, cfg.detach_reset) == ("spiking_done", "every", False)
    with pytest.raises(ValueError, match="surrogate_at.*'sometimes'"):
        train_config(Hyper(surrogate_at="sometimes"), "MS")


def test_run_models_validation_callback_and_finetune(tmp_path):
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from asynctrain.experiment import Hyper, run_models

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    rate = torch.full((64, 12), 0.05)
    rate[labels == 0, :6] = 0.6
    rate[labels == 1, 6:] = 0.6
    ds = TensorDataset((torch.rand(64, 4, 12, generator=g) < rate[:, None]).float(), labels)
    h = Hyper(hidden=(8,), batch_size=32, epochs=2, lr=1e-2, tau=20.0, K=4)
    seen = []
    res = run_models(ds, ds, 12, 2, {"layered": h, "MS": replace(h, finetune_epochs=1)},
                     ["MS", "layered"], tmp_path, steps_after_output=(), progress=False,
                     val_ds=ds, on_epoch=lambda p, r: seen.append((p, r["epoch"], r["val_accuracy"])),
                     log=lambda s: None)
    assert [(p, e) for p, e, _ in seen] == [("layered", 1), ("layered", 2), ("MS", 1)]
    assert set(res) == {"Layered", "Unlayered MS"}
    lines = (tmp_path / "MS" / "train.jsonl").read_text()
    assert '"init_from"' in lines and "layered" in lines
    with pytest.raises(ValueError, match="fine-tune"):
        run_models(ds, ds, 12, 2, replace(h, finetune_epochs=1), ["MS"], tmp_path / "x",
                   progress=False)


def test_fit_cosine_lr_schedule_sets_each_epochs_lr_and_resumes_on_it(tmp_path):
    from asynctrain.train import scheduled_lr

    assert scheduled_lr(1e-2, None, 3, 4) == 1e-2
    assert [scheduled_lr(1.0, "cosine", e, 4) for e in range(4)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])
    seen = []
    snn = _toy_snn("MS", seed=3)
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.Adam.step = spy
    try:
        fit(snn, _toy_loader(), epochs=2, lr=1e-2, progress=False, lr_schedule="cosine",
            max_batches=1)
    finally:
        torch.optim.Adam.step = orig
    assert seen == pytest.approx([1e-2, 5e-3])
    with pytest.raises(ValueError, match="lr_schedule.*'linear'"):
        fit(_toy_snn("MS"), _toy_loader(), epochs=1, lr=1e-2, progress=False, lr_schedule="linear")
    # 1 + 1 resumed epochs == 2 straight epochs; resuming with another schedule is named
    a, b = _toy_snn("MS", seed=5), _toy_snn("MS", seed=5)
    fit(a, _toy_loader(), epochs=2, lr=1e-2, progress=False, lr_schedule="cosine", seed=1)
    ck = tmp_path / "b.pt"
    fit(b, _toy_loader(), epochs=1, lr=1e-2, progress=False, lr_schedule="cosine", seed=1,
        checkpoint_path=ck)
    fit(b, _toy_loader(), epochs=2, lr=1e-2, progress=False, lr_schedule="cosine", seed=1,
        checkpoint_path=ck)
    for x, y in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(b, _toy_loader(), epochs=3, lr=1e-2, progress=False, seed=1, checkpoint_path=ck)


def test_run_models_trains_at_train_K_and_evaluates_at_K(tmp_path):
    from torch.utils.data import TensorDataset

    from asynctrain.experiment import Hyper, run_models
    from asynctrain.checkpoint import load_model

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 2
    ds = TensorDataset((torch.rand(32, 4, 12, generator=g) < 0.4).float(), labels)
    h = Hyper(hidden=(8,), batch_size=16, epochs=1, lr=1e-2, tau=20.0, K=2, train_K=5)
    res = run_models(ds, ds, 12, 2, h, ["MS"], tmp_path, eval_specs=["MS"],
                     steps_after_output=(), progress=False, log=lambda s: None)
    snn, info = load_model(tmp_path / "MS" / "model.pt")
    assert snn.cfg.K == 5  # the checkpoint keeps the training K
    trained_k5 = evaluate(snn, [(ds.tensors[0].transpose(0, 1), labels)], ["MS:K=5"],
                          steps_after_output=None)["MS:K=5"]
    at_k2 = evaluate(snn, [(ds.tensors[0].transpose(0, 1), labels)], ["MS:K=2"],
                     steps_after_output=None)["MS:K=2"]
    got = res["Unlayered MS"]["MS"]
    assert got.latency_steps == at_k2.latency_steps != trained_k5.latency_steps
