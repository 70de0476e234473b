"""The event-driven engine (torch backend): SPEC sections 3-6 for one batch.

A call runs T passes (timesteps). The timeline of a call is a flat list of ops::

    ("start", t)  ("input", t)  ("step", t, k, sel, sel_delivered) ...  ("end", t)

Only "step" ops need a record: the [B, K] indices they selected (int32; fillers of
`fill_slots` as -1 - column, `Engine.decode`, so a record stays [B, K]). The
differentiable state is (V, O, acc) -- membrane, outbox values, output accumulator
of the pass -- plus two non-differentiable tensors the replay needs (refractory
flag, received-current count). The pending flag and the pre-spike potential only
drive selection, which is recorded, so the backward never needs them.

`Engine.run` executes the ops and the selection; with grad enabled it is plain
autograd through every step (``checkpoint_every=0``). `backward.EventFunction` runs
it without grad, keeps a state checkpoint every C ops (adaptive C ~ sqrt(ops) by
default) and, in the backward, recomputes one segment at a time from its checkpoint
and sweeps it in reverse by hand. Randomness that changes values in the recompute
(refractory dropout) comes from the counter hash of `rng`, so it replays exactly.

Per step the work is K x F_max (gather, scatter) plus O(N) elementwise and one
topk over [B, N + 1]; nothing is N x N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


from . import rng
from .config import SimConfig, per_neuron
from .network import Network
from .retain import ChunkStore, identity
from .backends import TORCH, Ops
from .ops import deliver, lif
from .kernels.lif import lif_torch
from .kernels.select import select_pending_torch
from .kernels.step_spec import StepSpec


# Conv steps without autograd run at their receivers when at most this fraction of
# the [B, W] columns received, else over the whole state (`Engine._evaluate_at`).
SPARSE_BELOW = 0.5


@dataclass
class State:
    """One batch's state; differentiable: v, o, acc. The torch ops update it
    functionally (never in place: autograd runs through them), the fused steps in
    place; a checkpoint is a packed copy either way (`PackedState`)."""

    v: torch.Tensor        # [B, W] membrane
    o: torch.Tensor        # [B, W] outbox values (pending spikes not yet delivered)
    acc: torch.Tensor      # [B, n_out] output spikes of the current pass
    refr: torch.Tensor     # bool [B, W]
    n_in: torch.Tensor     # int32 [B, W] currents received in this pass

    def clone(self) -> "State":
        """A copy the fused CPU steps may update in place (they never touch a checkpoint)."""
        return State(self.v.clone(), self.o.clone(), self.acc.clone(), self.refr.clone(),
                     self.n_in.clone())

    def pack(self) -> "PackedState":
        """A copy in fewer bytes for a checkpoint (`PackedState`)."""
        return PackedState.of(self)


@dataclass
class PackedState:
    """A kept state in ~8 bytes per column instead of 13: the outboxes as their nonzero
    entries when under half are nonzero (pending spikes: a few percent at small K),
    the received counts as int16 when they fit. A copy: the state may go on being
    updated in place (fused steps)."""

    v: torch.Tensor
    o: torch.Tensor                # [B, W], or the values at `o_at`
    o_at: torch.Tensor | None      # int32 flat positions of the nonzero outboxes
    acc: torch.Tensor
    refr: torch.Tensor
    n_in: torch.Tensor             # int16 or int32
    n_in_dtype: torch.dtype

    @staticmethod
    def of(st: State) -> "PackedState":
        at = st.o.reshape(-1).nonzero().squeeze(1)
        sparse = 2 * at.numel() < st.o.numel() < 2**31
        o, o_at = (st.o.reshape(-1)[at], at.to(torch.int32)) if sparse else (st.o.clone(), None)
        small = st.n_in.numel() == 0 or int(st.n_in.abs().max()) < 2**15
        n_in = st.n_in.to(torch.int16) if small else st.n_in.clone()
        return PackedState(st.v.clone(), o, o_at, st.acc.clone(), st.refr.clone(), n_in, st.n_in.dtype)

    def unpack(self) -> State:
        """The state (sharing this one's tensors: clone before updating it in place)."""
        o = self.o
        if self.o_at is not None:
            o = torch.zeros_like(self.v).reshape(-1).index_put_((self.o_at.long(),), self.o).view_as(self.v)
        return State(self.v, o, self.acc, self.refr, self.n_in.to(self.n_in_dtype))


@dataclass
class StepInfo:
    """What one neuron evaluation leaves for the bookkeeping and the backward sweep."""

    vals: torch.Tensor     # [B, K] delivered values (the frame for the input step)
    spikes: torch.Tensor   # [B, W]
    v_pre: torch.Tensor    # [B, W] V1 (pre-spike potential)
    received: torch.Tensor  # bool [B, W]
    n_before: torch.Tensor  # int32 [B, W]
    gate: torch.Tensor     # bool [B, W] received and synced
    refr: torch.Tensor     # bool [B, W] refractory before the step


@dataclass
class StepInfoAt:
    """`StepInfo` at the receivers of a step only (conv networks without autograd:
    `Engine._evaluate_at`); everyone else received nothing and did not change."""

    vals: torch.Tensor     # [B, K]
    idx: torch.Tensor      # int64 [R] receivers, flat in [B * W], ascending
    spikes: torch.Tensor   # [R]
    v_pre: torch.Tensor    # [R]
    n_before: torch.Tensor  # int32 [R]
    n_in: torch.Tensor     # int32 [R] after the step
    gate: torch.Tensor     # bool [R]
    refr: torch.Tensor     # bool [R] refractory before the step

    def dense(self, shape: tuple[int, int]) -> StepInfo:
        """The full record (the backward keeps it when most columns received)."""
        def put(x):
            return torch.zeros(shape, dtype=x.dtype, device=x.device).view(-1) \
                .index_put_((self.idx,), x).view(shape)
        return StepInfo(self.vals, put(self.spikes), put(self.v_pre),
                        put(torch.ones_like(self.gate)), put(self.n_before), put(self.gate), put(self.refr))


class Engine:
    """Constants of one call (device, dtype, per-neuron knobs) and the ops."""

    def __init__(self, net: Network, cfg: SimConfig, *, batch: int, device: torch.device,
                 dtype: torch.dtype, training: bool, seed: int,
                 checkpoint_every: int | None = None, histogram: bool = False, ops: Ops = TORCH):
        self.net, self.cfg, self.training, self.seed = net, cfg, training, seed
        self.ops = ops
        # bins 0 .. max fan-in of the currents-to-spike histogram (0 = not recorded)
        self.histogram_bins = (max(net.layer_sizes[:-1]) + 1) if histogram else 0
        self.batch, self.device, self.dtype = batch, device, dtype
        self.checkpoint_every = checkpoint_every
        self.tables = net.tables(device)
        w = net.width + 1
        nn_, nin = net.n_neurons, net.n_inputs

        def full_width(values: torch.Tensor, pad: float) -> torch.Tensor:
            return torch.cat([torch.full((nin,), pad, dtype=values.dtype), values,
                              torch.full((1,), pad, dtype=values.dtype)]).to(device)

        theta = per_neuron(cfg.theta, nn_, "theta", dtype)
        self.theta = full_width(theta, math.inf)  # inputs and dump never fire
        tau = per_neuron(cfg.tau, nn_, "tau", torch.float64)
        self.decay = full_width(torch.exp(-cfg.dt / tau).to(dtype), 1.0)
        sync = per_neuron(cfg.sync_threshold, nn_, "sync_threshold", torch.float64)
        self.sync = full_width(sync.to(torch.int32), 1)
        self.source_f = self.tables.is_source.to(dtype)
        self.hidden_f = self.tables.is_hidden.to(dtype)
        self.width = w
        layer1 = torch.zeros(w, dtype=torch.bool)
        layer1[net.offsets[1]:net.offsets[1] + net.layer_sizes[1]] = True
        self.layer1 = layer1.to(device).expand(batch, w)
        # Convolutional networks: targets computed per step (conv.ImageSynapses); the
        # prioritized input step counts each layer-1 neuron's own fan-in.
        self.syn = net.synapses if net.image else None
        if self.syn is not None:
            fan_in1 = torch.zeros(w, dtype=torch.int32)
            fan_in1[layer1] = self.syn.fan_in[:net.layer_sizes[1]].to(torch.int32)
            self.input_n_add = fan_in1.to(device).expand(batch, w)
        # Bytes of a step's backward record (compact: ~K x mean fan-out receivers per
        # sample, 10 B each, backward.CompactInfo) over those of a checkpoint (~8 B per
        # column, PackedState): the adaptive checkpoints keep fewer states when records
        # are smaller.
        self.record_ratio = 1.0 if self.syn is None else \
            min(1.0, 10 * min(cfg.forward_group_size, w) * self.syn.mean_fan_out / (8 * w))
        # Conv networks, adaptive checkpoints: the backward splits each segment again
        # (`sub_segment`), so the memory of the backward grows as ops^(1/3), not sqrt(ops),
        # for one more recompute of the forward (fully connected networks: two levels).
        self.nested = self.syn is not None and checkpoint_every is None
        self.k = min(cfg.forward_group_size, w)
        self.alpha = float(cfg.surrogate_steepness)
        # SPEC 8 fill_slots (training only): fillers ride in the step records as
        # negative indices, -1 - column (`decode`)
        self.fill = bool(cfg.fill_slots) and training and cfg.policy != "layered"
        # MS with queued input: the inputs' order is a per-pass permutation (SPEC 6)
        self.random_inputs = (cfg.policy == "MS" and not cfg.prioritize_input
                              and cfg.input_order == "random")
        # Training-only randomness.
        t = training
        self.p_ref = cfg.refractory_dropout if t else 0.0
        self.p_net = cfg.network_dropout if t else 0.0
        self.noise = cfg.momentum_noise if t else 0.0
        # A backend's fused steps (`Ops.fused`, e.g. kernels/cpu_step.py): fully connected
        # networks; they update states in place.
        self.fused = ops.fused(self.step_spec()) if (ops.fused is not None and self.syn is None
                                         and dtype in (torch.float32, torch.float64)
                                         and (not histogram or ops.fused.records_histogram)
                                         and (not self.fill or ops.fused.fills_slots)) else None

    def step_spec(self) -> StepSpec:
        """What a backend's fused steps read (`kernels/step_spec.py`)."""
        net, cfg, tab = self.net, self.cfg, self.tables
        # slot l (the sources of layer l) reaches layer l + 1; outputs and the dump nobody
        n_slots = net.n_layers + 2
        lo = torch.zeros(n_slots, dtype=torch.int64)
        hi = torch.zeros(n_slots, dtype=torch.int64)
        for l in range(net.n_layers):
            lo[l], hi[l] = net.offsets[l + 1], net.offsets[l + 1] + net.layer_sizes[l + 1]
        out = net.output_slice
        return StepSpec(
            batch=self.batch, width=self.width, k=self.k, fan_out=tab.targets.shape[1], dtype=self.dtype,
            device=self.device, source_slot=tab.source_slot, slot_lo=lo, slot_hi=hi,
            is_source=tab.is_source, is_input=tab.is_input, sync=self.sync, theta=self.theta,
            out_lo=out.start, out_hi=out.stop, policy_ms=cfg.policy == "MS", input_random=self.random_inputs,
            fill=self.fill, refractory=bool(cfg.refractory), barrier=bool(cfg.barrier_messages),
            stop_output=cfg.stop == "output", detach_reset=bool(cfg.detach_reset), noise=float(self.noise),
            p_ref=float(self.p_ref), p_net=float(self.p_net), alpha=self.alpha, max_steps=int(cfg.max_steps),
            steps_after_output=int(cfg.steps_after_output), seed=int(self.seed))

    def sub_segment(self, n_ops: int) -> int | None:
        """Ops between the states the backward keeps inside a segment of `n_ops` ops
        (None: it keeps every op's record instead). Nested engines split a segment whose
        records would outweigh 4 states: c ~ sqrt(n / r) ops per sub-segment, so about
        2 sqrt(n r) states' worth of states and records are held at once."""
        r = self.record_ratio
        if not self.nested or n_ops * r <= 4:
            return None
        return math.ceil(math.sqrt(n_ops / r))

    # --- ops (used by the forward and by the replay) --------------------------------
    def initial_state(self) -> State:
        b, w = self.batch, self.width
        z = torch.zeros(b, w, dtype=self.dtype, device=self.device)
        return State(z, z, z.new_zeros(b, self.net.n_outputs),
                     torch.zeros(b, w, dtype=torch.bool, device=self.device),
                     torch.zeros(b, w, dtype=torch.int32, device=self.device))

    def op_start(self, st: State) -> State:
        o = st.o if self.cfg.carry_pending else torch.zeros_like(st.o)
        return State(st.v * self.decay, o, torch.zeros_like(st.acc),
                     torch.zeros_like(st.refr), torch.zeros_like(st.n_in))

    def op_input(self, st: State, x: torch.Tensor, wt: torch.Tensor, t: int
                 ) -> tuple[State, StepInfo | None]:
        """Prioritized: deliver the whole frame as one forward step (k = 0).
        Otherwise the frame's nonzero entries join the outboxes."""
        net = self.net
        if not self.cfg.prioritize_input:
            o = st.o + torch.nn.functional.pad(x, (0, self.width - net.n_inputs))
            return replace(st, o=o), None
        if self.syn is not None:
            return self._evaluate(st, st.o, self.syn.input_current(x, wt), self.input_n_add,
                                  self.layer1, t, 0, x)
        lo, n1 = net.offsets[1], net.layer_sizes[1]
        current = torch.nn.functional.pad(x @ wt[:net.n_inputs, :n1], (lo, self.width - lo - n1))
        n_add = self.layer1.to(torch.int32) * net.n_inputs
        return self._evaluate(st, st.o, current, n_add, self.layer1, t, 0, x)

    def op_step(self, st: State, sel: torch.Tensor, sel_deliv: torch.Tensor, wt: torch.Tensor,
                t: int, k: int) -> tuple[State, StepInfo | StepInfoAt]:
        """One event step. Conv networks without autograd update `st` in place at the
        receivers only (`_evaluate_at`): the caller owns `st` (a checkpoint is a packed
        copy); with autograd every op is functional."""
        if self.fill:
            return self._op_step_filled(st, sel, sel_deliv, wt, t, k)
        vals = st.o.gather(1, sel_deliv)
        if self.syn is not None:  # the conv/rows kernels of self.ops (ImageSynapses picks Triton or the twins)
            current, n_add = self.syn.deliver(vals, sel_deliv, wt, self.tables.source_slot, self.ops)
            if not self._autograd(st, wt):
                return self._evaluate_at(st, sel, current, n_add, t, k, vals)
        else:
            current = deliver(vals, sel_deliv, wt, self.tables.targets, self.ops)
            n_add = self.tables.received_counts(sel_deliv)
        return self._evaluate(st, st.o.scatter(1, sel, 0.0), current, n_add, n_add > 0, t, k, vals)

    @staticmethod
    def _autograd(st: State, wt: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (wt.requires_grad or st.v.requires_grad or st.o.requires_grad)

    def decode(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A recorded [B, K] selection -> (the entries that count: fillers as the dump;
        every delivered column: fillers as their column). Fillers (SPEC 8
        `fill_slots`) are recorded as -1 - column, so a record stays one int32 [B, K]."""
        if not self.fill:
            return sel, sel
        filler = sel < 0
        return sel.masked_fill(filler, self.net.dump), torch.where(filler, -1 - sel, sel)

    def _op_step_filled(self, st: State, sel: torch.Tensor, sel_deliv: torch.Tensor, wt: torch.Tensor,
                        t: int, k: int) -> tuple[State, StepInfo | StepInfoAt]:
        """`op_step` with fillers in the selection (SPEC 8): they are delivered like
        outboxes (their zero values reach their targets, which are evaluated, and the
        outboxes are emptied) but add nothing to the received counts, so they change
        no n_in, spike, potential or synop; only the gradient sees them."""
        sel_all = self.decode(sel)[1]
        d_real, d_all = self.decode(sel_deliv)
        vals = st.o.gather(1, d_all)
        if self.syn is not None:
            # two deliveries: the counts of the real entries (n_in), the fillers' targets
            filler = sel_deliv < 0
            dump = self.net.dump
            current, n_add = self.syn.deliver(vals.masked_fill(filler, 0.0), d_real, wt,
                                              self.tables.source_slot, self.ops)
            c_fill, n_fill = self.syn.deliver(vals.masked_fill(~filler, 0.0), d_all.masked_fill(~filler, dump),
                                              wt, self.tables.source_slot, self.ops)
            current, n_recv = current + c_fill, n_add + n_fill
            if not self._autograd(st, wt):
                return self._evaluate_at(st, sel_all, current, n_add, t, k, vals, n_recv)
            received = n_recv > 0
        else:
            current = deliver(vals, d_all, wt, self.tables.targets, self.ops)
            n_add = self.tables.received_counts(d_real)
            received = self.tables.received_counts(d_all) > 0
        return self._evaluate(st, st.o.scatter(1, sel_all, 0.0), current, n_add, received, t, k, vals)

    def _evaluate(self, st: State, o: torch.Tensor, current: torch.Tensor, n_add: torch.Tensor,
                  received: torch.Tensor, t: int, k: int, vals: torch.Tensor
                  ) -> tuple[State, StepInfo]:
        n_in = st.n_in + n_add
        gate = received & (n_in >= self.sync)
        v, spikes, v_pre = lif(st.v, current, st.refr, received, gate, self.theta, self.alpha,
                               self.cfg.detach_reset, self.ops)
        o = o + spikes * self.source_f
        acc = st.acc + spikes[:, self.net.output_slice]
        refr = st.refr
        if self.cfg.refractory:
            fired = spikes > 0
            if self.p_ref > 0:
                # draw only at the neurons that fired: a handful, not [B, N]
                at = fired.nonzero(as_tuple=True)
                u = self.ops.uniform_at(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t, k, *at)
                fired = fired.index_put(at, u >= self.p_ref)
            refr = refr | fired
        return State(v, o, acc, refr, n_in), StepInfo(vals, spikes, v_pre, received, st.n_in, gate,
                                                       st.refr)

    def at_outputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For flat [B * W] positions: (bool, the position is an output neuron's;
        its flat [B * n_out] index into the output accumulator, meaningful there)."""
        out, w = self.net.output_slice, self.width
        col = idx % w
        return (col >= out.start) & (col < out.stop), (idx // w) * (out.stop - out.start) + col - out.start

    def _evaluate_at(self, st: State, sel: torch.Tensor, current: torch.Tensor, n_add: torch.Tensor,
                     t: int, k: int, vals: torch.Tensor, n_recv: torch.Tensor | None = None
                     ) -> tuple[State, StepInfoAt]:
        """`_evaluate` at the receivers of a step only, in place: the same operations
        on the gathered receivers (a VGG-7 step at K=8 reaches ~4% of the columns;
        nobody else changes), then scattered back. Steps that reach most columns run
        `_evaluate` over the whole state instead."""
        w = self.width
        st.o.scatter_(1, sel, 0.0)
        n_recv = n_add if n_recv is None else n_recv  # fillers' targets receive, uncounted
        idx = n_recv.view(-1).nonzero().squeeze(1)
        if idx.numel() > SPARSE_BELOW * n_add.numel():  # most columns received (large K)
            return self._evaluate(st, st.o, current, n_add, n_recv > 0, t, k, vals)
        col = idx % w
        n_before = st.n_in.view(-1)[idx]
        n_in = n_before + n_add.view(-1)[idx]
        gate = n_in >= self.sync[col]
        refr = st.refr.view(-1)[idx]
        v, spikes, v_pre = lif_torch(st.v.view(-1)[idx], current.view(-1)[idx], refr,
                                     torch.ones_like(gate), gate, self.theta[col])
        st.v.view(-1)[idx] = v
        st.n_in.view(-1)[idx] = n_in
        st.o.view(-1)[idx] = st.o.view(-1)[idx] + spikes * self.source_f[col]
        fired = spikes > 0
        is_out, acc_at = self.at_outputs(idx)
        at_out = fired & is_out
        if bool(at_out.any()):
            acc_at = acc_at[at_out]
            st.acc.view(-1)[acc_at] = st.acc.view(-1)[acc_at] + spikes[at_out]
        if self.cfg.refractory:
            now = idx[fired]
            if self.p_ref > 0:  # the draws of `_evaluate`, at the neurons that fired
                u = self.ops.uniform_at(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t, k, now // w, now % w)
                now = now[u >= self.p_ref]
            st.refr.view(-1)[now] = True
        return st, StepInfoAt(vals, idx, spikes, v_pre, n_before, n_in, gate, refr)

    def op_end(self, st: State) -> torch.Tensor:
        if self.cfg.readout == "potential":
            return st.v[:, self.net.output_slice].clone()
        return st.acc.clone()

    # --- selection (forward only; recorded) -----------------------------------------
    def select(self, pending: torch.Tensor, pre_spike: torch.Tensor, t: int, k: int,
               fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel, sel_deliv) int64 [B, K] of one step from the pending entries (bool [B, W],
        of the samples still running). `fill` = (candidates bool [B, W], membrane [B, W]):
        the unused slots take fillers (`_add_fillers`)."""
        cfg = self.cfg
        # Keys matter at pending entries only: random numbers are drawn there (the same
        # numbers as a draw over every column), not over the whole [B, N + 1] state.
        # The torch ops also select from that list (`backends.select_listed`); a
        # backend's select kernel takes the keys over the whole state (`select_dense`).
        rs = cfg.policy == "RS"
        at = pending.nonzero(as_tuple=True)
        if rs or self.noise > 0:
            u = rng.uniform_at(self.seed, rng.STREAM_RS_KEY if rs else rng.STREAM_MOMENTUM_NOISE, t, k, *at)
        if rs:
            keys = u
        else:  # MS: pre-spike potential (+ noise); input spikes rank above every neuron
            keys = pre_spike[at].to(torch.float32)
            if self.noise > 0:
                keys = keys + self.noise * u
            keys = keys.masked_fill(self.tables.is_input[at[1]], math.inf)
        order = None
        if self.random_inputs:  # SPEC 6: inputs above every neuron, in the pass's order
            is_in = at[1] < self.net.n_inputs
            order = torch.where(is_in, rng.input_order_key(self.seed, t, *at), -1)
        sel = self.ops.select_at(pending, at, keys, self.k, order)
        if fill is not None:
            sel = self._add_fillers(sel, *fill, t, k)
        sel_deliv = sel
        if self.p_net > 0:  # fillers too: a dropped outbox reaches nobody, zero or not
            drop = rng.uniform(self.seed, rng.STREAM_NETWORK_DROPOUT, t, k, self.decode(sel)[1]) < self.p_net
            sel_deliv = sel.masked_fill(drop, self.net.dump)
        return sel, sel_deliv

    def _add_fillers(self, sel: torch.Tensor, cand: torch.Tensor, v: torch.Tensor, t: int, k: int
                     ) -> torch.Tensor:
        """SPEC 8 fill_slots: the dump slots of `sel` take the best candidates (MS:
        highest V as float32, RS: `rng.STREAM_FILL` keys; ties to the lower index),
        recorded as -1 - column."""
        dump = self.net.dump
        free = sel == dump
        if not bool((free.any(1) & cand.any(1)).any()):
            return sel
        at = cand.nonzero(as_tuple=True)
        keys = rng.uniform_at(self.seed, rng.STREAM_FILL, t, k, *at) if self.cfg.policy == "RS" \
            else v[at].to(torch.float32)
        best = select_pending_torch(*at, keys, self.batch, self.width, self.k)  # best first
        rank = (free.cumsum(1) - 1).clamp(min=0)  # the j-th free slot takes the j-th best
        filler = best.gather(1, rank)
        return torch.where(free & (filler != dump), -1 - filler, sel)

    # --- the whole call --------------------------------------------------------------
    def run(self, frames: torch.Tensor, wt: torch.Tensor, *, keep_checkpoints: bool):
        """Execute all passes. Returns (out [T, B, n_out], stats, ops, checkpoints)."""
        cfg, net = self.cfg, self.net
        T, B = frames.shape[0], self.batch
        fused = self.fused
        if fused is not None and torch.is_grad_enabled() and (wt.requires_grad or frames.requires_grad):
            fused = None  # plain autograd through every step: the torch ops
        if fused is not None:
            fused.bind_weights(wt)
        ckpt = Checkpoints(self.checkpoint_every, self.record_ratio, nested=self.nested) \
            if keep_checkpoints else None
        # conv networks: wide steps; kept per-step tensors go to chunks (retain.py)
        keep = ChunkStore().keep if self.syn is not None else identity
        stats = new_stats(T, B, self.device, self.histogram_bins)
        st = self.initial_state()
        pending = torch.zeros(B, self.width, dtype=torch.bool, device=self.device)
        ops: list[tuple] = []
        outs = []
        for t in range(T):
            _offer(ckpt, ops, st)
            ops.append(("start", t))
            st = self.op_start(st)
            if not cfg.carry_pending:
                pending = torch.zeros_like(pending)
            ps = _Pass(B, self.width, self.dtype, self.device, pending, eager_first=cfg.stop == "output")
            ps.keep = keep
            if self.fill:
                ps.fillable = torch.zeros_like(pending)
            x = frames[t]
            _offer(ckpt, ops, st)
            ops.append(("input", t))
            st, info = self.op_input(st, x, wt, t)
            k = 0
            if info is None:
                ps.pending = ps.pending | torch.nn.functional.pad(x != 0, (0, self.width - net.n_inputs))
            else:
                k = 1
                nz = (x != 0).sum(1)
                ps.steps += 1
                ps.input_synops = nz * net.layer_sizes[1] if self.syn is None else \
                    ((x != 0) * self.tables.fan_out[:net.n_inputs]).sum(1)
                ps.input_processed = nz
                self._after_eval(st, info, ps)
            if fused is not None:
                st = self._fused_pass(fused, st, ps, ckpt, ops, t, k)
            while fused is None:
                done = ps.done(cfg)
                if bool(done.all()):
                    break
                active = ~done[:, None]
                fill = (ps.fillable & ~ps.pending & active, st.v) if self.fill else None
                sel, sel_deliv = self.select(ps.pending & active, ps.pre_spike, t, k, fill)
                _offer(ckpt, ops, st)
                ops.append(("step", t, k, keep(_compact(sel)),
                            None if sel_deliv is sel else keep(_compact(sel_deliv))))
                st, info = self.op_step(st, sel, sel_deliv, wt, t, k)
                sel_all = self.decode(sel)[1]
                ps.pending = ps.pending.scatter(1, sel_all, False)
                if self.fill:  # delivered (or dropped): emptied
                    ps.fillable = ps.fillable.scatter(1, sel_all, False)
                ps.delivered.append(keep(sel_deliv))
                ps.values.append(keep(info.vals))
                ps.steps += ~done
                self._after_eval(st, info, ps)
                k += 1
            ps.store(stats, t, cfg, self.tables.fan_out, self.hidden_f)
            pending = ps.pending
            _offer(ckpt, ops, st)
            ops.append(("end", t))
            outs.append(self.op_end(st))
        stats["final_v"] = st.v[:, net.neuron_slice].detach()
        return torch.stack(outs), stats, ops, (ckpt.saved if ckpt else None)

    def _fused_pass(self, fused, st: State, ps: "_Pass", ckpt: "Checkpoints | None", ops: list,
                    t: int, k: int) -> State:
        """The event steps of one pass through the backend's fused steps (same ops,
        records and bookkeeping as the loop in `run`); returns the state after them.
        The fused steps update their state in place: they get copies of their own."""
        st = st.clone()
        ps.pending = ps.pending.clone()
        if ps.fillable is not None:
            ps.fillable = ps.fillable.clone()
        done = ps.done(self.cfg).contiguous()
        if self.histogram_bins and not isinstance(ps.currents, torch.Tensor):
            ps.currents = torch.zeros(self.histogram_bins, dtype=torch.int64, device=self.device)
        fused.bind_state(st)
        fused.bind_pass(ps, done, ps.currents if self.histogram_bins else None)
        dropout = self.p_net > 0
        # Steps run in batches up to the next op index a checkpoint may be taken at
        # (or a bounded buffer: ~1 MB of selections), one C call per batch.
        cap = max(1, 2**18 // (self.batch * self.k))
        while not bool(done.all()):
            _offer(ckpt, ops, st)
            n_max = cap if ckpt is None else min(cap, ckpt.c - len(ops) % ckpt.c)
            sel, sel_deliv, vals, out_fired = fused.forward_steps(t, k, n_max)
            for i in range(sel.shape[0]):  # no checkpoint is due inside a batch
                ops.append(("step", t, k, sel[i], sel_deliv[i] if dropout else None))
                ps.delivered.append(sel_deliv[i])
                ps.values.append(vals[i])
                ps.out_fired.append(out_fired[i])
                k += 1
        return st

    def _after_eval(self, st: State, info: StepInfo | StepInfoAt, ps: "_Pass") -> None:
        """Non-differentiable bookkeeping after a neuron evaluation: pending flags,
        pre-spike potentials, spikes, first output step."""
        if isinstance(info, StepInfoAt):
            return self._after_eval_at(info, ps)
        fired = info.spikes > 0
        is_src = self.tables.is_source
        ps.pending = ps.pending | (fired & is_src)
        if self.fill:  # the outbox now holds surrogate gradient: synced and not clamped
            ps.fillable = ps.fillable | (info.gate & ~info.refr & self.tables.is_hidden)
        if self.cfg.barrier_messages:
            reached = (info.n_before < self.sync) & (st.n_in >= self.sync)
            ps.pending = ps.pending | (reached & ~fired & is_src)
        if self.cfg.policy == "MS":  # the momentum key; RS never reads it
            ps.pre_spike = torch.where(fired, info.v_pre, ps.pre_spike)
        ps.spike_sum = ps.spike_sum + info.spikes
        out_fired = fired[:, self.net.output_slice].any(1)
        if ps.eager_first:  # the output stop needs the first output step now
            ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(out_fired))
        if self.histogram_bins:
            # currents integrated before each spike (SPEC 9), hidden and output neurons
            counts = st.n_in[fired].clamp(max=self.histogram_bins - 1).long()
            ps.currents += torch.bincount(counts, minlength=self.histogram_bins)

    def _after_eval_at(self, info: StepInfoAt, ps: "_Pass") -> None:
        """`_after_eval` at the receivers of a step (in place on the pass's own
        tensors: the step's selection has just replaced `ps.pending`)."""
        w = self.width
        idx, col = info.idx, info.idx % self.width
        fired = info.spikes > 0
        is_src = self.tables.is_source[col]
        new = fired & is_src
        if self.cfg.barrier_messages:
            sync = self.sync[col]
            new = new | ((info.n_before < sync) & (info.n_in >= sync) & is_src)
        ps.pending.view(-1)[idx[new]] = True
        if self.fill:
            ps.fillable.view(-1)[idx[info.gate & ~info.refr & self.tables.is_hidden[col]]] = True
        if self.cfg.policy == "MS":
            ps.pre_spike.view(-1)[idx[fired]] = info.v_pre[fired]
        ps.spike_sum.view(-1)[idx] = ps.spike_sum.view(-1)[idx] + info.spikes
        out_fired = torch.zeros(self.batch, dtype=torch.bool, device=idx.device)
        out_fired[idx[fired & self.at_outputs(idx)[0]] // w] = True
        if ps.eager_first:
            ps.first_out = torch.where((ps.first_out < 0) & out_fired, ps.steps, ps.first_out)
        ps.out_fired.append(ps.keep(out_fired))
        if self.histogram_bins:
            counts = info.n_in[fired].clamp(max=self.histogram_bins - 1).long()
            ps.currents += torch.bincount(counts, minlength=self.histogram_bins)


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


class Checkpoints:
    """States kept before every C-th op. ``every=None``: adaptive -- C doubles (and
    every other checkpoint is dropped) whenever more than C are kept, so at the end
    C ~ sqrt(ops) and about sqrt(ops) checkpoints remain.

    `ratio` r < 1 (a step's backward record is r times the size of a state, as for
    conv networks at small K): C doubles whenever more than r C are kept, so
    C ~ sqrt(ops / r), about sqrt(ops r) states are kept and the memory of the
    backward, ~2 sqrt(ops r) states, stays flat as K shrinks (ops ~ 1/K, r ~ K).

    `nested` (the backward splits each segment again, `Engine.sub_segment`): C doubles
    whenever more than sqrt(C r) are kept, so C ~ ops^(2/3) r^(-1/3): the kept states
    then weigh half of what one split segment holds at once, the minimum of their sum:
    ~3 (ops r)^(1/3) states in all."""

    def __init__(self, every: int | None, ratio: float = 1.0, nested: bool = False):
        self.adaptive = every is None
        self.c = 1 if every is None else every
        self.ratio = ratio
        self.nested = nested
        self.saved: dict[int, PackedState] = {}

    def offer(self, i: int, st: State) -> None:
        if i % self.c:
            return
        self.saved[i] = st.pack()
        cap = math.sqrt(self.c * self.ratio) if self.nested else self.c * self.ratio
        if self.adaptive and len(self.saved) > cap:
            self.c *= 2
            self.saved = {j: s for j, s in self.saved.items() if j % self.c == 0}


def _offer(ckpt: Checkpoints | None, ops: list, st: State) -> None:
    if ckpt is not None:
        ckpt.offer(len(ops), st)
