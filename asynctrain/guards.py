"""Checks that keep `fit` and the recipes from training through a fault.

Before the first epoch: paths that cannot be written, an empty loader, a DataLoader
that stacks samples batch-first. At every batch: frames time-major with one label per
sample. At every step: a finite loss, finite gradients (before the optimizer step)
and finite weights (after it); the first failure raises `TrainingDiverged` naming
the epoch, the batch and the tensor. After every epoch: a warning when the network
was (nearly) silent.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, default_collate

from .checkpoint import check_writable

__all__ = ["TrainingDiverged", "SETTINGS", "run_settings", "check_before_training", "check_batch",
           "check_finite", "warn_if_silent"]


SILENT_FRACTION = 0.9
"""A run where at least this fraction of passes has no output spike is warned about
(`fit` after every epoch, `evaluate` per execution): predictions are then class 0
by default and the loss sits at ln(classes)."""


class TrainingDiverged(FloatingPointError):
    """The loss, a gradient or a weight became NaN or infinite; the message says
    where (epoch, batch, tensor) and what to try."""


SETTINGS = ("seed", "lr", "weight_decay", "loss")
"""fit arguments a resumed run must share with its checkpoint (besides the model and
its SimConfig)."""


def run_settings(seed: int, lr: float, weight_decay: float, loss: Any) -> dict[str, Any]:
    name = loss if isinstance(loss, str) else getattr(loss, "__qualname__", repr(loss))
    return dict(seed=seed, lr=lr, weight_decay=weight_decay, loss=name)


def check_before_training(loader: Iterable, checkpoint_path: Any, log_path: Any) -> None:
    """What can fail before an epoch is spent: paths that cannot be written, an
    empty loader, a loader that stacks samples on the first axis."""
    if checkpoint_path is not None:
        check_writable(checkpoint_path, "checkpoint_path")
    if log_path is not None:
        check_writable(log_path, "log_path")
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n == 0:
        raise ValueError("train_loader is empty (0 batches): no data, or fewer samples than "
                         "one batch with drop_last=True")
    if isinstance(loader, DataLoader) and loader.batch_size is not None \
            and loader.collate_fn is default_collate:
        raise ValueError("train_loader uses the default collate, which stacks samples on the "
                         "first axis ([B, T, F]); fit needs time-major frames [T, B, F]: "
                         "DataLoader(..., collate_fn=asynctrain.data.collate_time_major)")


def check_batch(loader: Iterable, frames: Any, labels: Any, epoch: int, b: int) -> None:
    """Frames must be time-major ``[T, B, ...]`` with one label per sample."""
    where = f"epoch {epoch + 1}, batch {b + 1}"
    if not isinstance(frames, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: the loader must yield (frames, labels) tensors, got "
                        f"({type(frames).__name__}, {type(labels).__name__})")
    if labels.dim() != 1 or frames.dim() < 3:
        raise ValueError(f"{where}: expected frames [T, B, features] and labels [B], got "
                         f"frames {tuple(frames.shape)} and labels {tuple(labels.shape)}")
    n = labels.shape[0]
    if frames.shape[1] != n:
        if frames.shape[0] == n:
            raise ValueError(f"{where}: frames {tuple(frames.shape)} look batch-first [B, T, F] "
                             f"({n} labels = axis 0); fit needs time-major [T, B, F]: use "
                             f"collate_fn=asynctrain.data.collate_time_major or "
                             f"frames.transpose(0, 1)")
        raise ValueError(f"{where}: frames {tuple(frames.shape)} hold {frames.shape[1]} samples "
                         f"on axis 1 (batch) but there are {n} labels")


def check_finite(module: torch.nn.Module, what: str, epoch: int, batch: int, *,
                 loss: torch.Tensor | None = None, lr: float | None = None,
                 last_loss: float | None = None) -> None:
    """Raise `TrainingDiverged` naming the tensor, epoch and batch (both counted from
    0 here, from 1 in the message) when the `what` of one training step is not
    finite: "loss" (`loss`), "gradient" (every parameter's .grad, after backward and
    before the step) or "weight" (every parameter, after the step). One device sync
    when all is well. `last_loss`: the epoch's last finite batch loss, named with a
    non-finite loss."""
    where = f"at epoch {epoch + 1}, batch {batch + 1}"
    hint = " Try a smaller lr" + (f" (now {lr:g})" if lr is not None else "") + \
        ", more weight decay, or check the input frames for huge values."
    if what == "loss":
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            last = "no finite batch before it in this epoch" if last_loss is None else \
                f"last finite batch loss: {last_loss}"
            raise TrainingDiverged(f"loss is {loss.detach().flatten()[0].item()} {where} ({last}); "
                                   f"training aborted, nothing of this epoch was saved.{hint}")
        return
    named = [(n, p.grad if what == "gradient" else p) for n, p in module.named_parameters()
             if p.requires_grad]
    tensors = [t.detach() for _, t in named if t is not None]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    bad = [(n, int((~torch.isfinite(t)).sum()), t.numel()) for n, t in named
           if t is not None and not bool(torch.isfinite(t).all())]
    name, count, size = bad[0]
    note = ""
    if what == "gradient":
        nan_w = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
        note = (f" The weights {', '.join(nan_w)} already hold NaN/inf." if nan_w else
                f" The weights are finite: the forward overflowed (huge input frames or "
                f"potentials?) or the loss's gradient did.")
    raise TrainingDiverged(
        f"{what} {name} holds {count} of {size} NaN/inf values {where}"
        + (f" (also: {', '.join(n for n, _, _ in bad[1:])})" if bad[1:] else "")
        + f"; training aborted, nothing of this epoch was saved.{note}{hint}")


def warn_if_silent(with_output: float, readout: str, epoch: int, loss: float) -> None:
    if readout == "counts" and 1.0 - with_output >= SILENT_FRACTION:
        warnings.warn(f"epoch {epoch + 1}: no output spike in {100 * (1 - with_output):.0f}% "
                      f"of training passes (mean loss {loss:.3f}; ln(classes) when silent): "
                      f"the network is (nearly) silent and learns little. Lower theta, scale "
                      f"the initial weights up or give the input more spikes.", RuntimeWarning,
                      stacklevel=4)
