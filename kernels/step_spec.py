"""What the fused steps of one engine call read: shapes, tables and constants.

The engine builds one `StepSpec` per call (`Engine.step_spec`) and hands it to its
backend's fused steps (`cpu_step.CpuSteps`, `steps_triton.TritonSteps`), so the
binders depend on this description only, not on the engine (nothing under
`kernels/` imports `asynctrain`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
