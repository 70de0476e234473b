"""`python -m asynctrain.audit` on tiny data: arguments, mismatches, the report, the
fine-tuned model written back; the snnTorch -> NIR -> audit recipe at tiny size."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("nir")

from asynctrain import AsyncSNN, SimConfig  # noqa: E402
from asynctrain import audit as audit_cli  # noqa: E402
from asynctrain import nir as anir  # noqa: E402
from asynctrain.checkpoint import load_model, save_model  # noqa: E402
from fixtures import load_recipe  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _mlp(sizes, seed=0, gain=2.0, shift=0.1):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:])])
    with torch.no_grad():
        for m in net:
            m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * gain / m.in_features ** 0.5
                           + shift)
    return AsyncSNN(net, SimConfig(K=2, tau=5.0, theta=0.3, surrogate_steepness=2.0, seed=1),
                    backend="torch")


def _pt(path, n=24, T=3, shape=(2, 2, 2), classes=3, train=True):
    g = torch.Generator().manual_seed(3)
    blob = dict(frames=(torch.rand(n, T, *shape, generator=g) < 0.5).to(torch.uint8),
                labels=torch.arange(n) % classes)
    if train:
        blob.update(train_frames=(torch.rand(n, T, *shape, generator=g) < 0.5).float(),
                    train_labels=torch.arange(n) % classes)
    torch.save(blob, path)
    return path


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        audit_cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--data", "--finetune-epochs EPOCHS", "(default: 8)", "--eval [EXECUTION ...]",
                  "(default: audit-out)", "--presets", "--quick", "--fresh", "--max-test"):
        assert piece in text
    assert "--max-samples" not in text and "--finetune " not in text  # deprecated: hidden


@pytest.mark.parametrize("argv, match", [
    (["missing.nir", "--data", "digits"], "no such file"),
    (["{model}", "--data", "mnist"], "choose nmnist, shd, dvs_gesture, digits or a .pt"),
    (["{model}", "--data", "nmnist", "--data-dir", "/nonexistent"], "is not a folder"),
    (["{model}", "--data", "digits", "--eval", "RS:K=0"], "K must be an integer >= 1, got '0'"),
    (["{model}", "--data", "digits", "--finetune-epochs", "-1"],
     "--finetune-epochs: expected an integer >= 0"),
    (["{model}", "--data", "digits", "--T", "0"], "argument --T: expected an integer > 0"),
    (["{model}", "--data", "digits", "--refractory-dropout", "2"], "a probability in [0, 1]"),
    (["{model}", "--data", "digits", "--out", "{model}"], "is a file, not a folder"),
    (["{model}", "--data", "nothere.pt"], "no such file"),
])
def test_arguments_checked_before_loading(tmp_path, monkeypatch, capsys, argv, match):
    model = tmp_path / "m.pt"
    save_model(model, _mlp([8, 4, 3]))
    monkeypatch.setattr(audit_cli, "load_data", lambda *a, **k: pytest.fail("data loaded"))
    monkeypatch.setattr(audit_cli, "load_model_file", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        audit_cli.main([s.format(model=model) for s in argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_model_data_mismatch_named(tmp_path, capsys):
    model = tmp_path / "m.nir"
    anir.write(model, _mlp([12, 4, 3]))
    assert audit_cli.main([str(model), "--data", "digits", "--T", "2", "--no-progress"]) == 2
    assert "takes 12 input features but data 'digits' has 64" in capsys.readouterr().err
    anir.write(model, _mlp([64, 4, 3]))
    assert audit_cli.main([str(model), "--data", "digits", "--T", "2", "--no-progress"]) == 2
    assert "has 3 outputs but data 'digits' has 10 classes" in capsys.readouterr().err
    data = _pt(tmp_path / "d.pt", train=False)
    anir.write(model, _mlp([8, 4, 3]))
    assert audit_cli.main([str(model), "--data", str(data), "--finetune-epochs", "1",
                           "--no-progress"]) == 2
    assert "needs ['train_frames', 'train_labels'] for --finetune-epochs" in capsys.readouterr().err


def test_unreadable_models_named(tmp_path, capsys):
    for name in ("bad.nir", "bad.pt"):
        (tmp_path / name).write_bytes(b"not a model")
        assert audit_cli.main([str(tmp_path / name), "--data", "digits", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert name in err and ("not a readable NIR file" in err or "not a readable torch file" in err)


def test_bad_data_files_named(tmp_path, capsys):
    model = tmp_path / "m.nir"
    anir.write(model, _mlp([8, 4, 3]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert audit_cli.main([str(model), "--data", str(bad), "--no-progress"]) == 2
    assert "bad.pt: not a readable torch file" in capsys.readouterr().err
    torch.save({"frames": torch.zeros(4, 2, 8), "labels": torch.zeros(3)}, bad)
    assert audit_cli.main([str(model), "--data", str(bad), "--no-progress"]) == 2
    assert "labels must be [N] with N = 4" in capsys.readouterr().err
    torch.save({"frames": torch.zeros(4, 8), "labels": torch.zeros(4)}, bad)
    assert audit_cli.main([str(model), "--data", str(bad), "--no-progress"]) == 2
    assert "frames must be a tensor [N, T, ...]" in capsys.readouterr().err


def test_audit_and_finetune_on_a_small_pt(tmp_path, capsys):
    model = tmp_path / "m.pt"
    snn = _mlp([8, 6, 3])
    save_model(model, snn)
    data = _pt(tmp_path / "d.pt")
    out = tmp_path / "out"
    rc = audit_cli.main([str(model), "--data", str(data), "--out", str(out), "--eval", "RS:K=1",
                         "RS:K=4", "MS:K=1", "MS:K=4", "--presets", "loihi", "speck",
                         "--steps-after-output", "0", "1", "--finetune-epochs", "2", "--lr", "0.05",
                         "--batch-size", "8", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for piece in ("| As given | Layered |", "| As given | Async RS (K=1) |", "Async MS (K=4)",
                  "| As given | Async RS (K=2) |",
                  "loihi (barrier/layer", "Fine-tuned unlayered MS (2 epochs)", "| F=0 | F=1 | drain |"):
        assert piece in text, piece
    assert re.search(r"The model (loses|gains) \d\.\d{3} accuracy under asynchronous RS", text)
    assert re.search(r"Fine-tuned, it (loses|gains) \d\.\d{3} accuracy", text)
    for name in ("audit.md", "table.md", "results.json", "latency.png", "accuracy_vs_steps.png",
                 "currents_to_spike.png", "finetuned.nir", "finetuned.pt", "finetune.jsonl"):
        assert (out / name).is_file(), name
    # the fine-tuned model, read back both ways, is one model and not the original
    from_nir = anir.from_nir(out / "finetuned.nir", backend="torch")
    from_ck, _ = load_model(out / "finetuned.pt", backend="torch")
    frames = torch.load(data, weights_only=True)["frames"][:6].float().flatten(2).transpose(0, 1)
    with torch.no_grad(), from_nir.configured(policy="layered"), from_ck.configured(policy="layered"):
        assert torch.equal(from_nir(frames), from_ck(frames))
    assert not torch.equal(from_ck.net[0].weight, snn.net[0].weight)
    assert from_ck.cfg.refractory_dropout == 0.0  # training knobs are not kept


def test_barrier_preset_gives_layered_results():
    snn = _mlp([8, 6, 5, 3], seed=4, gain=1.0, shift=0.3)
    g = torch.Generator().manual_seed(5)
    frames = (torch.rand(3, 16, 8, generator=g) < 0.5).float()
    loader = [(frames, torch.arange(16) % 3)]
    res = audit_cli.audit(snn, loader, Ks=(2,), presets=("loihi", "speck"),
                          steps_after_output=(0,), progress=False)
    assert res["layered"].passes_with_output > 0.5
    for key in ("accuracy", "synops", "density"):
        assert getattr(res["preset:loihi"], key) == getattr(res["layered"], key), key
    assert "MS:K=2" not in res  # the model's own K is not repeated in the sweep
    sentence = audit_cli.loss_sentence(res)
    assert "loses" in sentence and f"{res['layered'].accuracy:.3f}" in sentence
    better = dict(res, RS=dataclasses.replace(res["RS"], accuracy=res["layered"].accuracy + 0.25))
    assert "gains 0.250 accuracy under asynchronous RS" in audit_cli.loss_sentence(better)


def test_recipe_data_match_the_recipes():
    for name, spec in audit_cli.RECIPE_DATA.items():
        mod = load_recipe(name, f"_recipe_{name}")
        assert mod.HYPER.dt == spec["dt"], name
        assert mod.SPEC.name == name


def test_byom_recipe_tiny(tmp_path, capsys):
    pytest.importorskip("snntorch")
    mod = load_recipe("byom_snntorch", "_byom")
    rc = mod.main(["--quick", "--out", str(tmp_path), "--hidden", "8", "--T", "3",
                   "--max-train", "32", "--max-test", "16", "--eval", "MS:K=2", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "output spikes identical" in text and "--quick: --epochs 1, --finetune-epochs 1" in text
    out = tmp_path / "quick"
    assert (out / "model.nir").is_file() and (out / "finetuned.nir").is_file()
    assert "| As given | Layered |" in text and "Async MS (K=2)" in text


def test_byom_checks_out_before_training_and_keeps_other_runs(tmp_path, capsys, monkeypatch):
    pytest.importorskip("snntorch")
    mod = load_recipe("byom_snntorch", "_byom2")
    monkeypatch.setattr(mod, "train_snntorch", lambda *a: pytest.fail("trained before the check"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path / "f" / "o"), "--no-progress"])
    assert e.value.code == 2 and "is a file, so no folder can be made" in capsys.readouterr().err
    # a folder holding the results of a run with other settings
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / mod.RECORD).write_text('{"hidden": [64]}')
    assert mod.main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another run (hidden: [64] there, [32, 32, 32] here" in err
    assert "--fresh replaces them" in err


def test_audit_on_a_recipe_data_set(tmp_path, capsys):
    """N-MNIST through tonic's layout (a tiny fixture), framed at the recipe's dt."""
    from fixtures import write_nmnist

    rng = torch.Generator().manual_seed(0)
    for train in (True, False):
        samples = [(d % 10, [(int(x), int(y), int(p), int(t)) for x, y, p, t in zip(
            torch.randint(0, 34, (60,), generator=rng), torch.randint(0, 34, (60,), generator=rng),
            torch.randint(0, 2, (60,), generator=rng),
            torch.randint(0, 100_000, (60,), generator=rng))]) for d in range(6)]
        write_nmnist(tmp_path / "data", samples, train=train)
    model = tmp_path / "m.pt"
    snn = _mlp([2312, 6, 10], gain=8.0)
    snn.cfg = snn.cfg.replace(dt=5.0)
    save_model(model, snn)
    rc = audit_cli.main([str(model), "--data", "nmnist", "--data-dir", str(tmp_path / "data"),
                         "--min-files", "6", "--out", str(tmp_path / "out"), "--eval", "--presets",
                         "--steps-after-output", "0", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    # no sweep, no presets: the currents-to-spike figure draws one bar per fan-in value
    # (2313 here), which is most of this test's time
    assert "data nmnist: 6 test samples" in text and "| As given | Async RS (K=2) |" in text
    assert "K=1" not in text and "speck" not in text
    assert "nmnist is framed at 10 ms per frame" in text and "dt = 5 ms" in text


def test_audit_conv_nir_on_image_frames(tmp_path, capsys):
    from asynctrain.models.vgg7 import vgg7

    torch.manual_seed(0)
    net = vgg7(num_classes=3, width=1 / 32, image_size=8)
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0).add_(0.1)
    model = tmp_path / "vgg.nir"
    # K=64: a few forward steps per pass keep the async runs of this conv net short
    anir.write(model, AsyncSNN(net, SimConfig(K=64, tau=30.0, theta=0.25), backend="torch"))
    data = _pt(tmp_path / "img.pt", n=8, T=2, shape=(3, 8, 8))
    rc = audit_cli.main([str(model), "--data", str(data), "--out", str(tmp_path / "out"),
                         "--eval", "RS:K=64", "MS:K=64", "--presets", "loihi", "spinnaker",
                         "speck", "--neurons-per-core", "16", "--steps-after-output", "0",
                         "--finetune-epochs", "1", "--batch-size", "4", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "spinnaker (timer/core: K=16" in text and "layers [192, 128, 128, 64, 64" in text
    back = anir.from_nir(tmp_path / "out" / "finetuned.nir", backend="torch")
    assert back.graph.input_shape == (3, 8, 8)


def test_one_audit_per_folder_and_the_old_option_names(tmp_path, capsys):
    model = tmp_path / "m.pt"
    save_model(model, _mlp([8, 6, 3]))
    data = _pt(tmp_path / "d.pt")
    out = tmp_path / "out"
    base = [str(model), "--data", str(data), "--out", str(out), "--presets", "--eval",
            "--steps-after-output", "--batch-size", "8", "--no-progress"]
    with pytest.warns(FutureWarning, match="--finetune is deprecated and will be removed: use "
                                           "--finetune-epochs"):
        assert audit_cli.main(base + ["--finetune", "1"]) == 0
    first = (out / "finetuned.pt").read_bytes()
    capsys.readouterr()
    # another audit into the same folder: refused before any work, naming the difference
    assert audit_cli.main(base + ["--finetune-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another run (finetune_epochs: 1 there, 2 here)" in err
    assert "--fresh replaces them" in err and (out / "finetuned.pt").read_bytes() == first
    # the same audit again replaces its own results; --fresh replaces another's
    assert audit_cli.main(base + ["--finetune-epochs", "1"]) == 0
    assert audit_cli.main(base + ["--finetune-epochs", "2", "--fresh"]) == 0
    assert (out / "finetune.jsonl").read_text().count('"event": "epoch"') == 2
    with pytest.warns(FutureWarning, match="--max-samples is deprecated"):
        assert audit_cli.main(base + ["--max-samples", "6", "--fresh", "--out", str(tmp_path / "o2")]) == 0
    assert "6 test samples" in capsys.readouterr().out


def test_nan_frames_in_a_data_file_exit_2_naming_the_sample(tmp_path, capsys):
    model = tmp_path / "m.pt"
    save_model(model, _mlp([8, 6, 3]))
    frames = torch.zeros(5, 3, 8)
    frames[3, 1, 2] = float("nan")
    torch.save({"frames": frames, "labels": torch.arange(5) % 3}, tmp_path / "nan.pt")
    assert audit_cli.main([str(model), "--data", str(tmp_path / "nan.pt"), "--out",
                           str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nan.pt: frames of 1 sample(s) hold NaN/inf values, first sample 3" in err
    assert "Traceback" not in err
