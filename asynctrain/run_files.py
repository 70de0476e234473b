"""The files of a `fit` run: its checkpoint (written, resumed, warm-started from) and
its JSON-lines log.

A checkpoint of `fit` is an `asynctrain.checkpoint` file whose metadata adds the
optimizer state, ``epoch`` (complete epochs), ``history`` (their records), ``step``
(optimizer steps in all), ``batch`` (batches done in an epoch stopped part way by
``max_steps``: a resume skips them) and the run's settings (seed, lr, weight decay,
loss, learning-rate schedule), which a resume must share.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import config_diff, load_into, read_checkpoint, save_model
from .config import short
from .module import AsyncSNN
from .outdir import OutputError

__all__ = ["save_checkpoint", "load_checkpoint", "resume", "load_init", "JsonLines", "Position"]

Position = tuple[int, int, int, list]
"""Where a run stands: (complete epochs, batches done in the next one, optimizer steps,
history)."""


def save_checkpoint(path: str | os.PathLike, snn: AsyncSNN, opt: torch.optim.Optimizer | None,
                    **extra: Any) -> None:
    """`checkpoint.save_model` with the optimizer state (the one format of the
    project: model description, config, version, `extra`); atomic."""
    save_model(path, snn, optimizer=None if opt is None else opt.state_dict(), **extra)


def load_checkpoint(path: str | os.PathLike, snn: AsyncSNN,
                    opt: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into `snn` (and `opt`); returns what the writer stored
    (``epoch``, ``history``, ...) plus ``config`` (the stored `SimConfig`).
    `CheckpointError` (naming the file) for anything unusable."""
    ck = load_into(path, snn, opt)
    return dict(ck["meta"], config=ck["config"], version=ck.get("asynctrain_version"))


def resume(path: Any, snn: AsyncSNN, opt: torch.optim.Optimizer, settings: dict[str, Any],
           epochs: int, log: "JsonLines", say: bool = True) -> Position:
    """Load `path` into `snn` and `opt` after checking it was made by the same run:
    a differing setting is named, with the ways to start over."""
    ck = read_checkpoint(path)
    diffs = [f"{k}: {short(ck['meta'].get(k))} there, {short(v)} here"
             for k, v in settings.items() if ck["meta"].get(k) != v]
    diffs += [f"{n}: {a} there, {b} here" for n, a, b in config_diff(ck["config"], snn.cfg)]
    if diffs:
        raise ValueError(f"checkpoint {path} was trained with other settings ({'; '.join(diffs)}); "
                         f"use the same settings to resume it, or start over: --fresh in the "
                         f"recipes, resume=False for fit, or another --out / checkpoint_path")
    load_into(path, snn, opt, ck=ck)
    meta = ck["meta"]
    start, batch = int(meta.get("epoch") or 0), int(meta.get("batch") or 0)
    history = list(meta.get("history") or [])
    step = int(meta.get("step") or sum(int(r.get("batches", 0)) for r in history) + batch)
    if say:
        print(f"resumed from {path} at epoch {start}" + (f", batch {batch}" if batch else "") + (
            f" (already {start} >= epochs={epochs}: nothing to train)" if start >= epochs else ""))
    log.write(event="resume", epoch=start, batch=batch, step=step, checkpoint=str(path))
    return start, batch, step, history


def load_init(snn: AsyncSNN, source: str | os.PathLike | dict) -> str:
    """Warm start: weights only, from a checkpoint path or a state dict."""
    if isinstance(source, dict):
        snn.net.load_state_dict(source.get("net", source))
        return "<state dict>"
    if not Path(source).is_file():
        raise FileNotFoundError(f"init_from={str(source)!r}: no such checkpoint")
    load_checkpoint(source, snn)
    return str(source)


class JsonLines:
    """Appends one JSON object per line; a no-op without a path."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(f"could not create the folder of the training log {self.path}: "
                                  f"{err}") from err

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), **record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as err:
            raise OutputError(f"could not write the training log {self.path}: {err}") from err
