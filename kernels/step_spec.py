"""The fused steps of one engine call: what they read (`StepSpec`: shapes, tables and
constants; `PassTensors`: a pass's bookkeeping), what they provide (`FusedSteps`) and
what a replayed step leaves for its backward (`FusedRecord`).

The engine builds one `StepSpec` per call (`Engine.step_spec`) and hands it to its
backend's fused steps (`cpu_step.CpuSteps`, `steps_triton.TritonSteps`), so the
binders depend on these descriptions only, not on the engine (nothing under
`kernels/` imports `asynctrain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch


@dataclass(frozen=True)
class StepSpec:
    """Shapes, per-column tables and knobs of one call's fused steps.

    Columns are the W = N + 1 flat indices of the state (inputs, hidden, outputs,
    the dump last). Tables may live on any device; each binder moves them to its own.
    """

    batch: int                 # B
    width: int                 # W
    k: int                     # forward group size K (<= W)
    fan_out: int               # F, columns of the weight table [W, F]
    dtype: torch.dtype         # state and weight dtype
    device: torch.device
    source_slot: torch.Tensor  # int64 [W]: layer of each source (outputs: L, the dump: L + 1)
    slot_lo: torch.Tensor      # int64 [n_slots]: first column slot l's sources reach
    slot_hi: torch.Tensor      # int64 [n_slots]: one past the last (0, 0: reaches nobody)
    is_source: torch.Tensor    # bool [W]: has targets (inputs and hidden neurons)
    is_input: torch.Tensor     # bool [W]
    sync: torch.Tensor         # int32 [W]: received currents before an evaluation may spike
    theta: torch.Tensor        # [W] thresholds (inputs and dump: +inf)
    out_lo: int                # output columns [out_lo, out_hi)
    out_hi: int
    policy_ms: bool            # MS (else RS)
    input_random: bool         # MS, queued inputs in a per-pass random order (SPEC 6)
    fill: bool                 # SPEC 8 fill_slots
    refractory: bool
    barrier: bool              # barrier messages
    stop_output: bool          # stop == "output" (first output step counted eagerly)
    detach_reset: bool
    noise: float               # momentum noise (training)
    p_ref: float               # refractory dropout (training)
    p_net: float               # network dropout (training)
    alpha: float               # surrogate steepness
    max_steps: int
    steps_after_output: int
    seed: int

    @property
    def n_slots(self) -> int:
        return self.slot_lo.numel()


def as_spec(spec) -> StepSpec:
    """`spec` itself, or the `StepSpec` of an object that describes one through
    ``step_spec()`` (an engine)."""
    return spec if isinstance(spec, StepSpec) else spec.step_spec()


@dataclass
class PassTensors:
    """A pass's bookkeeping that the fused steps read and update in place (contiguous,
    on the steps' device; `asynctrain/passes.py` holds them between steps)."""

    pending: torch.Tensor             # bool [B, W] outboxes waiting for delivery
    pre_spike: torch.Tensor           # [B, W] potential before the last spike (MS keys)
    spike_sum: torch.Tensor           # [B, W] spikes of the pass
    steps: torch.Tensor               # int64 [B] forward steps of the pass
    first_out: torch.Tensor           # int64 [B] first output step (-1: none yet)
    done: torch.Tensor                # bool [B] the sample's pass is over
    fillable: torch.Tensor | None = None  # bool [B, W] fill candidates (SPEC 8 fill_slots)
    hist: torch.Tensor | None = None      # int64 [bins] currents-to-spike histogram, added to


# A replayed step's flags, one byte per column (0 where the column did not receive):
# the C steps (cpu_step_impl.h) and the Triton steps (kernels/steps_eval.py) write these bits.
REFR_BEFORE, RECEIVED, GATE = 1, 2, 4


class FusedRecord:
    """What the backward of n replayed steps needs: the delivered values (vals
    [n, B, K]), the pre-spike potentials (v_pre [n, B, W], defined at the receivers)
    and per column one byte of flags (flags uint8 [n, B, W]: refractory before the
    step, received, gate: `REFR_BEFORE`, `RECEIVED`, `GATE`). One byte instead of three
    bool tensors."""

    __slots__ = ("vals", "v_pre", "flags")

    def __init__(self, vals: torch.Tensor, v_pre: torch.Tensor, flags: torch.Tensor):
        self.vals, self.v_pre, self.flags = vals, v_pre, flags

    def masks(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step i's (refractory before, received, gate) bool [B, W]."""
        f = self.flags[i]
        return (f & REFR_BEFORE) != 0, (f & RECEIVED) != 0, (f & GATE) != 0


class OneStep:
    """A fused steps class's `replay_step` and `backward_step`: its `replay_steps` and
    `backward_steps` of one step."""

    def replay_step(self, t: int, step: int, sel: torch.Tensor, sel_deliv: torch.Tensor) -> FusedRecord:
        """`replay_steps` of one step (sel, sel_deliv [B, K])."""
        return self.replay_steps(t, step, sel[None], sel_deliv[None])

    def backward_step(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor, g_v: torch.Tensor,
                      g_o: torch.Tensor, g_acc: torch.Tensor, grad_wt: torch.Tensor,
                      armed: torch.Tensor | None = None) -> None:
        """`backward_steps` of one step (sel, sel_deliv [B, K])."""
        self.backward_steps(rec, sel[None], sel_deliv[None], g_v, g_o, g_acc, grad_wt, armed)


class FusedSteps(Protocol):
    """What a backend's fused steps provide (`backends.Ops.fused`): whole forward steps,
    their replays and their reverses, on a state and a pass bound once, updated in
    place. Implemented by `cpu_step.CpuSteps` (C) and `steps_triton.TritonSteps`."""

    fills_slots: ClassVar[bool]        # SPEC 8 fill_slots: `PassTensors.fillable` is read
    records_histogram: ClassVar[bool]  # the currents-to-spike histogram (`PassTensors.hist`)

    def __init__(self, spec: StepSpec) -> None: ...

    @staticmethod
    def unsupported(spec: StepSpec) -> str | None:
        """Why these steps cannot run `spec` (None: they can); the engine then runs the
        per-op steps."""

    def bind_weights(self, wt: torch.Tensor) -> None:
        """The [W, F] weight table the steps deliver through (and add gradients for)."""

    def bind_state(self, st) -> None:
        """The state (`asynctrain.state.State`: v, o, acc, refr, n_in) updated in place."""

    def bind_pass(self, tensors: PassTensors) -> None:
        """The pass's bookkeeping updated in place."""

    def forward_batch(self, t: int, step: int, n_max: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Up to `n_max` forward steps (`step`, `step` + 1, ...) of the bound state and
        pass, stopping after the one that leaves every sample done. Returns (sel,
        sel_deliv int32 [n, B, K], vals [n, B, K], out_fired bool [n, B], all done)."""

    def replay_steps(self, t: int, step0: int, sel: torch.Tensor, sel_deliv: torch.Tensor) -> FusedRecord:
        """n recorded consecutive steps of pass t (step0, step0 + 1, ...; sel,
        sel_deliv int32 [n, B, K]) again on the bound state; what their reverse needs."""

    def backward_steps(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor,
                       g_v: torch.Tensor, g_o: torch.Tensor, g_acc: torch.Tensor,
                       grad_wt: torch.Tensor, armed: torch.Tensor | None = None) -> None:
        """The reverse of the n steps `rec` records, last first: updates the contiguous
        adjoints g_v, g_o in place (g_acc is read) and adds the weight-table gradient
        into grad_wt. `armed` (contiguous bool [B, W], surrogate_at="fire_or_last",
        else None), in place: a receiver's surrogate counts only where it fired or its
        flag is set; every receiver clears its flag, the step's emptied outboxes set
        theirs."""

    def replay_step(self, t: int, step: int, sel: torch.Tensor, sel_deliv: torch.Tensor) -> FusedRecord:
        """`replay_steps` of one step (sel, sel_deliv [B, K])."""

    def backward_step(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor,
                      g_v: torch.Tensor, g_o: torch.Tensor, g_acc: torch.Tensor,
                      grad_wt: torch.Tensor, armed: torch.Tensor | None = None) -> None:
        """`backward_steps` of one step (sel, sel_deliv [B, K])."""
