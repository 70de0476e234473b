"""The objectives `fit` minimises and its learning-rate schedules (SPEC 8).

Every loss is a cross-entropy on the logits of `asynctrain.evaluate.logits_of` (the
output counts summed over the timesteps, or the output potentials); the prediction
is always their argmax.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .evaluate import logits_of

__all__ = ["LOSSES", "LR_SCHEDULES", "scheduled_lr"]

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
