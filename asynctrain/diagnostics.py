"""What a researcher looks at when unlayered training fits worse than layered.

    rep = gradient_report(snn, frames, labels, seed=0)          # one batch
    rep["grad_norm"]        # per weight layer, ||dL/dW_l||
    rep["reached"]          # per hidden layer, fraction of neurons with any gradient
    rep["cosine_layered"]   # per weight layer, cos(dL/dW_l, the layered dL/dW_l)
    fit_history(history)    # per epoch: loss, training accuracy (+ validation)

A hidden neuron "receives gradient" on a batch when any weight into it has a
nonzero gradient: the backward reached it at a delivery it integrated. The layered
reference runs the same weights, frames and seed with ``policy="layered"`` and
otherwise the same settings; under the barrier preset (or MS with K at least the
pending count, barrier messages on) the two executions coincide and so do their
gradients (cosine 1). Unlayered training only reaches neurons that were delivered;
silent ones get nothing, which this report makes visible.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .module import AsyncSNN
from .train import LOSSES

__all__ = ["gradients", "gradient_report", "fit_history"]


def _weights(snn: AsyncSNN) -> list[torch.Tensor]:
    return [p for p in snn.net.parameters() if p.requires_grad]


def gradients(snn: AsyncSNN, frames: torch.Tensor, labels: torch.Tensor, *, seed: int = 0,
              loss: str | Callable = "counts", training: bool = True,
              **changes: Any) -> tuple[list[torch.Tensor], float]:
    """Weight gradients ``[dL/dW_l]`` (one per weight layer, shapes of the weights)
    and the loss of one batch, with ``snn.cfg`` changed by `changes` for this call.
    `training`: run in training mode (regularisers of the config apply).
    Leaves ``.grad`` of the weights as it found them."""
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    params = _weights(snn)
    was = snn.training
    snn.train(training)
    try:
        with snn.configured(**changes):
            out = snn(frames, seed=seed)
            value = loss_fn(out, labels, snn.cfg.readout)
        grads = torch.autograd.grad(value, params, allow_unused=True)
    finally:
        snn.train(was)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)], \
        float(value.detach())


def gradient_report(snn: AsyncSNN, frames: torch.Tensor, labels: torch.Tensor, *,
                    seed: int = 0, loss: str | Callable = "counts", training: bool = True,
                    reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gradient diagnostics of one batch under ``snn.cfg`` against a reference
    execution (default ``{"policy": "layered"}``), same weights, frames and seed.

    Returns a dict of lists, one entry per weight layer (``reached``: per hidden
    layer): ``grad_norm``, ``ref_grad_norm``, ``cosine_layered`` (NaN where either
    gradient is zero), ``reached`` and ``ref_reached`` (fractions in [0, 1]), plus
    ``loss`` and ``ref_loss``.
    """
    ref = dict(policy="layered") if reference is None else dict(reference)
    g, value = gradients(snn, frames, labels, seed=seed, loss=loss, training=training)
    g_ref, ref_value = gradients(snn, frames, labels, seed=seed, loss=loss, training=training,
                                 **ref)
    return dict(grad_norm=[float(x.norm()) for x in g],
                ref_grad_norm=[float(x.norm()) for x in g_ref],
                cosine_layered=[_cosine(a, b) for a, b in zip(g, g_ref)],
                reached=_reached(g), ref_reached=_reached(g_ref), loss=value, ref_loss=ref_value)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a.flatten().double() @ b.flatten().double()) / (na.double() * nb.double()))


def _reached(grads: Sequence[torch.Tensor]) -> list[float]:
    # rows of W_l are the neurons of layer l; the last layer is the output layer
    return [float((g.reshape(g.shape[0], -1) != 0).any(1).double().mean()) for g in grads[:-1]]


def fit_history(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fit curve of `asynctrain.train.fit`'s history: per epoch the loss, the
    training accuracy and, when validated, the validation accuracy and density."""
    keys = ("epoch", "loss", "train_accuracy", "val_accuracy", "val_density",
            "hidden_spikes_per_sample", "seconds")
    return [{k: r[k] for k in keys if k in r} for r in history]
