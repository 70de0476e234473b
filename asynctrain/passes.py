"""One pass's bookkeeping (`Pass`: pending flags, pre-spike potentials, step counts,
the per-step lists its stats are reduced from) and the stats of a call (`new_stats`,
`Pass.store`).

Nothing here is replayed by the backward: the step modes update a pass after each
evaluation (`bookkeep` of `steps.WholeState`, `receivers.AtReceivers`,
`receivers.ListedReceivers`; the fused steps in their kernels), and a pass reduces its
lists to the stats once, when it ends.
"""

from __future__ import annotations

import torch

from .config import SimConfig
from .kernels.pass_stats import StatRows, pass_stats_torch
from .kernels.step_spec import PassTensors
from .retain import identity


def new_stats(T: int, B: int, device, histogram_bins: int = 0) -> dict:
    """The stats of a call, zero (-1: no output spike yet). The int64 ones are views of
    one buffer (three launches on a GPU instead of nine; each stat is a contiguous
    tensor of its own shape)."""
    n = T * B
    flat = torch.zeros(5 * n + B, dtype=torch.int64, device=device)
    flat[3 * n:5 * n].fill_(-1)
    rows = flat[:5 * n].view(5, T, B)
    stats = {"forward_steps": rows[0], "synops": rows[1], "spikes_processed": rows[2],
             "first_output_step": rows[3], "spikes_to_first_output": rows[4],
             "capped": torch.zeros(T, B, dtype=torch.bool, device=device),
             "hidden_spikes": flat[5 * n:]}
    if histogram_bins:
        stats["currents_to_spike"] = torch.zeros(histogram_bins, dtype=torch.int64, device=device)
    return stats


class Pass:
    """Per-pass, per-sample bookkeeping of the forward (never replayed). Per step it
    only appends; stats that need no per-step decision are reduced once per pass.

    `pending` (bool [B, W]) is the pass's own: the step modes update it in place.
    `fill` (SPEC 8 fill_slots): also keep the fill candidates; `histogram_bins` > 0:
    count the currents-to-spike histogram; `keep`: what the per-step lists store
    (`retain.py`)."""

    def __init__(self, B: int, W: int, dtype, device, pending: torch.Tensor, eager_first: bool, *,
                 fill: bool = False, histogram_bins: int = 0, keep=identity):
        self.pending = pending
        self.pre_spike = torch.zeros(B, W, dtype=dtype, device=device)
        self.spike_sum = torch.zeros(B, W, dtype=dtype, device=device)
        self.steps = torch.zeros(B, dtype=torch.int64, device=device)
        self.first_out = self.steps - 1
        self.eager_first = eager_first
        self.input_synops = self.input_processed = None  # prioritized input step
        self.delivered: list[torch.Tensor] = []  # per event step [B, K]
        self.values: list[torch.Tensor] = []     # per event step [B, K]
        self.out_fired: list[torch.Tensor] = []  # per evaluation [B]
        # currents-to-spike histogram of the pass (SPEC 9), int64 [bins]
        self.currents = torch.zeros(histogram_bins, dtype=torch.int64, device=device) if histogram_bins else None
        # fill_slots: the outbox holds surrogate gradient, bool [B, W]
        self.fillable: torch.Tensor | None = torch.zeros_like(pending) if fill else None
        self.keep = keep

    def tensors(self, done: torch.Tensor) -> PassTensors:
        """What the fused steps update in place (`kernels/step_spec.py`); `done`: bool [B]."""
        return PassTensors(self.pending, self.pre_spike, self.spike_sum, self.steps, self.first_out, done,
                           self.fillable, self.currents)

    def done(self, cfg: SimConfig) -> torch.Tensor:
        """bool [B]: the sample's pass is over (SPEC 4.2)."""
        done = ~self.pending.any(1) | (self.steps >= cfg.max_steps)
        if cfg.stop == "output":
            done = done | ((self.first_out >= 0) & (self.steps >= self.first_out + cfg.steps_after_output))
        return done

    def store(self, stats: dict, t: int, cfg: SimConfig, fan_out: torch.Tensor,
              hidden_f: torch.Tensor, pass_stats=pass_stats_torch) -> None:
        """Reduce the pass's lists into the stats' row `t` with `pass_stats` (the
        backend's: `kernels/pass_stats.py`, one launch on "triton")."""
        rows = StatRows(*(stats[name][t] for name in StatRows._fields[:-1]), stats["hidden_spikes"])
        stack = lambda xs: torch.stack(xs) if xs else None  # noqa: E731
        pass_stats(rows, stack(self.values), stack(self.delivered), stack(self.out_fired), fan_out,
                   self.input_synops, self.input_processed, self.steps, self.first_out, self.pending,
                   self.spike_sum, hidden_f, max_steps=int(cfg.max_steps), stop_output=cfg.stop == "output",
                   steps_after_output=int(cfg.steps_after_output))
        if self.currents is not None:
            stats["currents_to_spike"] += self.currents
