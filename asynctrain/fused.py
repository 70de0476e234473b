"""The fused-steps mode (`plan.Plan` "fused"): a backend's fused steps
(`kernels/step_spec.py` `FusedSteps`: the C steps of kernels/cpu_step.py, the Triton
steps of kernels/steps_triton.py) run whole forward steps of fully connected
networks -- selection, delivery, evaluation and the pass's bookkeeping -- in batches,
replay recorded steps and run their reverses, in place on a state and a pass of their
own (`FusedMode`). The same spikes, stats and gradients as the per-op modes
(tests/test_cpu_backend.py, tests/test_steps_triton.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import Engine
from .kernels.step_spec import FusedRecord, FusedSteps
from .passes import Pass
from .state import State
from .steps import StepMode, StepRecord, Sweep
from .timeline import EventStep


@dataclass
class FusedStepRecord(StepRecord):
    """A replayed step's record (the fused steps' own, `FusedRecord`)."""

    kernel: FusedRecord


class FusedMode(StepMode):
    """The fused steps of one call. Its bookkeeping is the kernels' (on the bound pass,
    `Pass.tensors`) plus the per-step lists the pass's stats are reduced from."""

    name = "fused"

    def __init__(self, eng: Engine):
        super().__init__(eng)
        self.steps: FusedSteps = eng.ops.fused(eng.step_spec())

    def bind_weights(self, wt: torch.Tensor) -> None:
        self.steps.bind_weights(wt)

    def begin_pass(self, st: State, ps: Pass) -> tuple[State, torch.Tensor]:
        """Bind a copy of `st` and the pass (its flags copied too: the steps update both
        in place). Returns (the bound state, the bound done flags bool [B])."""
        st = st.clone()
        ps.pending = ps.pending.clone()
        if ps.fillable is not None:
            ps.fillable = ps.fillable.clone()
        done = ps.done(self.eng.cfg).contiguous()
        self.steps.bind_state(st)
        self.steps.bind_pass(ps.tensors(done))
        return st, done

    def forward(self, ps: Pass, t: int, step: int, n_max: int) -> tuple[list[EventStep], bool]:
        """Up to `n_max` forward steps of pass `t` from `step` on the bound state and
        pass (their lists appended). Returns (the steps' ops, every sample done)."""
        sel, sel_deliv, vals, out_fired, all_done = self.steps.forward_batch(t, step, n_max)
        dropout = self.eng.p_net > 0  # else sel_deliv is sel
        ops = []
        for i in range(sel.shape[0]):
            ops.append(EventStep(t, step + i, sel[i], sel_deliv[i] if dropout else None))
            ps.delivered.append(sel_deliv[i])
            ps.values.append(vals[i])
            ps.out_fired.append(out_fired[i])
        return ops, all_done

    def own(self, st: State) -> State:
        """A copy of `st` bound for replays (in place)."""
        st = st.clone()
        self.steps.bind_state(st)
        return st

    def replay(self, op: EventStep) -> FusedStepRecord:
        """`op` again on the state bound by `own`."""
        sel_deliv = op.sel if op.sel_deliv is None else op.sel_deliv
        return FusedStepRecord(self, self.steps.replay_step(op.t, op.step, op.sel, sel_deliv))

    def step_backward(self, op: EventStep, rec: FusedStepRecord, sweep: Sweep) -> None:
        adj = sweep.adj
        if not (adj.v.is_contiguous() and adj.o.is_contiguous()):  # in place on adjoints of its own
            adj.v, adj.o = adj.v.contiguous(), adj.o.contiguous()
        sel_deliv = op.sel if op.sel_deliv is None else op.sel_deliv
        self.steps.backward_step(rec.kernel, op.sel, sel_deliv, adj.v, adj.o, adj.acc.contiguous(), sweep.grad_wt,
                                 adj.armed)
