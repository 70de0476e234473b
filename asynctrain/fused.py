"""The fused-steps mode (`plan.Plan` "fused"): a backend's fused steps
(`kernels/step_spec.py` `FusedSteps`: the C steps of kernels/cpu_step.py, the Triton
steps of kernels/steps_triton.py) run whole forward steps of fully connected
networks -- selection, delivery, evaluation and the pass's bookkeeping -- in batches,
replay recorded steps and run their reverses, in place on a state and a pass of their
own (`FusedMode`). The same spikes, stats and gradients as the per-op modes
(tests/test_cpu_backend.py, tests/test_steps_triton.py).

Replay and sweep go by runs: the consecutive event steps of a segment replayed on the
owned state are collected (`replay` returns a record of the run) and replayed in one
call when the loop next needs the state (`flush`: before any other op, before a
state is kept, at the segment's end); the sweep meets a run's records last step
first, and the first of them sweeps the whole run in one call (the Triton steps: one
launch each, from two per step).
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
class _Run:
    """Consecutive event steps of one pass, replayed and swept together."""

    ops: list[EventStep]
    record: FusedRecord | None = None  # set by `FusedMode.flush`
    swept: bool = False


@dataclass
class FusedStepRecord(StepRecord):
    """A replayed step's record: its place in its run (the fused steps' own record,
    `FusedRecord`, holds the run's n steps)."""

    run: _Run
    index: int


class FusedMode(StepMode):
    """The fused steps of one call. Its bookkeeping is the kernels' (on the bound pass,
    `Pass.tensors`) plus the per-step lists the pass's stats are reduced from."""

    name = "fused"

    def __init__(self, eng: Engine):
        super().__init__(eng)
        self.steps: FusedSteps = eng.ops.fused(eng.step_spec())
        self._run: _Run | None = None  # the run being collected by `replay`

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
        self.flush()
        st = st.clone()
        self.steps.bind_state(st)
        return st

    def replay(self, op: EventStep) -> FusedStepRecord:
        """`op` again on the state bound by `own`: collected into the current run
        (replayed by `flush`)."""
        run = self._run
        if run is not None and (op.t != run.ops[-1].t or op.step != run.ops[-1].step + 1):
            self.flush()
            run = None
        if run is None:
            run = self._run = _Run([])
        run.ops.append(op)
        return FusedStepRecord(self, run, len(run.ops) - 1)

    def flush(self) -> None:
        """Replay the collected run on the bound state (one call), its records filled."""
        run, self._run = self._run, None
        if run is None:
            return
        sel = torch.stack([op.sel for op in run.ops])
        sel_deliv = torch.stack([op.sel if op.sel_deliv is None else op.sel_deliv for op in run.ops])
        run.record = self.steps.replay_steps(run.ops[0].t, run.ops[0].step, sel, sel_deliv)

    def step_backward(self, op: EventStep, rec: FusedStepRecord, sweep: Sweep) -> None:
        """The run's reverse in one call, at its last step (the sweep's first); its
        other steps were swept with it."""
        run = rec.run
        if run.swept:
            return
        if run.record is None or rec.index != len(run.ops) - 1:
            raise RuntimeError("fused steps swept before their run was replayed, or out of order")
        adj = sweep.adj
        if not (adj.v.is_contiguous() and adj.o.is_contiguous()):  # in place on adjoints of its own
            adj.v, adj.o = adj.v.contiguous(), adj.o.contiguous()
        sel = torch.stack([o.sel for o in run.ops])
        sel_deliv = torch.stack([o.sel if o.sel_deliv is None else o.sel_deliv for o in run.ops])
        self.steps.backward_steps(run.record, sel, sel_deliv, adj.v, adj.o, adj.acc.contiguous(), sweep.grad_wt,
                                  adj.armed)
        run.swept = True
