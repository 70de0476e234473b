"""Training loop shared by the recipes and the demo (SPEC 8).

    history = fit(snn, train_loader, epochs=50, lr=5e-4, weight_decay=1e-5,
                  log_path="run/train.jsonl", checkpoint_path="run/model.pt", seed=0)

The execution being trained (layered, or unlayered RS / MS with its K) and the
training-only regularisers of SPEC 8 (input spike dropout, network spike dropout,
refractory dropout, momentum noise) are fields of ``snn.cfg``; `fit` runs the module in
training mode, so they apply, and adds the last regulariser, weight decay, through
Adam (``torch.optim.Adam(weight_decay=...)`` adds ``weight_decay * w`` to the
gradient, i.e. an L2 term in the loss as in the paper).

Reproducibility: every epoch starts by seeding torch's RNG from ``(seed, epoch)``
(so a shuffling DataLoader draws the same order whether or not the run was resumed)
and every forward call gets its own seed from ``(seed, epoch, batch)``. Hence
"train 2 epochs" and "train 1 epoch, stop, resume for 1 more" give identical weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from . import rng
from .checkpoint import config_diff, load_into, read_checkpoint, save_model
from .config import describe, short
from .evaluate import evaluate, logits_of
from .guards import (TrainingDiverged, check_batch, check_before_training, check_device,
                     check_finite, check_loss, run_settings, unpack_batch, warn_if_silent)
from .module import AsyncSNN
from .outdir import OutputError

__all__ = ["fit", "logits_of", "LOSSES", "LR_SCHEDULES", "scheduled_lr", "TrainingDiverged",
           "save_checkpoint", "load_checkpoint",
           "call_seed", "check_finite"]

_STREAM_FIT = 101  # counter-hash stream of fit's seeds (the engine uses 1-5)

LR_SCHEDULES = (None, "cosine")


def scheduled_lr(lr: float, schedule: str | None, epoch: int, epochs: int) -> float:
    """Adam's learning rate in epoch `epoch` (from 0) of `epochs` (`fit`'s `lr_schedule`)."""
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    return lr


def _loss_counts(out: torch.Tensor, labels: torch.Tensor, readout: str) -> torch.Tensor:
    return F.cross_entropy(logits_of(out, readout), labels)


def _loss_rate(out: torch.Tensor, labels: torch.Tensor, readout: str) -> torch.Tensor:
    return F.cross_entropy(logits_of(out, readout) / (out.shape[0] if readout == "counts" else 1),
                           labels)


def _loss_per_pass(out: torch.Tensor, labels: torch.Tensor, readout: str) -> torch.Tensor:
    T, B, C = out.shape
    return F.cross_entropy(out.reshape(T * B, C), labels.repeat(T))


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]] = {
    "counts": _loss_counts, "rate": _loss_rate, "per_pass": _loss_per_pass}
"""Cross-entropy variants (`fit(loss=...)`); the prediction is always the argmax of
`logits_of`. "counts": softmax of the output counts summed over the timesteps
(SPEC 8, the default). "rate": of the mean count per pass (counts / T: a softmax
temperature of T; gentler when T is large). "per_pass": the mean over passes of the
cross-entropy of each pass's counts (snntorch's ``ce_rate_loss``, used by the paper's
code examples): every pass is pushed to rank the right class first."""


def call_seed(seed: int, epoch: int, batch: int) -> int:
    """Seed of one forward call: a hash of (seed, epoch, batch), in [0, 2**32)."""
    return rng.counter_hash(int(seed), _STREAM_FIT, int(epoch), int(batch))


def fit(snn: AsyncSNN, train_loader: Iterable, epochs: int, lr: float,
        weight_decay: float = 0.0, *, seed: int = 0, log_path: str | os.PathLike | None = None,
        checkpoint_path: str | os.PathLike | None = None, resume: bool = True,
        progress: bool = True, desc: str | None = None, max_batches: int | None = None,
        device: str | torch.device | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        loss: str | Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor] = "counts",
        stop: str | None = None, steps_after_output: int | None = None,
        init_from: str | os.PathLike | dict | None = None, val_loader: Iterable | None = None,
        val_execution: str | None = None, recipe_args: dict[str, Any] | None = None,
        lr_schedule: str | None = None,
        ) -> list[dict[str, Any]]:
    """Train `snn` with Adam and cross-entropy on its logits (`logits_of`).

    Args:
        snn: the module; its ``cfg`` fixes the execution trained through and the
            regularisers (the paper trains with ``stop="spiking_done"``).
        train_loader: yields ``(frames [T, B, F] float, labels [B] int64)``
            (a DataLoader with ``collate_fn=asynctrain.data.collate_time_major``).
        epochs: total epochs; with a resumed checkpoint, only the missing ones run.
        lr, weight_decay: Adam's learning rate and L2 coefficient.
        seed: root of all randomness of the run (shuffling, dropouts, RS keys, noise).
        log_path: JSON-lines log; one ``{"event": "epoch", ...}`` line per epoch
            (mean loss, training accuracy, forward steps per pass, synops and hidden
            spikes per sample, capped passes, seconds), plus "start", "resume" and
            "abort" lines. Appended to, so a resumed run continues its log.
        checkpoint_path: written atomically (temporary file + rename) after every
            epoch in the `asynctrain.checkpoint` format: model, weights, SimConfig,
            Adam state, epoch, history, seed, lr, weight decay, loss, `recipe_args`.
            With `resume` and an existing file, training continues from it (after
            checking that it was made with the same model and settings; a difference
            is named). Checked writable before training.
        max_batches: stop each epoch after this many batches (smoke runs).
        device: move frames and labels there (default: where the weights are).
        on_epoch_end: called with each epoch's record (e.g. to evaluate).
        loss: a name of `LOSSES` ("counts", "rate", "per_pass") or a callable
            ``(out [T, B, C], labels [B], readout) -> scalar``.
        stop, steps_after_output: the stop condition of the *training* passes
            ("spiking_done", or "output" with F = `steps_after_output`); None keeps
            ``snn.cfg``'s. Applied for the call only (``snn.cfg`` is unchanged after).
        init_from: warm start: a checkpoint path (of `save_checkpoint`, e.g. a layered
            run's ``model.pt``) or a ``net`` state dict; its weights are loaded before
            the first epoch (not its optimizer state, epoch or history). Ignored when
            training resumes from `checkpoint_path`. Fine-tuning a layered model
            unlayered: ``fit(unlayered_snn, loader, 5, lr, init_from="layered/model.pt")``.
        recipe_args: stored in the checkpoint as ``args`` (a recipe's command line), so
            ``--eval-only`` and ``--resume`` can rebuild the run from the file alone.
        lr_schedule: None (constant `lr`) or "cosine": epoch e (from 0) of `epochs`
            trains at ``lr * (1 + cos(pi e / epochs)) / 2`` (set at the start of each
            epoch, so a resumed run continues the same schedule). On the demo data with
            queued input it was worth +0.01 to +0.03 validation accuracy for unlayered
            MS over 40 epochs (docs/unlayered_training.md, round 2).
        val_loader: evaluated after every epoch under `val_execution` (default: the
            trained policy with the paper's inference stop, or "layered"); adds
            ``val_accuracy`` and ``val_density`` to the epoch record.

    Returns: the history, one record per completed epoch (the resumed ones included).

    Raises: TrainingDiverged at the first NaN or infinite loss, gradient or weight
    (naming epoch, batch and tensor); nothing of that epoch is saved, so the last
    checkpoint holds the last finite state. ValueError before the first epoch for an
    empty or batch-first loader or an unwritable path, during it for a batch whose
    frames are not ``[T, B, ...]``. `asynctrain.checkpoint.CheckpointError` for a
    checkpoint that cannot be resumed. Warns (RuntimeWarning) after an epoch in which
    at least 90% of the passes had no output spike.
    """
    if stop is not None or steps_after_output is not None:
        # the training stop condition: run the whole call under it, then restore
        with snn.configured(**_stop_changes(snn, stop, steps_after_output)):
            return fit(snn, train_loader, epochs, lr, weight_decay, seed=seed, log_path=log_path,
                       checkpoint_path=checkpoint_path, resume=resume, progress=progress,
                       desc=desc, max_batches=max_batches, device=device,
                       on_epoch_end=on_epoch_end, loss=loss, init_from=init_from,
                       val_loader=val_loader, val_execution=val_execution,
                       recipe_args=recipe_args, lr_schedule=lr_schedule)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    params = [p for p in snn.parameters() if p.requires_grad]
    if not params:
        raise ValueError("snn has no trainable parameters")
    device = check_device(device, params[0].device) if device is not None else params[0].device
    settings = run_settings(seed, lr, weight_decay, loss)
    settings["lr_schedule"] = lr_schedule  # None: constant (older checkpoints lack the key)
    check_before_training(train_loader, checkpoint_path, log_path, val_loader)
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
        loss = LOSSES[loss]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history: list[dict[str, Any]] = []
    log = _JsonLines(log_path)
    start = 0
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        start, history = _resume(checkpoint_path, snn, opt, settings, epochs, log)
    else:
        log.write(event="start", epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
                  layers=list(snn.graph.layer_sizes), cfg=describe(snn.cfg))
        if init_from is not None:
            log.write(event="init_from", source=_load_init(snn, init_from))
    if start >= epochs:
        return history

    try:
        n_batches = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    if n_batches is not None and max_batches is not None:
        n_batches = min(n_batches, max_batches)
    bar = _progress(progress, desc or f"train {snn.cfg.policy}",
                    None if n_batches is None else (epochs - start) * n_batches)
    snn.train()
    try:
        for epoch in range(start, epochs):
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(lr, lr_schedule, epoch, epochs)
            record = _one_epoch(snn, opt, train_loader, epoch, seed, device, max_batches,
                                bar, log, loss)
            if val_loader is not None:
                try:
                    record.update(_validate(snn, val_loader, val_execution, seed))
                except Exception:  # the trained epoch is kept, without its validation
                    if checkpoint_path is not None:
                        save_checkpoint(checkpoint_path, snn, opt, epoch=epoch + 1,
                                        history=[*history, record], **settings,
                                        args=dict(recipe_args or {}))
                    raise
            history.append(record)
            log.write(event="epoch", **record)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, snn, opt, epoch=epoch + 1, history=history,
                                **settings, args=dict(recipe_args or {}))
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        if bar is not None:
            bar.close()
    return history


def _one_epoch(snn: AsyncSNN, opt: torch.optim.Optimizer, loader: Iterable, epoch: int,
               seed: int, device: torch.device, max_batches: int | None, bar: Any,
               log: "_JsonLines", loss_fn: Callable) -> dict[str, Any]:
    # Seeding here (not once per run) makes the shuffle of epoch e independent of
    # whether epochs 0..e-1 ran in this process or in one that was resumed.
    torch.manual_seed(call_seed(seed, epoch, 2**31 - 1))
    t0 = time.perf_counter()
    sums = dict(loss=0.0, correct=0, samples=0, steps=0.0, passes=0, synops=0.0,
                hidden=0.0, capped=0, batches=0, with_output=0)
    last_loss = None
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        where = f"train_loader, epoch {epoch + 1}, batch {b + 1}"
        frames, labels = unpack_batch(batch, where)
        check_batch(frames, labels, where, snn.graph.n_outputs)
        frames, labels = frames.to(device), labels.to(device)
        out = snn(frames, seed=call_seed(seed, epoch, b))
        logits = logits_of(out, snn.cfg.readout)
        loss = loss_fn(out, labels, snn.cfg.readout)
        check_loss(loss, where)
        _check_finite(snn, "loss", epoch, b, log, opt, loss=loss, last_loss=last_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _check_finite(snn, "gradient", epoch, b, log, opt)
        opt.step()
        _check_finite(snn, "weight", epoch, b, log, opt)
        last_loss = loss.item()
        st = snn.stats
        fo = st["first_output_step"]
        sums["with_output"] += int((fo > 0).sum())
        B = labels.numel()
        sums["loss"] += last_loss * B
        sums["correct"] += int((logits.argmax(1) == labels).sum())
        sums["samples"] += B
        sums["steps"] += float(st["forward_steps"].sum())
        sums["passes"] += st["forward_steps"].numel()
        sums["synops"] += float(st["synops"].sum())
        sums["hidden"] += float(st["hidden_spikes"].sum())
        sums["capped"] += int(st["capped_passes"])
        sums["batches"] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{last_loss:.3f}",
                            acc=f"{sums['correct'] / sums['samples']:.3f}", refresh=False)
    if sums["batches"] == 0:
        raise ValueError(f"train_loader yielded no batch in epoch {epoch + 1}; nothing was "
                         f"trained or saved (an empty data set, or a sampler with nothing left?)")
    warn_if_silent(sums["with_output"] / max(sums["passes"], 1), snn.cfg.readout, epoch,
                    sums["loss"] / sums["samples"])
    n = max(sums["samples"], 1)
    return dict(epoch=epoch + 1, loss=sums["loss"] / n, train_accuracy=sums["correct"] / n,
                passes_with_output=sums["with_output"] / max(sums["passes"], 1),
                forward_steps_per_pass=sums["steps"] / max(sums["passes"], 1),
                synops_per_sample=sums["synops"] / n, hidden_spikes_per_sample=sums["hidden"] / n,
                capped_passes=sums["capped"], batches=sums["batches"], samples=sums["samples"],
                seconds=time.perf_counter() - t0)


def _stop_changes(snn: AsyncSNN, stop: str | None, steps_after_output: int | None) -> dict:
    changes: dict[str, Any] = {}
    if stop is not None:
        changes["stop"] = stop
    if steps_after_output is not None:
        changes["steps_after_output"] = steps_after_output
    snn.cfg.replace(**changes)  # raises on a bad value, naming it
    return changes


def _load_init(snn: AsyncSNN, source: str | os.PathLike | dict) -> str:
    """Warm start: weights only, from a checkpoint path or a state dict."""
    if isinstance(source, dict):
        snn.net.load_state_dict(source.get("net", source))
        return "<state dict>"
    if not Path(source).is_file():
        raise FileNotFoundError(f"init_from={str(source)!r}: no such checkpoint")
    load_checkpoint(source, snn)
    return str(source)


def _validate(snn: AsyncSNN, loader: Iterable, execution: str | None, seed: int) -> dict:
    ex = execution or ("layered" if snn.cfg.policy == "layered" else snn.cfg.policy)
    try:
        r = next(iter(evaluate(snn, loader, [ex], steps_after_output=None, seed=seed).values()))
    except ValueError as err:
        raise ValueError(f"val_loader: {err}") from err
    return dict(val_execution=r.execution, val_accuracy=r.accuracy, val_density=r.density)


# ------------------------------------------------------------------ checkpoints
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


# ----------------------------------------------------------- checks of fit's run
def _check_finite(snn: AsyncSNN, what: str, epoch: int, b: int, log: "_JsonLines",
                  opt: torch.optim.Optimizer, **loss: Any) -> None:
    """`guards.check_finite`, the abort logged; `loss`: its loss and last_loss."""
    try:
        check_finite(snn, what, epoch, b, lr=opt.param_groups[0]["lr"], **loss)
    except TrainingDiverged as err:
        log.write(event="abort", epoch=epoch + 1, batch=b + 1, reason=str(err))
        raise


def _resume(path: Any, snn: AsyncSNN, opt: torch.optim.Optimizer, settings: dict[str, Any],
            epochs: int, log: "_JsonLines") -> tuple[int, list[dict[str, Any]]]:
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
    start, history = int(ck["meta"].get("epoch") or 0), list(ck["meta"].get("history") or [])
    print(f"resumed from {path} at epoch {start}" + (
        f" (already {start} >= epochs={epochs}: nothing to train)" if start >= epochs else ""))
    log.write(event="resume", epoch=start, checkpoint=str(path))
    return start, history


# ---------------------------------------------------------------------- helpers
class _JsonLines:
    """Appends one JSON object per line; a no-op without a path."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.path is None:
            return
        record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), **record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as err:
            raise OutputError(f"could not write the training log {self.path}: {err}") from err


def _progress(enabled: bool, desc: str, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # leave=True: the finished bar stays on screen as the record of the run
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True)
