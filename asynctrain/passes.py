"""One call's passes: the loop over timesteps and forward steps (`run`), the
per-pass bookkeeping (`_Pass`) and the stats it reduces to (`new_stats`).

The engine (`engine.Engine`) holds the constants and the ops; `run` executes them,
selects, records the ops for the backward and offers states to the checkpoints.
The loop's only host read is its stop test (`kernels/host.py`): before every
`Engine.stop_every`-th per-op step, once per batch of fused steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import SimConfig
from .kernels import host
from .retain import ChunkStore, identity
from .segments import Checkpoints, _offer
from .state import State, StepInfo, StepInfoAt, StepInfoListed

if TYPE_CHECKING:
    from .engine import Engine


def run(eng: "Engine", frames: torch.Tensor, wt: torch.Tensor, *, keep_checkpoints: bool):
    """Execute all passes. Returns (out [T, B, n_out], stats, ops, checkpoints)."""
    cfg, net = eng.cfg, eng.net
    T, B = frames.shape[0], eng.batch
    fused = eng.fused
    if fused is not None and torch.is_grad_enabled() and (wt.requires_grad or frames.requires_grad):
        fused = None  # plain autograd through every step: the torch ops
    if fused is not None:
        fused.bind_weights(wt)
    ckpt = Checkpoints(eng.checkpoint_every, eng.record_ratio, nested=eng.nested,
                       sync_free=eng.sync_free) if keep_checkpoints else None
    # conv networks: wide steps; kept per-step tensors go to chunks (retain.py)
    keep = ChunkStore().keep if eng.syn is not None else identity
    stats = new_stats(T, B, eng.device, eng.histogram_bins)
    st = eng.initial_state()
    pending = torch.zeros(B, eng.width, dtype=torch.bool, device=eng.device)
    ops: list[tuple] = []
    outs = []
    for t in range(T):
        _offer(ckpt, ops, st)
        ops.append(("start", t))
        st = eng.op_start(st)
        if not cfg.carry_pending:
            pending = torch.zeros_like(pending)
        ps = _Pass(B, eng.width, eng.dtype, eng.device, pending, eager_first=cfg.stop == "output")
        ps.keep = keep
        if eng.fill:
            ps.fillable = torch.zeros_like(pending)
        x = frames[t]
        _offer(ckpt, ops, st)
        ops.append(("input", t))
        st, info = eng.op_input(st, x, wt, t)
        k = 0
        if info is None:
            ps.pending = ps.pending | torch.nn.functional.pad(x != 0, (0, eng.width - net.n_inputs))
        else:
            k = 1
            nz = (x != 0).sum(1)
            ps.steps += 1
            ps.input_synops = nz * net.layer_sizes[1] if eng.syn is None else \
                ((x != 0) * eng.tables.fan_out[:net.n_inputs]).sum(1)
            ps.input_processed = nz
            after_eval(eng, st, info, ps)
        if fused is not None:
            st = _fused_pass(eng, fused, st, ps, ckpt, ops, t, k)
        every, i = eng.stop_every, 0
        while fused is None:
            done = ps.done(cfg)
            # the stop test, before every `every`-th step: a step after every sample is
            # done is a no-op (nothing pending: all dump slots), recorded, changing nothing
            if i % every == 0 and host.read(done.all()):
                break
            i += 1
            active = ~done[:, None]
            fill = (ps.fillable & ~ps.pending & active, st.v) if eng.fill else None
            sel, sel_deliv = eng.select(ps.pending & active, ps.pre_spike, t, k, fill)
            _offer(ckpt, ops, st)
            ops.append(("step", t, k, keep(_compact(sel)),
                        None if sel_deliv is sel else keep(_compact(sel_deliv))))
            st, info = eng.op_step(st, sel, sel_deliv, wt, t, k)
            sel_all = eng.decode(sel)[1]
            ps.pending = ps.pending.scatter(1, sel_all, False)
            if eng.fill:  # delivered (or dropped): emptied
                ps.fillable = ps.fillable.scatter(1, sel_all, False)
            ps.delivered.append(keep(sel_deliv))
            ps.values.append(keep(info.vals))
            ps.steps += ~done
            after_eval(eng, st, info, ps)
            k += 1
        ps.store(stats, t, cfg, eng.tables.fan_out, eng.hidden_f)
        pending = ps.pending
        _offer(ckpt, ops, st)
        ops.append(("end", t))
        outs.append(eng.op_end(st))
    stats["final_v"] = st.v[:, net.neuron_slice].detach()
    return torch.stack(outs), stats, ops, (ckpt.saved if ckpt else None)


def _fused_pass(eng: "Engine", fused, st: State, ps: _Pass, ckpt: Checkpoints | None, ops: list,
                t: int, k: int) -> State:
    """The event steps of one pass through the backend's fused steps (same ops,
    records and bookkeeping as the loop in `run`); returns the state after them.
    The fused steps update their state in place: they get copies of their own."""
    st = st.clone()
    ps.pending = ps.pending.clone()
    if ps.fillable is not None:
        ps.fillable = ps.fillable.clone()
    done = ps.done(eng.cfg).contiguous()
    if eng.histogram_bins and not isinstance(ps.currents, torch.Tensor):
        ps.currents = torch.zeros(eng.histogram_bins, dtype=torch.int64, device=eng.device)
    fused.bind_state(st)
    fused.bind_pass(ps, done, ps.currents if eng.histogram_bins else None)
    dropout = eng.p_net > 0
    # Steps run in batches up to the next op index a checkpoint may be taken at
    # (or a bounded buffer: ~1 MB of selections), one C call per batch.
    # The stop test: once here, then one read per batch (`forward_batch`).
    cap = max(1, 2**18 // (eng.batch * eng.k))
    all_done = host.read(done.all())
    while not all_done:
        _offer(ckpt, ops, st)
        n_max = cap if ckpt is None else min(cap, ckpt.c - len(ops) % ckpt.c)
        sel, sel_deliv, vals, out_fired, all_done = fused.forward_batch(t, k, n_max)
        for i in range(sel.shape[0]):  # no checkpoint is due inside a batch
            ops.append(("step", t, k, sel[i], sel_deliv[i] if dropout else None))
            ps.delivered.append(sel_deliv[i])
            ps.values.append(vals[i])
            ps.out_fired.append(out_fired[i])
            k += 1
    return st

def after_eval(eng: "Engine", st: State, info: StepInfo | StepInfoAt, ps: _Pass) -> None:
    """Non-differentiable bookkeeping after a neuron evaluation: pending flags,
    pre-spike potentials, spikes, first output step."""
    if isinstance(info, StepInfoListed):
        return _after_eval_listed(eng, info, ps)
    if isinstance(info, StepInfoAt):
        return _after_eval_at(eng, info, ps)
    fired = info.spikes > 0
    is_src = eng.tables.is_source
    ps.pending = ps.pending | (fired & is_src)
    if eng.fill:  # the outbox now holds surrogate gradient: synced and not clamped
        ps.fillable = ps.fillable | (info.gate & ~info.refr & eng.tables.is_hidden)
    if eng.cfg.barrier_messages:
        reached = (info.n_before < eng.sync) & (st.n_in >= eng.sync)
        ps.pending = ps.pending | (reached & ~fired & is_src)
    if eng.cfg.policy == "MS":  # the momentum key; RS never reads it
        ps.pre_spike = torch.where(fired, info.v_pre, ps.pre_spike)
    ps.spike_sum = ps.spike_sum + info.spikes
    out_fired = fired[:, eng.net.output_slice].any(1)
    if ps.eager_first:  # the output stop needs the first output step now
        ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
    ps.out_fired.append(ps.keep(out_fired))
    if eng.histogram_bins and eng.sync_free:  # the same counts, no boolean mask
        if not isinstance(ps.currents, torch.Tensor):
            ps.currents = torch.zeros(eng.histogram_bins, dtype=torch.int64, device=fired.device)
        counts = st.n_in.clamp(max=eng.histogram_bins - 1).long()
        ps.currents.scatter_add_(0, counts.view(-1), fired.view(-1).long())
    elif eng.histogram_bins:
        # currents integrated before each spike (SPEC 9), hidden and output neurons
        counts = st.n_in[fired].clamp(max=eng.histogram_bins - 1).long()
        ps.currents += torch.bincount(counts, minlength=eng.histogram_bins)

def _fired_and_pending(eng: "Engine", info: StepInfoAt, col: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """At a step's receivers (columns `col`): (fired, newly pending: sources that fired
    or, with barrier messages, just reached their sync threshold)."""
    fired = info.spikes > 0
    is_src = eng.tables.is_source[col]
    new = fired & is_src
    if eng.cfg.barrier_messages:
        sync = eng.sync[col]
        new = new | ((info.n_before < sync) & (info.n_in >= sync) & is_src)
    return fired, new


def _after_eval_at(eng: "Engine", info: StepInfoAt, ps: _Pass) -> None:
    """`after_eval` at the receivers of a step (in place on the pass's own
    tensors: the step's selection has just replaced `ps.pending`)."""
    w = eng.width
    idx, col = info.idx, info.idx % w
    fired, new = _fired_and_pending(eng, info, col)
    ps.pending.view(-1)[idx[new]] = True
    if eng.fill:
        ps.fillable.view(-1)[idx[info.gate & ~info.refr & eng.tables.is_hidden[col]]] = True
    if eng.cfg.policy == "MS":
        ps.pre_spike.view(-1)[idx[fired]] = info.v_pre[fired]
    ps.spike_sum.view(-1)[idx] = ps.spike_sum.view(-1)[idx] + info.spikes
    out_fired = torch.zeros(eng.batch, dtype=torch.bool, device=idx.device)
    out_fired[idx[fired & eng.at_outputs(idx)[0]] // w] = True
    if ps.eager_first:
        ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
    ps.out_fired.append(ps.keep(out_fired))
    if eng.histogram_bins:
        counts = info.n_in[fired].clamp(max=eng.histogram_bins - 1).long()
        ps.currents += torch.bincount(counts, minlength=eng.histogram_bins)


def _after_eval_listed(eng: "Engine", info: StepInfoListed, ps: _Pass) -> None:
    """`after_eval` at a step's receiver list (`Engine._op_step_listed`), in place on
    the pass's own tensors and without a host read: every repeat of a column gathers
    the same values first and writes the same result; not-valid entries (the dump
    column) change nothing. The histogram counts each column once (the first of its
    repeats in the sorted list)."""
    w = eng.width
    idx, col = info.idx, info.idx % w
    fired, new = _fired_and_pending(eng, info, col)
    ps.pending.view(-1)[idx] = ps.pending.view(-1)[idx] | new
    if eng.fill:
        ps.fillable.view(-1)[idx] = ps.fillable.view(-1)[idx] | (info.gate & ~info.refr & eng.tables.is_hidden[col])
    if eng.cfg.policy == "MS":
        ps.pre_spike.view(-1)[idx] = torch.where(fired, info.v_pre, ps.pre_spike.view(-1)[idx])
    ps.spike_sum.view(-1)[idx] = ps.spike_sum.view(-1)[idx] + info.spikes
    at_out = (fired & eng.at_outputs(idx)[0]).to(torch.int32)
    out_fired = torch.zeros(eng.batch, dtype=torch.int32, device=idx.device).index_add_(0, idx // w, at_out) > 0
    if ps.eager_first:
        ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
    ps.out_fired.append(ps.keep(out_fired))
    if eng.histogram_bins:
        if not isinstance(ps.currents, torch.Tensor):
            ps.currents = torch.zeros(eng.histogram_bins, dtype=torch.int64, device=idx.device)
        order_idx, order = idx.sort()
        first = torch.ones_like(fired)
        first[1:] = order_idx[1:] != order_idx[:-1]
        counts = info.n_in[order].clamp(max=eng.histogram_bins - 1).long()
        ps.currents.scatter_add_(0, counts, (fired[order] & first).long())


def _compact(sel: torch.Tensor) -> torch.Tensor:
    # int32 halves the per-step record; flat indices stay far below 2**31.
    return sel.to(torch.int32)


def new_stats(T: int, B: int, device, histogram_bins: int = 0) -> dict:
    z = lambda: torch.zeros(T, B, dtype=torch.int64, device=device)  # noqa: E731
    stats = {"forward_steps": z(), "synops": z(), "spikes_processed": z(),
             "first_output_step": z() - 1, "spikes_to_first_output": z() - 1,
             "capped": torch.zeros(T, B, dtype=torch.bool, device=device),
             "hidden_spikes": torch.zeros(B, dtype=torch.int64, device=device)}
    if histogram_bins:
        stats["currents_to_spike"] = torch.zeros(histogram_bins, dtype=torch.int64, device=device)
    return stats


class _Pass:
    """Per-pass, per-sample bookkeeping of the forward (never replayed). Per step it
    only appends; stats that need no per-step decision are reduced once per pass."""

    def __init__(self, B: int, W: int, dtype, device, pending: torch.Tensor, eager_first: bool):
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
        self.currents = 0
        self.fillable: torch.Tensor | None = None  # fill_slots: outbox holds gradient, bool [B, W]
        self.keep = identity  # what the per-step lists store (retain.py)

    def done(self, cfg: SimConfig) -> torch.Tensor:
        """bool [B]: the sample's pass is over (SPEC 4.2)."""
        done = ~self.pending.any(1) | (self.steps >= cfg.max_steps)
        if cfg.stop == "output":
            done = done | ((self.first_out >= 0) & (self.steps >= self.first_out + cfg.steps_after_output))
        return done

    def store(self, stats: dict, t: int, cfg: SimConfig, fan_out: torch.Tensor,
              hidden_f: torch.Tensor) -> None:
        B = self.steps.shape[0]
        zero = torch.zeros_like(self.steps)
        synops = zero if self.input_synops is None else self.input_synops
        per_step = [zero if self.input_processed is None else self.input_processed]
        if self.values:
            # [S, B, K]; fillers (-1 - column) hold 0: clamped to column 0, counted nowhere
            vals, sel = torch.stack(self.values), torch.stack(self.delivered).long().clamp(min=0)
            spikes = vals != 0  # empty and dropped slots hold 0; barrier messages are 0 too
            synops = synops + (fan_out[sel] * spikes).sum((0, 2))
            per_step.append(spikes.sum(2))
        # spikes delivered up to and including each evaluation: [evaluations, B]
        cum = torch.cat([p.reshape(-1, B) for p in per_step]).cumsum(0)
        if self.input_processed is None:
            cum = cum[1:]
        if self.out_fired:
            fired = torch.stack(self.out_fired)
            any_out = fired.any(0)
            first_eval = fired.to(torch.int8).argmax(0)  # first evaluation with an output spike
        else:  # nothing was evaluated in this pass
            any_out, first_eval = torch.zeros_like(self.steps, dtype=torch.bool), zero
        at_cap = self.steps >= cfg.max_steps
        capped = at_cap & self.pending.any(1)
        if cfg.stop == "output":
            capped &= ~((self.first_out >= 0) & (self.steps >= self.first_out + cfg.steps_after_output))
        stats["forward_steps"][t] = self.steps
        stats["synops"][t] = synops
        stats["spikes_processed"][t] = cum[-1] if len(cum) else zero
        # evaluation i is forward step i + 1 of a sample still running then
        stats["first_output_step"][t] = torch.where(any_out, first_eval + 1, -1)
        stats["spikes_to_first_output"][t] = torch.where(
            any_out, cum.gather(0, first_eval[None]).squeeze(0) if len(cum) else zero, -1)
        stats["capped"][t] = capped
        stats["hidden_spikes"] += (self.spike_sum * hidden_f).sum(1).to(torch.int64)
        if isinstance(self.currents, torch.Tensor):
            stats["currents_to_spike"] += self.currents
