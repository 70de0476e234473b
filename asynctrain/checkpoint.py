"""One checkpoint format for `fit`, the recipes and ``--eval-only`` / ``--resume``.

    save_model("run/model.pt", snn, epoch=3, args={"width": 0.25}, optimizer=opt.state_dict())
    snn, meta = load_model("run/model.pt")        # the model rebuilt from the file alone
    meta["epoch"], meta["config"], meta["args"], meta["version"]

A checkpoint is self-describing: besides the weights it stores

- ``model``: the layer stack (`describe_model`: every layer's type and sizes, the
  input shape), enough to rebuild the ``nn.Sequential`` without the code that made it;
- ``layer_sizes``: ``[n_inputs, n_1, ..., n_out]`` (for people and for other tools);
- ``config``: every `SimConfig` field (per-neuron knobs as CPU tensors);
- ``asynctrain_version`` and ``torch_version``;
- ``meta``: what the writer adds (`fit`: epoch, history, seed, lr, weight decay, loss,
  optimizer state; the recipes: their arguments under ``args``).

The file is read with ``torch.load(weights_only=True)``: it holds only tensors and
plain Python values, so loading one runs no code. Every load error is a
`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .config import SimConfig, short
from .module import AsyncSNN
from .outdir import saving

__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "save_model", "load_model",
           "read_checkpoint", "load_into", "describe_model", "build_model", "config_to_dict",
           "config_from_dict", "config_diff", "check_writable"]

FORMAT = "asynctrain.checkpoint"
FORMAT_VERSION = 2  # 1: fit's first format (no model description); never read


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


# ------------------------------------------------------------------ model description
def describe_model(net: nn.Module) -> dict[str, Any]:
    """The layer stack of `net` as plain data: ``{"layers": [...], "input_shape": ...}``.

    Layers: ``{"type": "linear", "in": n, "out": m}``, ``{"type": "conv2d", "in": c,
    "out": d, "kernel": 3, "stride": 1, "padding": 1}``, ``{"type": "avgpool2d",
    "kernel": 2}``, ``{"type": "flatten"}`` - the layers `AsyncSNN` accepts.
    """
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    out: list[dict[str, Any]] = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Linear):
            out.append(dict(type="linear", **{"in": m.in_features, "out": m.out_features}))
        elif isinstance(m, nn.Conv2d):
            out.append(dict(type="conv2d", kernel=_one(m.kernel_size), stride=_one(m.stride),
                            padding=_one(m.padding), **{"in": m.in_channels, "out": m.out_channels}))
        elif isinstance(m, nn.AvgPool2d):
            out.append(dict(type="avgpool2d", kernel=_one(m.kernel_size)))
        elif isinstance(m, nn.Flatten):
            out.append(dict(type="flatten"))
        else:
            raise ValueError(f"layer {i} ({type(m).__name__}) cannot be described in a checkpoint")
    shape = getattr(net, "input_shape", None)
    return dict(layers=out, input_shape=None if shape is None else [int(s) for s in shape])


def build_model(desc: dict[str, Any]) -> nn.Sequential:
    """The ``nn.Sequential`` of `describe_model`'s output (fresh weights)."""
    layers: list[nn.Module] = []
    for spec in desc["layers"]:
        kind = spec["type"]
        if kind == "linear":
            layers.append(nn.Linear(spec["in"], spec["out"], bias=False))
        elif kind == "conv2d":
            layers.append(nn.Conv2d(spec["in"], spec["out"], spec["kernel"], stride=spec["stride"],
                                    padding=spec["padding"], bias=False))
        elif kind == "avgpool2d":
            layers.append(nn.AvgPool2d(spec["kernel"]))
        elif kind == "flatten":
            layers.append(nn.Flatten())
        else:
            raise ValueError(f"unknown layer type {kind!r}")
    net = nn.Sequential(*layers)
    if desc.get("input_shape") is not None:
        net.input_shape = tuple(desc["input_shape"])
    return net


def _one(v: Any) -> int:
    """Square kernel / stride / padding as one int (the only kind `AsyncSNN` takes)."""
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"non-square size {v} cannot be described")
        return int(v[0])
    return int(v)


def _model_diff(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """First difference between two model descriptions, in words (None: equal)."""
    la, lb = a["layers"], b["layers"]
    if len(la) != len(lb):
        return f"{len(la)} layers there, {len(lb)} here"
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return f"layer {i}: {_layer_text(x)} there, {_layer_text(y)} here"
    if a.get("input_shape") != b.get("input_shape"):
        return f"input shape {a.get('input_shape')} there, {b.get('input_shape')} here"
    return None


def _layer_text(spec: dict[str, Any]) -> str:
    if "in" in spec:
        return f"{spec['type']} {spec['in']}->{spec['out']}"
    return spec["type"]


# ------------------------------------------------------------------------ config
def config_to_dict(cfg: SimConfig) -> dict[str, Any]:
    """Every field of `cfg`; per-neuron tensors as detached CPU copies."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
    return out


def config_from_dict(d: dict[str, Any], where: str = "checkpoint") -> SimConfig:
    """`SimConfig` of `config_to_dict`'s output. A field this version does not know is
    dropped when it holds that field's usual off value (False, 0, None) and is an error
    otherwise (it would change the execution)."""
    known = {f.name for f in dataclasses.fields(SimConfig)}
    kw = {}
    for k, v in d.items():
        if k in known:
            kw[k] = v
        elif not (v is None or v is False or (isinstance(v, (int, float)) and v == 0)):
            raise CheckpointError(f"{where}: SimConfig field {k}={v!r} is unknown to this "
                                  f"version of asynctrain (written by a newer one?)")
    try:
        return SimConfig(**kw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: stored SimConfig is invalid: {err}") from None


def config_diff(a: SimConfig, b: SimConfig) -> list[tuple[str, str, str]]:
    """Fields that differ: ``[(name, value in a, value in b)]``, values as short text."""
    out = []
    for f in dataclasses.fields(SimConfig):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            same = (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.shape == y.shape and torch.equal(x.cpu(), y.cpu()))
        else:
            same = x == y or (isinstance(x, float) and isinstance(y, float)
                              and math.isnan(x) and math.isnan(y))
        if not same:
            out.append((f.name, short(x), short(y)))
    return out


# ----------------------------------------------------------------------- writing
def check_writable(path: str | os.PathLike, what: str = "checkpoint path") -> Path:
    """Raise ValueError (naming `path`) unless a file can be written at `path`: its
    folder exists and is writable or can be created, and `path` is not a folder.
    Called before training so a bad path fails before an epoch is spent."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    folder = path.parent
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what} {path}: {probe} is a file, so no folder can be made there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {probe} is not writable")
    return path


def check_folder_writable(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Like `check_writable` for an output folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder")
    check_writable(folder / "probe", what)
    return folder


def save_model(path: str | os.PathLike, snn: AsyncSNN, **meta: Any) -> None:
    """Write `snn` (model description, weights, config) and `meta` to `path`,
    atomically: a temporary file in the same folder, then ``os.replace``, so a crash
    mid-write leaves the previous checkpoint intact (`outdir.saving`: a failed write,
    e.g. a full disk, is an `outdir.OutputError` naming the file). `meta` must be plain
    data (numbers, strings, lists, dicts, tensors, optimizer state dicts); `Path`s and
    other objects are stored as their text. Refused (ValueError): a folder as `path`,
    NaN/inf weights (`load_model` would refuse the file)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a file: give a file name such as "
                         f"{path / 'model.pt'}")
    for name, w in snn.net.state_dict().items():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise ValueError(f"not saving {path}: weight {name} holds {int((~torch.isfinite(w)).sum())} "
                             f"NaN/inf values (load_model would refuse the file)")
    state = dict(format=FORMAT, format_version=FORMAT_VERSION, asynctrain_version=__version__,
                 torch_version=str(torch.__version__), model=describe_model(snn.net),
                 layer_sizes=list(snn.graph.layer_sizes), config=config_to_dict(snn.cfg),
                 weights={k: v.detach() for k, v in snn.net.state_dict().items()},
                 meta=_plain(meta))
    with saving(path, "checkpoint") as tmp:
        torch.save(state, tmp)


def _plain(obj: Any) -> Any:
    """`obj` with only what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj] if isinstance(obj, list) else tuple(_plain(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, SimConfig):
        return config_to_dict(obj)
    return str(obj)


# ----------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """The checked contents of a checkpoint file (`CheckpointError` naming the file
    and the problem otherwise): keys format, format_version, asynctrain_version, model,
    layer_sizes, config (a `SimConfig`), weights, meta."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    try:
        ck = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        text = str(err).strip()
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if glob:
            raise CheckpointError(f"checkpoint {path}: holds a Python object ({glob.group(1)}) "
                                  f"besides tensors and plain values; not an asynctrain "
                                  f"checkpoint (loading it would run code)") from None
        first = text.splitlines()[0][:160] if text else ""
        raise CheckpointError(f"checkpoint {path}: not a readable torch file (truncated, "
                              f"corrupt or another format): {type(err).__name__}: {first}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(ck).__name__}, not an "
                              f"asynctrain checkpoint")
    if ck.get("format") != FORMAT:
        if "model" in ck and "optimizer" in ck and "format" not in ck:
            why = "an old cifar_vgg7 checkpoint without a model description"
        elif ck.get("version") == 1:
            why = "an old fit() checkpoint (format 1) without a model description"
        else:
            why = f"no {FORMAT!r} marker (keys: {sorted(map(str, ck))[:8]})"
        raise CheckpointError(f"checkpoint {path}: not an asynctrain checkpoint of format "
                              f"{FORMAT_VERSION}: {why}; train again to get one")
    if ck.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {ck.get('format_version')!r}, "
                              f"this asynctrain reads {FORMAT_VERSION}")
    for key in ("model", "config", "weights"):
        if not isinstance(ck.get(key), dict):
            raise CheckpointError(f"checkpoint {path}: entry {key!r} is missing or not a dict")
    try:
        build_model(ck["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: the model description is invalid: "
                              f"{type(err).__name__}: {err}") from None
    for name, w in ck["weights"].items():
        if not isinstance(w, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: weight {name} is not a tensor")
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise CheckpointError(f"checkpoint {path}: weight {name} holds "
                                  f"{int((~torch.isfinite(w)).sum())} NaN/inf values")
    ck = dict(ck)
    ck["config"] = config_from_dict(ck["config"], where=f"checkpoint {path}")
    ck["meta"] = dict(ck.get("meta") or {})
    return ck


def load_into(path: str | os.PathLike, snn: AsyncSNN, optimizer: torch.optim.Optimizer | None = None,
              ck: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the weights of checkpoint `path` into `snn` (and the optimizer state into
    `optimizer`, when both have one); the model described in the file must be
    `snn`'s. Returns `read_checkpoint`'s dict. Does not touch ``snn.cfg``."""
    ck = read_checkpoint(path) if ck is None else ck
    diff = _model_diff(ck["model"], describe_model(snn.net))
    if diff is not None:
        raise CheckpointError(f"checkpoint {path} holds another model ({diff})")
    try:
        snn.net.load_state_dict(ck["weights"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model: "
                              f"{str(err).splitlines()[0]}") from None
    opt_state = ck["meta"].get("optimizer")
    if optimizer is not None and opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {err}") from None
    return ck


def load_model(path: str | os.PathLike, map_location: Any = None,
               **snn_kwargs: Any) -> tuple[AsyncSNN, dict[str, Any]]:
    """Rebuild the model stored at `path`: returns ``(snn, info)``.

    `snn` is an `AsyncSNN` (keyword arguments such as ``backend=`` are passed on) with
    the stored weights and ``cfg``, on `map_location` (default CPU). `info` holds
    ``epoch`` (completed epochs, None if the writer gave none), ``config`` (the
    `SimConfig`), ``args`` (recipe arguments, {} if none), ``version`` (asynctrain
    version of the writer), ``model`` (`describe_model` dict), ``layer_sizes``,
    ``path`` and every other entry the writer passed to `save_model`.
    """
    ck = read_checkpoint(path, map_location)
    net = build_model(ck["model"])
    snn = AsyncSNN(net, ck["config"], **snn_kwargs)
    load_into(path, snn, ck=ck)
    if map_location is not None:
        snn.to(map_location)
    meta = ck["meta"]
    info = dict(meta, epoch=meta.get("epoch"), config=ck["config"], args=dict(meta.get("args") or {}),
                version=ck.get("asynctrain_version"), model=ck["model"],
                layer_sizes=list(ck.get("layer_sizes") or snn.graph.layer_sizes), path=str(path))
    return snn, info
