"""The loops of one call (`CallLoop`): the forward over passes and steps (per-op steps
or the fused steps' batches), the replay of a segment of ops, and the backward sweep.

The engine (`engine.Engine`) holds the constants and the ops that are not neuron
evaluations; the call's step mode (`steps.py`, `receivers.py`, `fused.py`), chosen
once per call from the engine's plan (`plan.Plan.mode`), evaluates the event steps,
updates the pass's bookkeeping (`passes.Pass`) and keeps and sweeps the backward
records. The forward records the call's ops (`timeline.py`) and offers states to the
checkpoints. Its only host read is the stop test (`kernels/host.py`): before every
`Plan.stop_every`-th per-op step, once per batch of fused steps.

Backward with checkpoints (`backward.EventFunction`): the forward keeps a state every
C ops and the [B, K] selection of every step; the backward recomputes one segment at
a time from its checkpoint (no autograd) and sweeps it in reverse by hand (SPEC 8,
written out in `steps.py`). Conv networks nest this once (`Plan.sub_segment`): a long
segment is first recomputed keeping only inner states, then swept one part at a time.
A hand sweep instead of autograd over the recomputed segment: no graph is built and
no per-op gradient buffers accumulate (0.6x the backward time of the autograd replay
it replaced, shd-like, K=8, CPU); ``checkpoint_every=0`` (plain autograd through every
step, functional whole-state steps) is the reference it is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import Engine
from .fused import FusedMode
from .kernels import host
from .passes import Pass, new_stats
from .receivers import AtReceivers, ListedReceivers
from .retain import ChunkStore, RecordStores, identity
from .state import Adjoints, PackedState, State
from .steps import PerOpMode, StepInfo, StepRecord, Sweep, WholeState
from .timeline import Checkpoints, EventStep, InputStep, Op, PassEnd, PassStart


@dataclass
class Forward:
    """What a call's forward returns."""

    out: torch.Tensor          # [T, B, n_out] readout per pass
    stats: dict                # `passes.new_stats` keys, plus final_v
    ops: list[Op]              # the call's timeline
    checkpoints: dict[int, PackedState] | None  # {op index: state before it} (kept for the backward)


class CallLoop:
    """The loops of one call on `eng`. The step mode is chosen by `forward` (under
    autograd or not) and kept for the replays and sweeps of its backward."""

    def __init__(self, eng: Engine):
        self.eng = eng
        self.whole = WholeState(eng)  # the prioritized input step, every mode
        self.mode: PerOpMode = self.whole  # the per-op event steps
        self.fused: FusedMode | None = None  # the fused steps instead

    def _choose(self, autograd: bool) -> None:
        name = self.eng.plan.mode(autograd)
        self.mode, self.fused = self.whole, None
        if name == "fused":
            self.fused = FusedMode(self.eng)
        elif name == "receivers":
            self.mode = AtReceivers(self.eng, self.whole)
        elif name == "listed":
            self.mode = ListedReceivers(self.eng)

    @property
    def functional(self) -> bool:
        """The event steps never update a state in place (the whole-state steps; not
        the fused steps nor the receivers' steps), so a kept state may share tensors."""
        return self.fused is None and self.mode is self.whole

    # --- forward ----------------------------------------------------------------------
    def forward(self, frames: torch.Tensor, wt: torch.Tensor, *, keep_checkpoints: bool) -> Forward:
        """Execute all passes; with `keep_checkpoints`, keep the states the backward
        recomputes from. Under autograd (grad enabled and `wt` or `frames` requiring
        it) every step is functional and differentiable."""
        eng = self.eng
        cfg, net = eng.cfg, eng.net
        autograd = torch.is_grad_enabled() and (wt.requires_grad or frames.requires_grad)
        self._choose(autograd)
        T, B = frames.shape[0], eng.batch
        if self.fused is not None:
            self.fused.bind_weights(wt)
        plan = eng.plan
        ckpt = Checkpoints(eng.checkpoint_every, plan.record_ratio, nested=plan.nested,
                           sync_free=plan.sync_free, share=self.functional) if keep_checkpoints else None
        # conv networks: wide steps; kept per-step tensors go to chunks (retain.py)
        keep = ChunkStore().keep if eng.syn is not None else identity
        stats = new_stats(T, B, eng.device, eng.histogram_bins)
        st = eng.initial_state()
        if eng.window and autograd:  # plain autograd: surrogates parked until their window ends
            st.carrier = torch.zeros_like(st.v)
        pending = torch.zeros(B, eng.width, dtype=torch.bool, device=eng.device)
        ops: list[Op] = []
        outs = []
        for t in range(T):
            self._next(ckpt, ops, st, PassStart(t))
            st = eng.op_start(st)
            if not cfg.carry_pending:
                pending = torch.zeros_like(pending)
            ps = Pass(B, eng.width, eng.dtype, eng.device, pending, eager_first=cfg.stop == "output",
                      fill=eng.fill, histogram_bins=eng.histogram_bins, keep=keep)
            x = frames[t]
            self._next(ckpt, ops, st, InputStep(t))
            st, info = self._input(st, x, wt, t)
            step = 0
            if info is None:
                ps.pending = ps.pending | F.pad(x != 0, (0, eng.width - net.n_inputs))
            else:
                step = 1
                nz = (x != 0).sum(1)
                ps.steps += 1
                ps.input_synops = nz * net.layer_sizes[1] if eng.syn is None else \
                    ((x != 0) * eng.tables.fan_out[:net.n_inputs]).sum(1)
                ps.input_processed = nz
                self.whole.bookkeep(ps, st, info)
            if self.fused is not None:
                st = self._fused_pass(st, ps, ckpt, ops, t, step)
            else:
                st = self._steps(st, ps, ckpt, ops, wt, t, step)
            ps.store(stats, t, cfg, eng.tables.fan_out, eng.hidden_f, eng.ops.pass_stats)
            pending = ps.pending
            self._next(ckpt, ops, st, PassEnd(t))
            st, out = eng.op_end(st)
            outs.append(out)
        stats["final_v"] = st.v[:, net.neuron_slice].detach()
        return Forward(torch.stack(outs), stats, ops, ckpt.saved if ckpt else None)

    @staticmethod
    def _next(ckpt: Checkpoints | None, ops: list[Op], st: State, op: Op) -> None:
        """Record `op`, offering the state before it to the checkpoints."""
        if ckpt is not None:
            ckpt.offer(len(ops), st)
        ops.append(op)

    def _input(self, st: State, x: torch.Tensor, wt: torch.Tensor, t: int) -> tuple[State, StepInfo | None]:
        """The frame `x` [B, n_inputs] of pass `t`: queued (no evaluation: None), or
        prioritized: delivered as one forward step, evaluated over the whole state."""
        eng = self.eng
        if not eng.cfg.prioritize_input:
            return eng.queue_input(st, x), None
        current, n_add = eng.input_current(x, wt)
        return self.whole.evaluate(st, current, n_add, eng.layer1, t, 0, x)

    def _steps(self, st: State, ps: Pass, ckpt: Checkpoints | None, ops: list[Op], wt: torch.Tensor,
               t: int, step: int) -> State:
        """The event steps of pass `t`, one at a time (the per-op mode)."""
        eng = self.eng
        every, i = eng.plan.stop_every, 0
        while True:
            done = ps.done(eng.cfg)
            # the stop test, before every `every`-th step: a step after every sample is
            # done is a no-op (nothing pending: all dump slots), recorded, changing nothing
            if i % every == 0 and host.read(done.all()):
                return st
            i += 1
            active = ~done[:, None]
            fill = (ps.fillable & ~ps.pending & active, st.v) if eng.fill else None
            sel, sel_deliv = eng.select(ps.pending & active, ps.pre_spike, t, step, fill)
            # int32 halves the per-step record; flat indices stay far below 2**31
            self._next(ckpt, ops, st, EventStep(t, step, ps.keep(sel.to(torch.int32)),
                                                None if sel_deliv is sel else ps.keep(sel_deliv.to(torch.int32))))
            sel_all = eng.decode(sel)[1]
            ps.pending.scatter_(1, sel_all, False)  # the pass's own (`Pass`): before the step's bookkeeping
            if eng.fill:  # delivered (or dropped): emptied
                ps.fillable.scatter_(1, sel_all, False)
            st, info, mode = self.mode.step(st, sel, sel_deliv, wt, t, step, ps)
            ps.delivered.append(ps.keep(sel_deliv))
            ps.values.append(ps.keep(info.vals))
            ps.steps += ~done
            mode.bookkeep(ps, st, info)
            step += 1

    def _fused_pass(self, st: State, ps: Pass, ckpt: Checkpoints | None, ops: list[Op], t: int,
                    step: int) -> State:
        """The event steps of pass `t` through the fused steps, in batches up to the next
        op index a checkpoint may be taken at (or a bounded buffer: ~1 MB of
        selections); the stop test once here, then once per batch. Returns the state
        after them (a copy: the fused steps update it in place)."""
        eng = self.eng
        st, done = self.fused.begin_pass(st, ps)
        cap = max(1, 2**18 // (eng.batch * eng.K))
        all_done = host.read(done.all())
        while not all_done:
            if ckpt is not None:
                ckpt.offer(len(ops), st)
            n_max = cap if ckpt is None else min(cap, ckpt.c - len(ops) % ckpt.c)
            batch, all_done = self.fused.forward(ps, t, step, n_max)  # no checkpoint is due inside
            ops.extend(batch)
            step += len(batch)
        return st

    # --- replay and backward sweep --------------------------------------------------------
    def replay(self, ops: list[Op], st: State, frames: torch.Tensor, wt: torch.Tensor,
               states_every: int | None = None) -> list[StepRecord | None] | dict[int, PackedState]:
        """Re-run a segment's ops from `st` (no grad): the records of each op's backward
        (None where it needs none). With `states_every` = c: keep no records, only the
        state before every c-th op ({op index in the segment: state}) -- the inner
        checkpoints of a nested segment."""
        eng = self.eng
        records, states = [], {}
        keep = states_every is None
        stores = RecordStores(eng.syn is not None)
        owned = False  # the fused steps replay in place, on a state of their own
        for i, op in enumerate(ops):
            if owned and (not isinstance(op, EventStep) or not keep and i % states_every == 0):
                self.fused.flush()  # their run of steps replayed before anything reads the state
            if not keep and i % states_every == 0:
                # a copy where the steps go on in place (fused, receivers)
                states[i] = st.pack(eng.plan.sync_free, share=self.functional)
            rec = None
            match op:
                case EventStep():
                    st, rec, owned = self._replay_step(op, st, wt, stores if keep else None, owned)
                case PassStart():
                    st = eng.op_start(st)
                case InputStep(t=t):
                    st, info = self._input(st, frames[t], wt, t)
                    if info is not None and keep:  # the frame: not copied
                        rec = self.whole.record(info, RecordStores(False))
                case PassEnd():
                    st, _ = eng.op_end(st)
            if not isinstance(op, EventStep):
                owned = False
            if keep:
                records.append(rec)
        if owned:
            self.fused.flush()
        return records if keep else states

    def _replay_step(self, op: EventStep, st: State, wt: torch.Tensor, stores: RecordStores | None,
                     owned: bool) -> tuple[State, StepRecord | None, bool]:
        """Event step `op` again from `st`: (the state after it, its record -- None
        without `stores`, but for the fused steps' own --, whether the fused steps own
        the state now: they replay in place, on a copy made at the first step)."""
        if self.fused is not None:
            if not owned:
                st = self.fused.own(st)
            return st, self.fused.replay(op), True
        st, info, mode = self.mode.step(st, *op.selections(), wt, op.t, op.step, None, stores)
        return st, None if stores is None else mode.record(info, stores), False

    def backward(self, ops: list[Op], ckpts: dict[int, PackedState], frames: torch.Tensor, wt: torch.Tensor,
                 grad_out: torch.Tensor, want_frames: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The gradients (frames or None, weight table) of the call's forward `ops` from
        the readout's `grad_out` [T, B, n_out]; the checkpoints are used up (popped)."""
        st_end = ckpts[max(ckpts)]
        sweep = Sweep(frames, wt, grad_out.contiguous(), Adjoints.zeros(st_end, self.eng.window), torch.zeros_like(wt),
                      torch.zeros_like(frames) if want_frames else None)
        starts = sorted(ckpts)
        ends = starts[1:] + [len(ops)]
        if self.fused is not None:
            self.fused.bind_weights(wt)
        with torch.no_grad():
            for i0, i1 in reversed(list(zip(starts, ends))):
                self.sweep_segment(ops[i0:i1], ckpts.pop(i0).unpack(), sweep)
        return sweep.grad_frames, sweep.grad_wt

    def sweep_segment(self, ops: list[Op], st0: State, sweep: Sweep) -> None:
        """The adjoints at the segment's start from those at its end (`sweep.adj`, in
        place); adds the segment's gradients into `sweep`. A long segment of a nested
        plan is recomputed once to keep inner states, then swept one part at a time."""
        every = self.eng.plan.sub_segment(len(ops))
        if every is None:
            return self._sweep(ops, st0, sweep)
        states = self.replay(ops, st0, sweep.frames, sweep.wt, states_every=every)
        for i0 in sorted(states, reverse=True):
            self._sweep(ops[i0:i0 + every], states.pop(i0).unpack(), sweep)

    def _sweep(self, ops: list[Op], st0: State, sweep: Sweep) -> None:
        """`sweep_segment` with every op's record kept at once."""
        eng = self.eng
        records = self.replay(ops, st0, sweep.frames, sweep.wt)
        for op, rec in zip(reversed(ops), reversed(records)):
            match op:
                case PassEnd(t=t):
                    eng.end_backward(sweep.adj, sweep.grad_out[t])
                case PassStart():
                    eng.start_backward(sweep.adj)
                case InputStep(t=t):
                    grad_x = None if sweep.grad_frames is None else sweep.grad_frames[t]
                    if rec is None:  # frame queued into the outboxes: O += x
                        eng.queue_input_backward(sweep.adj, grad_x)
                    else:  # prioritized: one forward step
                        g_current = rec.mode.evaluation_backward(rec, sweep.adj)
                        eng.input_backward(rec.vals, g_current, sweep.wt, sweep.grad_wt, grad_x)
                case EventStep():
                    rec.mode.step_backward(op, rec, sweep)
