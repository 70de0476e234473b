"""The event-driven engine of one call: SPEC sections 3-6 for one batch.

`Engine` holds what is constant in a call (device, dtype, per-neuron knobs, index
tables, its `plan.Plan`) and the ops that are not neuron evaluations, with their
reverses: a pass's start, its input (queued, or the currents of a prioritized frame),
a step's selection (`select`, SPEC 5.1, 6, 8) and delivery (`deliver`), the emptied
outboxes, the readout. The neuron evaluations are the step modes' (`steps.py`,
`receivers.py`, `fused.py`); `loop.CallLoop` runs the call.

The differentiable state is (V, O, acc) -- membrane, outbox values, output
accumulator of the pass -- plus two non-differentiable tensors the replay needs
(refractory flag, received-current count): `state.State`. The pending flag and the
pre-spike potential only drive selection, which is recorded, so the backward never
needs them (`passes.Pass` holds them). Randomness that changes values in the
recompute (refractory dropout) comes from the counter hash of `rng`, so it replays
exactly.

Per step the work is K x F_max (gather, scatter) plus O(N) elementwise and a
selection that looks at the pending entries (`kernels/select.py`); nothing is N x N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import rng
from .backends import TORCH, Ops
from .config import SimConfig, per_neuron
from .kernels.select import fill_free_slots, select_pending_torch, selection_keys
from .kernels.step_spec import StepSpec
from .network import Network
from .ops import deliver
from .plan import Forced, Plan
from .state import Adjoints, State


@dataclass
class Delivery:
    """What one step's deliveries leave for its evaluation (`Engine.deliver`)."""

    vals: torch.Tensor      # [B, K] outbox values of the delivered columns (fillers' too)
    current: torch.Tensor   # [B, W]
    n_add: torch.Tensor     # int32 [B, W] counted currents (fillers add none)
    received: torch.Tensor  # bool [B, W] reached by a delivery (a filler's too)


class Engine:
    """Constants of one call (device, dtype, per-neuron knobs, tables, plan) and the ops
    that are not neuron evaluations. `forced`: choices overriding the plan's (default:
    the block's, `plan.forced`)."""

    def __init__(self, net: Network, cfg: SimConfig, *, batch: int, device: torch.device,
                 dtype: torch.dtype, training: bool, seed: int,
                 checkpoint_every: int | None = None, histogram: bool = False, ops: Ops = TORCH,
                 forced: Forced | None = None):
        self.net, self.cfg, self.training, self.seed = net, cfg, training, seed
        self.ops = ops
        # bins 0 .. max fan-in of the currents-to-spike histogram (0 = not recorded)
        self.histogram_bins = (max(net.layer_sizes[:-1]) + 1) if histogram else 0
        self.batch, self.device, self.dtype = batch, device, dtype
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
            self.syn.prepare(device)
            fan_in1 = torch.zeros(w, dtype=torch.int32)
            fan_in1[layer1] = self.syn.fan_in[:net.layer_sizes[1]].to(torch.int32)
            self.input_n_add = fan_in1.to(device).expand(batch, w)
        self.K = min(cfg.forward_group_size, w)
        self.alpha = float(cfg.surrogate_steepness)
        # SimConfig.surrogate_at="fire_or_last": the surrogate derivative only at the
        # evaluations that fire or end their outbox window (docs/semantics.md 8)
        self.window = cfg.surrogate_at == "fire_or_last"
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
        self.plan = Plan.choose(net, self.step_spec(), fused_steps=ops.fused, histogram=histogram,
                                checkpoint_every=checkpoint_every, force=forced)

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
            batch=self.batch, width=self.width, k=self.K, fan_out=tab.targets.shape[1], dtype=self.dtype,
            device=self.device, source_slot=tab.source_slot, slot_lo=lo, slot_hi=hi,
            is_source=tab.is_source, is_input=tab.is_input, sync=self.sync, theta=self.theta,
            out_lo=out.start, out_hi=out.stop, policy_ms=cfg.policy == "MS", input_random=self.random_inputs,
            fill=self.fill, refractory=bool(cfg.refractory), barrier=bool(cfg.barrier_messages),
            stop_output=cfg.stop == "output", detach_reset=bool(cfg.detach_reset), noise=float(self.noise),
            p_ref=float(self.p_ref), p_net=float(self.p_net), alpha=self.alpha, max_steps=int(cfg.max_steps),
            steps_after_output=int(cfg.steps_after_output), seed=int(self.seed))

    # --- a pass: start, input, end (and their reverses) ------------------------------
    def initial_state(self) -> State:
        b, w = self.batch, self.width
        z = torch.zeros(b, w, dtype=self.dtype, device=self.device)
        return State(z, z, z.new_zeros(b, self.net.n_outputs),
                     torch.zeros(b, w, dtype=torch.bool, device=self.device),
                     torch.zeros(b, w, dtype=torch.int32, device=self.device))

    def op_start(self, st: State) -> State:
        o = st.o if self.cfg.carry_pending else torch.zeros_like(st.o)
        return replace(st, v=st.v * self.decay, o=o, acc=torch.zeros_like(st.acc),
                       refr=torch.zeros_like(st.refr), n_in=torch.zeros_like(st.n_in))

    def start_backward(self, adj: Adjoints) -> None:
        adj.v = adj.v * self.decay
        if not self.cfg.carry_pending:
            adj.o = torch.zeros_like(adj.o)
        adj.acc = torch.zeros_like(adj.acc)

    def queue_input(self, st: State, x: torch.Tensor) -> State:
        """Queued input: the frame's entries join the outboxes (O += x)."""
        return replace(st, o=st.o + F.pad(x, (0, self.width - self.net.n_inputs)))

    def queue_input_backward(self, adj: Adjoints, grad_x: torch.Tensor | None) -> None:
        """The reverse of `queue_input`: adds the outboxes' adjoint into `grad_x`
        [B, n_inputs] (given)."""
        if grad_x is not None:
            grad_x += adj.o[:, :self.net.n_inputs]

    def input_current(self, x: torch.Tensor, wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prioritized input: (current [B, W], counted currents int32 [B, W]) of the whole
        frame delivered as one forward step (step 0)."""
        net = self.net
        if self.syn is not None:
            return self.syn.input_current(x, wt), self.input_n_add
        lo, n1 = net.offsets[1], net.layer_sizes[1]
        current = F.pad(x @ wt[:net.n_inputs, :n1], (lo, self.width - lo - n1))
        return current, self.layer1.to(torch.int32) * net.n_inputs

    def input_backward(self, x: torch.Tensor, g_current: torch.Tensor, wt: torch.Tensor,
                       grad_wt: torch.Tensor, grad_x: torch.Tensor | None) -> None:
        """The reverse of `input_current`: adds into `grad_wt` and (given) `grad_x`
        [B, n_inputs] in place."""
        net = self.net
        if self.syn is not None:
            g_w, g_x = self.syn.input_backward(x, g_current, wt, grad_x is not None)
            grad_wt += g_w
            if grad_x is not None:
                grad_x += g_x
            return
        lo, n1 = net.offsets[1], net.layer_sizes[1]
        g_layer1 = g_current[:, lo:lo + n1]
        grad_wt[:net.n_inputs, :n1] += x.t() @ g_layer1
        if grad_x is not None:
            grad_x += g_layer1 @ wt[:net.n_inputs, :n1].t()

    def op_end(self, st: State) -> tuple[State, torch.Tensor]:
        """The pass's end: (the state after it, the readout [B, n_out])."""
        if st.carrier is not None:  # every outbox window ends with the pass
            st = self._end_windows(st, None)
        if self.cfg.readout == "potential":
            return st, st.v[:, self.net.output_slice].clone()
        return st, st.acc.clone()

    def end_backward(self, adj: Adjoints, grad_out: torch.Tensor) -> None:
        """The reverse of `op_end` with the readout's gradient `grad_out` [B, n_out]."""
        if adj.armed is not None:  # every window ends with the pass
            adj.armed.fill_(True)
        if self.cfg.readout == "potential":
            adj.v = adj.v.clone()
            adj.v[:, self.net.output_slice] += grad_out
        else:
            adj.acc = adj.acc + grad_out

    # --- a step: selection, delivery, emptied outboxes -------------------------------
    def decode(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A recorded [B, K] selection -> (the entries that count: fillers as the dump;
        every delivered column: fillers as their column). Fillers (SPEC 8
        `fill_slots`) are recorded as -1 - column, so a record stays one int32 [B, K]."""
        if not self.fill:
            return sel, sel
        filler = sel < 0
        return sel.masked_fill(filler, self.net.dump), torch.where(filler, -1 - sel, sel)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows int64 [B, 1], columns int64 [1, W]): every (sample, column) pair, in
        place of a ``nonzero(as_tuple=True)`` list (sync-free)."""
        if self._grid is None:
            self._grid = (torch.arange(self.batch, device=self.device)[:, None],
                          torch.arange(self.width, device=self.device)[None, :])
        return self._grid

    def at_outputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For flat [B * W] positions: (bool, the position is an output neuron's;
        its flat [B * n_out] index into the output accumulator, meaningful there)."""
        out, w = self.net.output_slice, self.width
        col = idx % w
        return (col >= out.start) & (col < out.stop), (idx // w) * (out.stop - out.start) + col - out.start

    def select(self, pending: torch.Tensor, pre_spike: torch.Tensor, t: int, step: int,
               fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sel, sel_deliv) int64 [B, K] of one step from the pending entries (bool [B, W],
        of the samples still running). `fill` = (candidates bool [B, W], membrane [B, W]):
        the unused slots take fillers (SPEC 8, recorded as -1 - column). The keys are
        `kernels/select.py`'s (`selection_keys`)."""
        ms = self.cfg.policy == "MS"
        if self.plan.sync_free:
            # No list, no data-dependent shape: the backend computes the keys of every
            # column (the same numbers at the pending ones) and selects; it fills the
            # free slots the same way (computed anyway, nothing changes then).
            sel = self.ops.select_keyed(pending, pre_spike, self.tables.is_input, self.K, self.seed, t, step,
                                        policy_ms=ms, noise=self.noise, input_random=self.random_inputs)
            if fill is not None:
                sel = self.ops.select_keyed(fill[0], fill[1], self.tables.is_input, self.K, self.seed, t, step,
                                            policy_ms=ms, sel=sel)
        else:
            # Keys at the pending entries only: random numbers drawn there (the same
            # numbers as over every column), not over the whole [B, W] state.
            at = pending.nonzero(as_tuple=True)
            keys, order = selection_keys(*at, pre_spike[at] if ms else None, self.tables.is_input, self.seed, t,
                                         step, policy_ms=ms, noise=self.noise, input_random=self.random_inputs)
            sel = self.ops.select_at(pending, at, keys, self.K, order)
            if fill is not None:
                sel = self._fill_listed(sel, *fill, t, step)
        sel_deliv = sel
        if self.p_net > 0:  # fillers too: a dropped outbox reaches nobody, zero or not
            drop = rng.uniform(self.seed, rng.STREAM_NETWORK_DROPOUT, t, step, self.decode(sel)[1]) < self.p_net
            sel_deliv = sel.masked_fill(drop, self.net.dump)
        return sel, sel_deliv

    def _fill_listed(self, sel: torch.Tensor, cand: torch.Tensor, v: torch.Tensor, t: int, step: int
                     ) -> torch.Tensor:
        """The free slots of `sel` filled from the listed candidates (MS: highest V as
        float32, RS: `rng.STREAM_FILL` keys; ties to the lower index)."""
        if not bool(((sel == self.net.dump).any(1) & cand.any(1)).any()):
            return sel
        at = cand.nonzero(as_tuple=True)
        ms = self.cfg.policy == "MS"
        keys, _ = selection_keys(*at, v[at] if ms else None, self.tables.is_input, self.seed, t, step,
                                 policy_ms=ms, fill=True)
        best = select_pending_torch(*at, keys, self.batch, self.width, self.K)  # best first
        return fill_free_slots(sel, best, self.net.dump)

    def deliver(self, st: State, sel_deliv: torch.Tensor, wt: torch.Tensor) -> Delivery:
        """One step's deliveries of the outboxes at `sel_deliv` (as recorded). Fillers
        (SPEC 8) are delivered like outboxes (their zero values reach their targets,
        which are evaluated) but add nothing to the counts, so they change no n_in,
        spike, potential or synop; only the gradient sees them. Differentiable in the
        outboxes and `wt` (`ops.deliver`, `conv.ImageSynapses.deliver`)."""
        src, sync_free = self.tables.source_slot, self.plan.sync_free
        o = st.o if st.carrier is None else st.o + st.carrier  # (the window carrier joins what is delivered)
        if not self.fill:
            vals = o.gather(1, sel_deliv)
            if self.syn is not None:
                current, n_add = self.syn.deliver(vals, sel_deliv, wt, src, self.ops, sync_free)
            else:
                current = deliver(vals, sel_deliv, wt, self.tables.targets, self.ops)
                n_add = self.tables.received_counts(sel_deliv)
            return Delivery(vals, current, n_add, n_add > 0)
        d_real, d_all = self.decode(sel_deliv)
        vals = o.gather(1, d_all)
        if self.syn is not None:
            # two deliveries: the counts of the real entries (n_in), the fillers' targets
            filler = sel_deliv < 0
            current, n_add = self.syn.deliver(vals.masked_fill(filler, 0.0), d_real, wt, src, self.ops, sync_free)
            c_fill, n_fill = self.syn.deliver(vals.masked_fill(~filler, 0.0),
                                              d_all.masked_fill(~filler, self.net.dump), wt, src, self.ops,
                                              sync_free)
            return Delivery(vals, current + c_fill, n_add, (n_add + n_fill) > 0)
        current = deliver(vals, d_all, wt, self.tables.targets, self.ops)
        return Delivery(vals, current, self.tables.received_counts(d_real), self.tables.received_counts(d_all) > 0)

    def deliver_backward(self, g_current: torch.Tensor, vals: torch.Tensor, sel_deliv: torch.Tensor,
                         wt: torch.Tensor, grad_wt: torch.Tensor) -> torch.Tensor:
        """The reverse of `deliver` for the decoded delivered columns `sel_deliv`: the
        gradient of the [B, K] values; adds the weight-table gradient into `grad_wt`."""
        if self.syn is not None:  # adds its weight gradient into grad_wt itself
            g_vals, _ = self.syn.deliver_backward(g_current, vals, sel_deliv, wt, self.tables.source_slot, grad_wt,
                                                  self.ops, self.plan.sync_free)
            return g_vals
        g_vals, g_table = self.ops.deliver_backward(g_current, vals, sel_deliv, wt, self.tables.targets)
        grad_wt += g_table
        return g_vals

    def empty_outboxes(self, st: State, sel: torch.Tensor) -> State:
        """The selected outboxes (decoded, every delivered column) emptied: functional."""
        if st.carrier is not None:  # their windows end (`deliver` has read the carrier)
            st = self._end_windows(st, sel)
        return replace(st, o=st.o.scatter(1, sel, 0.0))

    def _end_windows(self, st: State, cols: torch.Tensor | None) -> State:
        """Plain autograd with `surrogate_at="fire_or_last"`: the outbox windows of the
        columns `cols` ([B, n] indices: a step's emptied outboxes, whose deliveries
        have read the carrier; None: every column, the pass's end, where the carrier
        joins the outboxes and the output accumulator) end. The parked surrogate of each
        one's last evaluation (`ops.WindowCarrier`, value 0) also resets V
        (V <- V * (1 - s) of that evaluation, unless detach_reset). No value changes."""
        c, o, acc = st.carrier, st.o, st.acc
        if cols is None:
            ends = torch.ones_like(st.refr)
            o, acc = o + c * self.source_f, acc + c[:, self.net.output_slice]
        else:
            ends = torch.zeros_like(st.refr).scatter(1, cols, True)
        v = st.v if self.cfg.detach_reset else torch.where(ends, st.v * (1 - c), st.v)
        return replace(st, v=v, o=o, acc=acc, carrier=torch.where(ends, 0.0, c))

    def outboxes_backward(self, adj: Adjoints, sel: torch.Tensor, sel_deliv: torch.Tensor,
                          g_vals: torch.Tensor) -> None:
        """The reverse of a step's emptied and delivered outboxes (decoded): the taken
        slots' adjoints zeroed, the delivered values' gradients added, in place. A
        pending outbox that was not selected keeps its adjoint until the step that
        filled it. The emptied outboxes' windows end here (`Adjoints.armed`)."""
        adj.o.scatter_(1, sel, 0.0).scatter_add_(1, sel_deliv, g_vals)
        if adj.armed is not None:
            adj.armed.scatter_(1, sel, True)
