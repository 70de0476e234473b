"""The event-driven engine (torch backend): SPEC sections 3-6 for one batch.

A call runs T passes (timesteps). The timeline of a call is a flat list of ops::

    ("start", t)  ("input", t)  ("step", t, k, sel, sel_delivered) ...  ("end", t)

Only "step" ops need a record: the [B, K] indices they selected (int32; fillers of
`fill_slots` as -1 - column, `Engine.decode`, so a record stays [B, K]). The
differentiable state is (V, O, acc) -- membrane, outbox values, output accumulator
of the pass -- plus two non-differentiable tensors the replay needs (refractory
flag, received-current count). The pending flag and the pre-spike potential only
drive selection, which is recorded, so the backward never needs them.

Modules: `state` (State, its packed copy, the step records), `passes` (the loop of a
call, the per-pass bookkeeping and stats), `segments` (the states kept for the
backward), this one (the constants of a call and its ops).

`Engine.run` (`passes.run`) executes the ops and the selection; with grad enabled it is plain
autograd through every step (``checkpoint_every=0``). `backward.EventFunction` runs
it without grad, keeps a state checkpoint every C ops (adaptive C ~ sqrt(ops) by
default) and, in the backward, recomputes one segment at a time from its checkpoint
and sweeps it in reverse by hand. Randomness that changes values in the recompute
(refractory dropout) comes from the counter hash of `rng`, so it replays exactly.

Per step the work is K x F_max (gather, scatter) plus O(N) elementwise and one
topk over [B, N + 1]; nothing is N x N.

Host syncs (`SYNC_FREE_DEVICES`, CUDA): a value read on the host waits for the
queued kernels, so there the step loops read nothing but their stop test
(`kernels/host.py`; the per-op loop every `STOP_EVERY` steps, the fused steps once
per launch). What the CPU path lists (pending entries, receivers, a step's layers,
nonzero outboxes of a checkpoint) is computed over the whole state instead: the
selection keys of every column (`Ops.select_keyed`: the triton select kernel computes
them itself from the pending flags, potentials and hashes, no [B, W] key tensors;
the torch twin over every column), the K entries sorted by layer on the device and
each conv layer's kernel launched over its own segment of them
(`conv.ImageSynapses.segments`), checkpoints dense; fully connected steps are
evaluated densely, conv steps without autograd at a fixed-size list of their
receivers when it is short (`LISTED_BELOW`, `_op_step_listed`: the delivery buffers
kept and zeroed at the receivers only, compact records), else densely with dense
records. The same numbers and operations on the entries that count, so
the same spikes, stats and gradients (tests/test_no_sync.py); on a CPU, where a
read costs nothing, the listed path runs as before.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from . import passes, rng
from .config import SimConfig, per_neuron
from .network import Network
from .backends import TORCH, Ops
from .ops import deliver, lif
from .kernels.lif import lif_torch
from .kernels.select import select_pending_torch
from .kernels.step_spec import StepSpec
# the state types, the pass and the checkpoints live in their own modules; imported
# from here too (the engine's public names)
from .passes import _Pass, new_stats  # noqa: F401
from .segments import Checkpoints  # noqa: F401
from .state import PackedState, State, StepInfo, StepInfoAt, StepInfoListed  # noqa: F401


# Devices where the step loop reads nothing on the host but its stop test
# (kernels/host.py): checkpoints packed dense, dropout drawn at every column (the same
# numbers). A CPU reads for free (tests set this to ("cpu",) to check the loop).
SYNC_FREE_DEVICES = ("cuda",)
# The per-op step loop tests its stop condition before every N-th step, N by device
# type (default 1): on CUDA N = 8, each test being a host sync; up to N - 1 no-op steps
# (every sample done: all dump slots) run after the last sample is done and are
# recorded, changing no spike, stat or gradient. Elsewhere before every step, so the
# ops and step counts are those of N = 1.
STOP_EVERY = {"cuda": 8}

# Conv steps without autograd run at their receivers when at most this fraction of
# the [B, W] columns received, else over the whole state (`Engine._evaluate_at`).
SPARSE_BELOW = 0.5
# Sync-free conv steps without autograd run at a fixed-size list of their receivers
# (K x `ImageSynapses.list_width` per sample, repeats included: `_op_step_listed`)
# when that list is at most this fraction of the state's width, else over the whole
# state. Fixed by K and the network, never by the data (VGG-7: K <= 24). An indexed
# op costs several elementwise ones per element: on the CPU (benchmarks/
# sync_free_cost.py) a list 0.08 of the width (VGG-7, K = 8) made the iteration 1.36x
# faster than the whole-state steps, one 0.30 of it (width 0.25) 1.24x slower. The
# GPU's crossover is unmeasured.
LISTED_BELOW = 0.25


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
        dev_type = torch.device(device).type
        self.sync_free = dev_type in SYNC_FREE_DEVICES
        self.stop_every = STOP_EVERY.get(dev_type, 1)
        self._grid = None
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
        # Sync-free (CUDA): records stay dense (no receiver list), as big as a state.
        self.record_ratio = 1.0 if self.syn is None or self.sync_free else \
            min(1.0, 10 * min(cfg.forward_group_size, w) * self.syn.mean_fan_out / (8 * w))
        # Conv networks, adaptive checkpoints: the backward splits each segment again
        # (`sub_segment`), so the memory of the backward grows as ops^(1/3), not sqrt(ops),
        # for one more recompute of the forward (fully connected networks: two levels).
        self.nested = self.syn is not None and checkpoint_every is None
        self.k = min(cfg.forward_group_size, w)
        # Sync-free conv steps without autograd: evaluated at the list of their receivers,
        # the delivery buffers kept and zeroed there again (`_op_step_listed`).
        self.listed = self.sync_free and self.syn is not None and \
            self.k * self.syn.list_width <= LISTED_BELOW * w
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.listed:  # records at the list (`backward.CompactInfo`: ~11 B per entry)
            self.record_ratio = min(1.0, 11 * self.k * self.syn.list_width / (13 * w))
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
        if self.listed and not self._autograd(st, wt):
            return self._op_step_listed(st, sel, sel_deliv, wt, t, k)
        if self.fill:
            return self._op_step_filled(st, sel, sel_deliv, wt, t, k)
        vals = st.o.gather(1, sel_deliv)
        if self.syn is not None:  # the conv/rows kernels of self.ops (ImageSynapses picks Triton or the twins)
            current, n_add = self.syn.deliver(vals, sel_deliv, wt, self.tables.source_slot, self.ops,
                                              self.sync_free)
            if not self._autograd(st, wt) and not self.sync_free:  # (sync-free: dense, no receiver list)
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
                                              self.tables.source_slot, self.ops, self.sync_free)
            c_fill, n_fill = self.syn.deliver(vals.masked_fill(~filler, 0.0), d_all.masked_fill(~filler, dump),
                                              wt, self.tables.source_slot, self.ops, self.sync_free)
            current, n_recv = current + c_fill, n_add + n_fill
            if not self._autograd(st, wt) and not self.sync_free:
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
            if self.p_ref > 0 and self.sync_free:  # every column's draw: no nonzero
                u = self.ops.uniform_at(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t, k, *self.grid())
                fired = fired & (u >= self.p_ref)
            elif self.p_ref > 0:
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

    def _delivery_buffers(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's i-th pair of zero [B, W] delivery buffers (`_op_step_listed`)."""
        if i not in self._buffers:
            self._buffers[i] = self.syn.buffers(self.batch, self.dtype, self.device)
        return self._buffers[i]

    def _op_step_listed(self, st: State, sel: torch.Tensor, sel_deliv: torch.Tensor, wt: torch.Tensor,
                        t: int, k: int) -> tuple[State, StepInfoListed]:
        """`op_step` of a conv network in the sync-free mode without autograd, in place
        and with shapes fixed by K: the step's deliveries add into kept buffers, the
        neurons are evaluated at `ImageSynapses.receiver_list` (every target of every
        delivered entry, repeats included), and the buffers are zeroed there again,
        not over [B, W]. Every repeat of a column gathers the same values before
        anything is written, so it computes and writes the same result: the writes
        are idempotent, and entries that reach nobody list their
        sample's dump column (never a receiver) and write back what they read. The same
        operations on the same values as `_evaluate_at`, so the same numbers."""
        w = self.width
        sel_all = self.decode(sel)[1]
        d_real, d_all = self.decode(sel_deliv)
        vals = st.o.gather(1, d_all)
        src = self.tables.source_slot
        cur, cnt = self._delivery_buffers(0)
        bufs = [(cur, cnt)]
        if self.fill:  # the fillers' deliveries into a second pair (`_op_step_filled`)
            filler = sel_deliv < 0
            self.syn.deliver(vals.masked_fill(filler, 0.0), d_real, wt, src, self.ops, True, out=(cur, cnt))
            bufs.append(self._delivery_buffers(1))
            self.syn.deliver(vals.masked_fill(~filler, 0.0), d_all.masked_fill(~filler, self.net.dump), wt,
                             src, self.ops, True, out=bufs[1])
        else:
            self.syn.deliver(vals, sel_deliv, wt, src, self.ops, True, out=(cur, cnt))
        idx, valid = self.syn.receiver_list(d_all, src)
        current, n_add = cur.view(-1)[idx], cnt.view(-1)[idx]
        if self.fill:
            current = current + bufs[1][0].view(-1)[idx]
        for c_buf, n_buf in bufs:  # zero again where the step wrote
            c_buf.view(-1)[idx] = 0.0
            n_buf.view(-1)[idx] = 0
        st.o.scatter_(1, sel_all, 0.0)
        col = idx % w
        v0, o0, n_before, refr = (x.view(-1)[idx] for x in (st.v, st.o, st.n_in, st.refr))
        n_in = torch.where(valid, n_before + n_add, n_before)
        gate = valid & (n_in >= self.sync[col])
        v, spikes, v_pre = lif_torch(v0, current, refr, valid, gate, self.theta[col])
        fired = spikes > 0
        is_out, acc_at = self.at_outputs(idx)
        n_acc = st.acc.numel()
        acc = torch.cat([st.acc.reshape(-1), st.acc.new_zeros(1)])  # the last: a scratch slot
        acc_at = torch.where(fired & is_out, acc_at, n_acc)
        acc_new = acc[acc_at] + spikes
        st.v.view(-1)[idx] = v
        st.n_in.view(-1)[idx] = n_in
        st.o.view(-1)[idx] = o0 + spikes * self.source_f[col]
        acc[acc_at] = acc_new
        st.acc.copy_(acc[:n_acc].view_as(st.acc))
        if self.cfg.refractory:
            now = fired
            if self.p_ref > 0:  # the draws of `_evaluate`, at the listed columns
                u = self.ops.uniform_at(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t, k, idx // w, col)
                now = now & (u >= self.p_ref)
            st.refr.view(-1)[idx] = refr | now
        return st, StepInfoListed(vals, idx, spikes, v_pre, n_before, n_in, gate, refr, valid)

    def op_end(self, st: State) -> torch.Tensor:
        if self.cfg.readout == "potential":
            return st.v[:, self.net.output_slice].clone()
        return st.acc.clone()

    # --- selection (forward only; recorded) -----------------------------------------
    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64 [B, 1], columns int64 [1, W]): every (sample, column) pair, in
        place of a ``nonzero(as_tuple=True)`` list (sync-free selection)."""
        if self._grid is None:
            self._grid = (torch.arange(self.batch, device=self.device)[:, None],
                          torch.arange(self.width, device=self.device)[None, :])
        return self._grid

    def select(self, pending: torch.Tensor, pre_spike: torch.Tensor, t: int, k: int,
               fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel, sel_deliv) int64 [B, K] of one step from the pending entries (bool [B, W],
        of the samples still running). `fill` = (candidates bool [B, W], membrane [B, W]):
        the unused slots take fillers (`_add_fillers`)."""
        cfg = self.cfg
        if self.sync_free:
            # Sync-free (CUDA): no list, no data-dependent shape; the backend computes the
            # keys of every column (the same numbers at the pending ones) and selects
            # (`Ops.select_keyed`: the triton kernel computes them itself).
            sel = self.ops.select_keyed(pending, pre_spike, self.tables.is_input, self.k, self.seed, t, k,
                                        policy_ms=cfg.policy == "MS", noise=self.noise,
                                        input_random=self.random_inputs)
        else:
            # Keys matter at pending entries only: random numbers are drawn there (the
            # same numbers as a draw over every column), not over the whole [B, N + 1]
            # state. The torch ops also select from that list (`backends.select_listed`); a
            # backend's select kernel takes the keys over the whole state (`select_listed_kernel`).
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
        if self.sync_free:  # computed anyway (nothing changes then): no host read
            return self.ops.select_keyed(cand, v, self.tables.is_input, self.k, self.seed, t, k,
                                         policy_ms=self.cfg.policy == "MS", sel=sel)
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
        """Execute all passes (`passes.run`). Returns (out [T, B, n_out], stats, ops,
        checkpoints)."""
        return passes.run(self, frames, wt, keep_checkpoints=keep_checkpoints)
