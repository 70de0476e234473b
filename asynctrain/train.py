"""Training loop shared by the recipes and the demo (SPEC 8).

    history = fit(snn, train_loader, epochs=50, lr=5e-4, weight_decay=1e-5,
                  log_path="run/train.jsonl", checkpoint_path="run/model.pt", seed=0)

The execution being trained (layered, or unlayered RS / MS with its K) and the
training-only regularisers of SPEC 8 (input spike dropout, network spike dropout,
refractory dropout, momentum noise) are fields of ``snn.cfg``; `fit` runs the module in
training mode, so they apply, and adds the last regulariser, weight decay, through
Adam (``torch.optim.Adam(weight_decay=...)`` adds ``weight_decay * w`` to the
gradient, i.e. an L2 term in the loss as in the paper). The objectives are in
`asynctrain.losses`, the run's files (checkpoint, log) in `asynctrain.run_files`, a
run over several processes in `asynctrain.distributed`.

Reproducibility: every epoch starts by seeding torch's RNG from ``(seed, epoch)``
(so a shuffling DataLoader draws the same order whether or not the run was resumed;
a DistributedSampler gets the epoch) and every forward call gets its own seed from
``(seed, epoch, batch)`` (and the rank). Hence "train 2 epochs" and "train 1 epoch,
stop, resume for 1 more" give identical weights, also when the stop falls inside an
epoch (``max_steps``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import rng
from .config import describe
from .distributed import Distributed
from .evaluate import evaluate, logits_of
from .guards import (TrainingDiverged, check_batch, check_before_training, check_device,
                     check_finite, check_loss, loader_length, run_settings, unpack_batch,
                     warn_if_silent)
from .losses import LOSSES, LR_SCHEDULES, scheduled_lr
from .module import AsyncSNN
from .run_files import JsonLines, load_checkpoint, load_init, resume as resume_from, save_checkpoint

__all__ = ["fit", "logits_of", "LOSSES", "LR_SCHEDULES", "scheduled_lr", "TrainingDiverged",
           "save_checkpoint", "load_checkpoint", "call_seed", "check_finite"]

_STREAM_FIT = 101  # counter-hash stream of fit's seeds (the engine uses 1-5)
_STREAM_RANK = 103  # a rank's seeds, derived from rank 0's


def call_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """Seed of one forward call: a hash of (seed, epoch, batch[, rank]), in [0, 2**32)."""
    s = rng.counter_hash(int(seed), _STREAM_FIT, int(epoch), int(batch))
    return s if rank == 0 else rng.counter_hash(s, _STREAM_RANK, int(rank), 0)


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
        lr_schedule: str | None = None, max_steps: int | None = None,
        distributed: Distributed | None = None,
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
            ``val_accuracy`` and ``val_density`` to the epoch record. Checked non-empty
            before training; if it fails later, the trained epoch is saved first.
        max_steps: stop after this many optimizer steps in all (resumed ones included),
            in the middle of an epoch if need be: the checkpoint then records the
            batches done, and a resume skips them, so a stopped and resumed run ends
            with the same weights as one that was never stopped. The partial epoch is
            logged as a "stop" line, not added to the history.
        distributed: an `asynctrain.distributed.Distributed` for a run over several
            processes (torchrun): give each a loader with a ``DistributedSampler``
            (its epoch is set here); gradients are averaged over the processes after
            every backward, the epoch records summed over them, and only rank 0
            writes `checkpoint_path`, `log_path` and the progress bar (every rank reads
            the checkpoint to resume). `on_epoch_end` is called on every rank.

    Returns: the history, one record per completed epoch (the resumed ones included):
    ``epoch`` (from 1), ``loss``, ``train_accuracy``, ``density`` (hidden spikes per
    sample and hidden neuron), ``passes_with_output``, ``forward_steps_per_pass``,
    ``synops_per_sample``, ``hidden_spikes_per_sample``, ``capped_passes``,
    ``batches``, ``samples``, ``step`` (optimizer steps so far), ``seconds``.

    Raises: TrainingDiverged at the first NaN or infinite loss, gradient or weight
    (naming epoch, batch and tensor); nothing of that epoch is saved, so the last
    checkpoint holds the last finite state. Before the first epoch: ValueError for an
    empty or batch-first loader (or validation loader), an unwritable path, a device
    that is not there or does not hold the weights; RuntimeError under
    ``torch.no_grad()`` / ``torch.inference_mode()``. During it, ValueError naming the
    batch for one that is not a (frames ``[T, B, ...]``, integer labels within the
    model's outputs) pair, and for a loss that is not a scalar. `asynctrain.checkpoint.CheckpointError` for a
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
                       recipe_args=recipe_args, lr_schedule=lr_schedule, max_steps=max_steps,
                       distributed=distributed)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be None or an int >= 1, got {max_steps!r}")
    dist = distributed or Distributed()
    params = [p for p in snn.parameters() if p.requires_grad]
    if not params:
        raise ValueError("snn has no trainable parameters")
    device = check_device(device, params[0].device) if device is not None else params[0].device
    settings = run_settings(seed, lr, weight_decay, loss)
    settings["lr_schedule"] = lr_schedule  # None: constant (older checkpoints lack the key)
    writes = dist.lead  # rank 0 writes the files
    check_before_training(train_loader, checkpoint_path if writes else None,
                          log_path if writes else None, val_loader)
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable, got {loss!r}")
        loss = LOSSES[loss]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    log = JsonLines(log_path if writes else None)
    start, skip, step, history = 0, 0, 0, []
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file():
        start, skip, step, history = resume_from(checkpoint_path, snn, opt, settings, epochs, log,
                                                 say=dist.lead)
    else:
        log.write(event="start", epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
                  layers=list(snn.graph.layer_sizes), cfg=describe(snn.cfg), world=dist.world)
        if init_from is not None:
            log.write(event="init_from", source=load_init(snn, init_from))
    dist.broadcast_(params)
    if start >= epochs or (max_steps is not None and step >= max_steps):
        return history

    def save(**meta: Any) -> None:
        if checkpoint_path is not None and writes:
            save_checkpoint(checkpoint_path, snn, opt, **meta, **settings,
                            args=dict(recipe_args or {}))

    n_batches = loader_length(train_loader, max_batches)
    total = None if n_batches is None else (epochs - start) * n_batches - skip
    if total is not None and max_steps is not None:
        total = min(total, max_steps - step)
    bar = _progress(progress and dist.lead, desc or f"train {snn.cfg.policy}", total)
    epoch_run = _Epoch(snn, opt, loss, seed, device, log, dist, max_batches, bar)
    snn.train()
    try:
        for epoch in range(start, epochs):
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(lr, lr_schedule, epoch, epochs)
            record, done = epoch_run(train_loader, epoch, skip if epoch == start else 0, step, max_steps)
            step = record["step"]
            if done is not None:  # max_steps inside the epoch: keep its position
                log.write(event="stop", **record)
                save(epoch=epoch, batch=done, step=step, history=history, partial=record)
                break
            if val_loader is not None:
                try:
                    record.update(_validate(snn, val_loader, val_execution, seed))
                except Exception:  # the trained epoch is kept, without its validation
                    save(epoch=epoch + 1, batch=0, step=step, history=[*history, record])
                    raise
            history.append(record)
            log.write(event="epoch", **record)
            save(epoch=epoch + 1, batch=0, step=step, history=history)
            if on_epoch_end is not None:
                on_epoch_end(record)
            if max_steps is not None and step >= max_steps:
                break
    finally:
        if bar is not None:
            bar.close()
    return history


_SUMS = ("loss", "correct", "samples", "steps", "passes", "synops", "hidden", "capped", "batches",
         "with_output")


class _Epoch:
    """One epoch of `fit`: batches, checks, the optimizer step, the epoch's record."""

    def __init__(self, snn: AsyncSNN, opt: torch.optim.Optimizer, loss_fn: Callable, seed: int,
                 device: torch.device, log: JsonLines, dist: Distributed, max_batches: int | None,
                 bar: Any):
        self.snn, self.opt, self.loss_fn, self.seed, self.device = snn, opt, loss_fn, seed, device
        self.log, self.dist, self.max_batches, self.bar = log, dist, max_batches, bar
        self.params = [p for p in snn.parameters() if p.requires_grad]

    def __call__(self, loader: Iterable, epoch: int, skip: int, step: int,
                 max_steps: int | None) -> tuple[dict[str, Any], int | None]:
        """Train epoch `epoch` (from 0) after its first `skip` batches; returns its record
        and, when `max_steps` stopped it early, the batches done (else None)."""
        snn, dist = self.snn, self.dist
        # Seeding here (not once per run) makes the shuffle of epoch e independent of
        # whether epochs 0..e-1 ran in this process or in one that was resumed.
        torch.manual_seed(call_seed(self.seed, epoch, 2**31 - 1))
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = dict.fromkeys(_SUMS, 0.0)
        last_loss, done = None, None
        for b, batch in enumerate(loader):
            if self.max_batches is not None and b >= self.max_batches:
                break
            if b < skip:
                continue  # trained before the run was stopped and resumed
            where = f"train_loader, epoch {epoch + 1}, batch {b + 1}"
            frames, labels = unpack_batch(batch, where)
            check_batch(frames, labels, where, snn.graph.n_outputs)
            frames, labels = frames.to(self.device), labels.to(self.device)
            out = snn(frames, seed=call_seed(self.seed, epoch, b, dist.rank))
            logits = logits_of(out, snn.cfg.readout)
            loss = self.loss_fn(out, labels, snn.cfg.readout)
            check_loss(loss, where)
            self.check("loss", epoch, b, loss=loss, last_loss=last_loss)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients_(self.params)
            self.check("gradient", epoch, b)
            self.opt.step()
            self.check("weight", epoch, b)
            step += 1
            last_loss = loss.item()
            self.add(sums, snn.stats, logits, labels, last_loss)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(epoch=epoch + 1, loss=f"{last_loss:.3f}",
                                     acc=f"{sums['correct'] / sums['samples']:.3f}", refresh=False)
            if max_steps is not None and step >= max_steps:
                done = b + 1
                break
        if done is not None and done == loader_length(loader, self.max_batches):
            done = None  # the stop fell on the epoch's last batch: the epoch is complete
        sums = dict(zip(_SUMS, dist.all_sum([sums[k] for k in _SUMS])))
        if sums["batches"] == 0 and skip == 0:
            raise ValueError(f"train_loader yielded no batch in epoch {epoch + 1}; nothing was "
                             f"trained or saved (an empty data set, or a sampler with nothing left?)")
        n, passes = max(sums["samples"], 1), max(sums["passes"], 1)
        warn_if_silent(sums["with_output"] / passes, snn.cfg.readout, epoch, sums["loss"] / n)
        record = dict(epoch=epoch + 1, loss=sums["loss"] / n, train_accuracy=sums["correct"] / n,
                      density=sums["hidden"] / (n * max(snn.graph.n_hidden, 1)),
                      passes_with_output=sums["with_output"] / passes,
                      forward_steps_per_pass=sums["steps"] / passes,
                      synops_per_sample=sums["synops"] / n, hidden_spikes_per_sample=sums["hidden"] / n,
                      capped_passes=int(sums["capped"]), batches=int(sums["batches"]),
                      samples=int(sums["samples"]), step=step, seconds=time.perf_counter() - t0)
        if skip:
            record["resumed_at_batch"] = skip
        return record, done

    @staticmethod
    def add(sums: dict, st: dict, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        B = labels.numel()
        sums["with_output"] += int((st["first_output_step"] > 0).sum())
        sums["loss"] += loss * B
        sums["correct"] += int((logits.argmax(1) == labels).sum())
        sums["samples"] += B
        sums["steps"] += float(st["forward_steps"].sum())
        sums["passes"] += st["forward_steps"].numel()
        sums["synops"] += float(st["synops"].sum())
        sums["hidden"] += float(st["hidden_spikes"].sum())
        sums["capped"] += int(st["capped_passes"])
        sums["batches"] += 1

    def check(self, what: str, epoch: int, b: int, **loss: Any) -> None:
        """`guards.check_finite`, the abort logged. A non-finite loss on any rank stops
        every rank (gradients and weights are equal on all ranks after the average)."""
        try:
            if what == "loss" and self.dist.world > 1:
                bad = not bool(torch.isfinite(loss["loss"].detach()).all())
                if self.dist.any(bad) and not bad:
                    raise TrainingDiverged(f"loss is not finite on another rank at epoch {epoch + 1}, "
                                           f"batch {b + 1}; training aborted, nothing of this epoch "
                                           f"was saved.")
            check_finite(self.snn, what, epoch, b, lr=self.opt.param_groups[0]["lr"], **loss)
        except TrainingDiverged as err:
            self.log.write(event="abort", epoch=epoch + 1, batch=b + 1, reason=str(err))
            raise


def _stop_changes(snn: AsyncSNN, stop: str | None, steps_after_output: int | None) -> dict:
    changes: dict[str, Any] = {}
    if stop is not None:
        changes["stop"] = stop
    if steps_after_output is not None:
        changes["steps_after_output"] = steps_after_output
    snn.cfg.replace(**changes)  # raises on a bad value, naming it
    return changes


def _validate(snn: AsyncSNN, loader: Iterable, execution: str | None, seed: int) -> dict:
    ex = execution or ("layered" if snn.cfg.policy == "layered" else snn.cfg.policy)
    try:
        r = next(iter(evaluate(snn, loader, [ex], steps_after_output=None, seed=seed).values()))
    except ValueError as err:
        raise ValueError(f"val_loader: {err}") from err
    return dict(val_execution=r.execution, val_accuracy=r.accuracy, val_density=r.density)


def _progress(enabled: bool, desc: str, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    # leave=True: the finished bar stays on screen as the record of the run
    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True)
