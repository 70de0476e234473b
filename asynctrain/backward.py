"""Unlayered backpropagation with checkpoints, as an autograd Function
(`EventFunction`): the forward runs a call without autograd, keeping a state every C
ops (adaptive C ~ sqrt(ops) by default) and the [B, K] selection of every step; the
backward recomputes one segment at a time from its checkpoint and sweeps it in reverse
by hand (`loop.CallLoop.backward`; the reverse of each step is its step mode's,
`steps.py`).
"""

from __future__ import annotations

import torch

from .engine import Engine
from .loop import CallLoop


class EventFunction(torch.autograd.Function):
    """Forward without autograd, keeping checkpoints and per-step indices; backward
    recomputes segments from their checkpoints and sweeps them in reverse. The
    checkpoints are used up as the sweep goes (they are the backward's memory), so a
    second backward through one forward is refused: ``retain_graph=True`` is not
    honoured here (plain autograd, ``checkpoint_every=0``, honours it)."""

    @staticmethod
    def forward(ctx, engine: Engine, frames: torch.Tensor, wt: torch.Tensor):
        loop = CallLoop(engine)
        res = loop.forward(frames, wt, keep_checkpoints=True)
        engine.stats = res.stats
        ctx.loop, ctx.ops, ctx.ckpts = loop, res.ops, res.checkpoints
        # frames: the input recompute needs them; wt: the [N + 1, F] table the
        # deliveries read. Both exist anyway (the caller's frames, wt feeds autograd).
        ctx.save_for_backward(frames, wt)
        return res.out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.ops is None:
            raise RuntimeError(
                "a second backward through one asynctrain forward (loss.backward(retain_graph=True), "
                "then backward again): the checkpointed backward frees its checkpoints as it sweeps, "
                "so retain_graph=True is not honoured; run the forward again, or use "
                "AsyncSNN(..., checkpoint_every=0) (plain autograd, which honours retain_graph)")
        frames, wt = ctx.saved_tensors
        ops, ckpts = ctx.ops, ctx.ckpts
        ctx.ops = ctx.ckpts = None  # used up (popped) by the sweep
        grad_frames, grad_wt = ctx.loop.backward(ops, ckpts, frames, wt, grad_out,
                                                 want_frames=ctx.needs_input_grad[1])
        return None, grad_frames, grad_wt
