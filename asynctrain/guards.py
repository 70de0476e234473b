"""Checks that keep `fit` and the recipes from training through a fault.

Before the first epoch: paths that cannot be written, an empty loader, a DataLoader
that stacks samples batch-first. At every batch: frames time-major with one label per
sample. At every step: a finite loss, finite gradients (before the optimizer step)
and finite weights (after it); the first failure raises `TrainingDiverged` naming
the epoch, the batch and the tensor. After every epoch: a warning when the network
was (nearly) silent.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, default_collate

from ._warn import warn
from .checkpoint import check_writable

__all__ = ["TrainingDiverged", "SETTINGS", "run_settings", "check_before_training", "check_batch",
           "unpack_batch", "loader_length", "check_loader", "check_device", "check_finite", "check_loss",
           "warn_if_silent"]


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


def loader_length(loader: Iterable, max_batches: int | None = None) -> int | None:
    """Batches `loader` will yield (at most `max_batches`); None when it has no len()."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return n if max_batches is None else min(n, max_batches)


def check_loader(loader: Iterable, name: str) -> None:
    """A loader that is empty or stacks samples on the first axis is refused, naming it."""
    if loader_length(loader) == 0:
        raise ValueError(f"{name} is empty (0 batches): no data, or fewer samples than one batch "
                         f"with drop_last=True")
    if isinstance(loader, DataLoader) and loader.batch_size is not None \
            and loader.collate_fn is default_collate:
        raise ValueError(f"{name} uses the default collate, which stacks samples on the first "
                         f"axis ([B, T, F]); the module needs time-major frames [T, B, F]: "
                         f"DataLoader(..., collate_fn=asynctrain.data.collate_time_major)")


def check_before_training(loader: Iterable, checkpoint_path: Any, log_path: Any,
                          val_loader: Iterable | None = None) -> None:
    """What can fail before an epoch is spent: training under ``torch.no_grad()`` or
    ``torch.inference_mode()``, paths that cannot be written, an empty loader, a loader
    that stacks samples on the first axis."""
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise RuntimeError(f"fit was called under {mode}: training needs gradients; call it "
                           f"outside that block")
    if checkpoint_path is not None:
        check_writable(checkpoint_path, "checkpoint_path")
    if log_path is not None:
        check_writable(log_path, "log_path")
    check_loader(loader, "train_loader")
    if val_loader is not None:
        check_loader(val_loader, "val_loader")


def check_device(device: Any, weights_on: torch.device) -> torch.device:
    """`fit`'s `device`: it must exist and hold the weights (fit moves the batches, not
    the model)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here "
                         f"(torch.cuda.is_available() is False); use device='cpu'")
    if dev.type != weights_on.type or (dev.index is not None and weights_on.index is not None
                                       and dev.index != weights_on.index):
        raise ValueError(f"device={device!r} but the weights are on {weights_on}: move the model "
                         f"first (snn.to({str(dev)!r})); fit moves only the batches")
    return dev


def check_loss(loss: Any, where: str) -> None:
    """The loss must be one number (a tensor with one element)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where}: the loss must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{where}: the loss must be a scalar, got a tensor of shape "
                         f"{tuple(loss.shape)}; reduce it (e.g. .mean())")


def unpack_batch(batch: Any, where: str) -> tuple[Any, Any]:
    """``(frames, labels)`` of one batch; anything else is refused naming what came."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    got = (f"a {type(batch).__name__} of {len(batch)} items" if isinstance(batch, (tuple, list))
           else f"a {type(batch).__name__}")
    raise ValueError(f"{where}: the loader must yield (frames, labels) pairs, got {got}; wrap it "
                     f"or map the extra items away (e.g. a collate_fn returning frames, labels)")


def check_batch(frames: Any, labels: Any, where: str, n_classes: int | None = None) -> None:
    """Frames must be time-major ``[T, B, ...]`` with one integer label per sample, each
    in ``0..n_classes - 1`` (`n_classes`: the model's outputs; None skips that check)."""
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
                             f"({n} labels = axis 0); time-major [T, B, F] is needed: use "
                             f"collate_fn=asynctrain.data.collate_time_major or "
                             f"frames.transpose(0, 1)")
        raise ValueError(f"{where}: frames {tuple(frames.shape)} hold {frames.shape[1]} samples "
                         f"on axis 1 (batch) but there are {n} labels")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be class indices (an integer dtype), got {labels.dtype}"
                         f" (e.g. {labels[:3].tolist()}); use labels.long()")
    if n_classes is not None and n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: label {bad} is outside 0..{n_classes - 1} (the model has "
                             f"{n_classes} outputs, one per class)")


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
                " The weights are finite: the forward overflowed (huge input frames or "
                "potentials?) or the loss's gradient did.")
    raise TrainingDiverged(
        f"{what} {name} holds {count} of {size} NaN/inf values {where}"
        + (f" (also: {', '.join(n for n, _, _ in bad[1:])})" if bad[1:] else "")
        + f"; training aborted, nothing of this epoch was saved.{note}{hint}")


def warn_if_silent(with_output: float, readout: str, epoch: int, loss: float) -> None:
    if readout == "counts" and 1.0 - with_output >= SILENT_FRACTION:
        warn(f"epoch {epoch + 1}: no output spike in {100 * (1 - with_output):.0f}% "
             f"of training passes (mean loss {loss:.3f}; ln(classes) when silent): "
             f"the network is (nearly) silent and learns little. Lower theta, scale "
             f"the initial weights up or give the input more spikes.", RuntimeWarning)
