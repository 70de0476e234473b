"""Naive dense oracle of SPEC sections 4-5 (and the layered baseline of section 6).

This is the reference the real engine (sparse, checkpointed) is tested against: spikes
and stats must match it exactly, potentials and weight gradients to float tolerance
(SPEC 8: "plain autograd through a dense unrolled implementation of sections 4-5").
It is slow on purpose and should stay obviously right:

- the whole network is one block matrix ``Wbig [N, N]`` (flat layout
  ``[inputs | layer 1 | ... | output]``, ``Wbig[j, i]`` = weight from source j to target i);
- every forward step delivers the masked outbox vector with a dense matmul;
- selection is a per-sample stable sort of ``-key`` over the pending entries (ties ->
  lower flat index);
- plain torch autograd through every step, no checkpointing.

Conventions where SPEC is silent (the project's choices, followed exactly):
- Pass start (SPEC 3): ``V *= exp(-dt/tau)`` (factor computed in float64, cast), clear
  R, S, n_in; clear O and P unless ``carry_pending``.
- Random draws: ``rng.uniform(seed, STREAM_*, t, k, idx)`` with ``idx`` the flat index
  (feature index for input dropout), ``k`` the 0-based step of the pass (the prioritized
  input step is k=0). Training-only knobs act only when ``training=True``.
- Prioritized input step (SPEC 4.1): ``I = x @ W0^T``; every layer-1 neuron receives and
  gets ``n_in += n_inputs``; synops += nnz(x) * n_1; spikes_processed += nnz(x); no
  network dropout. Otherwise inputs enter the queue: ``O += x``, ``P |= x != 0``.
- MS key (SPEC 6): S (+ momentum_noise * U for neurons); pending inputs rank above
  every neuron: ``input_order="index"`` lower index first; ``"random"`` by decreasing
  ``rng.input_order_key(seed, t, b, i)`` (no step k: one permutation per pass), ties
  to the lower index. RS key: U. The min(K, #pending) highest keys are selected.
- Network dropout applies to every selected entry (inputs included when queued):
  dropped entries are emptied and reach nobody.
- Evaluation (SPEC 5.4), receivers only: ``V1 = (V + I) * (1 - R)``;
  ``s = spike(V1 - theta) * [n_in >= sync]``; hidden: ``O += s``, ``P |= s > 0``; output:
  count += s. Fired: ``S = V1`` (detached), ``R = 1`` (refractory, unless refractory
  dropout). ``V = V1 * (1 - s)`` for every receiver (s detached there if
  ``detach_reset``): for non-firing receivers this equals V1 in value and keeps the
  surrogate term in the gradient, as the layered baseline does for every neuron.
  Barrier messages: a hidden neuron whose n_in crossed sync_threshold this step and did
  not fire becomes pending (outbox unchanged).
- fill_slots (SPEC 8, training): after the selection, the K - #selected unused slots
  take the best candidates: hidden, not pending, and holding surrogate gradient (an
  evaluation since their last delivery in this pass that was synced and not
  refractory; `E`), MS: highest V (as float32), RS: ``uniform(seed, STREAM_FILL, t, k,
  idx)``, ties to the lower index. They are delivered (network dropout included) and
  emptied like outboxes; their targets are evaluated but their n_in does not grow.
- Stop (SPEC 4.2), checked before each step per sample: nothing pending; or
  stop=="output" and steps >= q + steps_after_output (q = 1-based step of the first
  output spike of the pass); or steps >= max_steps (capped if still pending and the
  output stop had not triggered).
- Convolutional networks (SPEC 1): pass each map's dense equivalent as its weight
  ``[n_{l+1}, n_l]`` (conv + folded pooling applied to the identity basis, so
  differentiable in the conv weight; tests/conv_oracle.py builds it) and the
  structural connectivity as ``adjacency`` (list of 0/1 ``[n_l, n_{l+1}]``). Receive
  counts, synops (fan-out per source) and the prioritized input's counts (fan-in per
  layer-1 neuron) then come from it; without it every layer is fully connected.
- surrogate_at="fire_or_last" (docs/semantics.md 8, "Bounded gradients"): the spike
  keeps its surrogate derivative only where the neuron fired; the latest non-firing
  evaluation's spike (value 0) is parked per neuron in ``L`` and joins its window's
  end: the delivered (or emptied) outbox reads ``O + L`` and ``V *= 1 - L`` (its reset,
  unless ``detach_reset``); at the pass's end hidden ``O += L``, outputs ``acc += L``
  and ``V *= 1 - L``. Forward values never change.
- Layered: per pass, per layer l: ``V1 = V_l + s_{l-1} @ W^T``, ``s = spike(V1 - theta)``,
  ``V_l = V1 * (1 - s)``; no refractoriness or sync threshold; network dropout zeroes
  hidden layer l-1's spike vector at step k = l-1 (flat index); synops and
  spikes_processed count the nonzero entries actually delivered.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from asynctrain.rng import (STREAM_FILL, STREAM_INPUT_DROPOUT, STREAM_MOMENTUM_NOISE,
                            STREAM_NETWORK_DROPOUT, STREAM_REFRACTORY_DROPOUT, STREAM_RS_KEY,
                            input_order_key, uniform)


class SpikeFn(torch.autograd.Function):
    """Heaviside forward (fires at x >= 0); arctan surrogate backward (SPEC 8)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * x) ** 2), None


def spike(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return SpikeFn.apply(x, alpha)


def _knob(value, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Scalar-or-[n_neurons] knob -> tensor [n_neurons]."""
    if isinstance(value, torch.Tensor):
        assert value.shape == (n,), f"per-neuron knob has shape {tuple(value.shape)}, want ({n},)"
        return value.to(dtype)
    return torch.full((n,), float(value), dtype=dtype)


def _setup(weights, frames, cfg, adjacency=None):
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    for l, w in enumerate(weights):
        assert tuple(w.shape) == (sizes[l + 1], sizes[l]), f"weight {l} has shape {tuple(w.shape)}"
    dtype = weights[0].dtype
    offs = [sum(sizes[:l]) for l in range(len(sizes) + 1)]  # offs[-1] == N
    n_neu = offs[-1] - sizes[0]
    pad = lambda v, fill: torch.cat([torch.full((sizes[0],), fill, dtype=v.dtype), v])  # noqa: E731
    tau = _knob(cfg.tau, n_neu, torch.float64)
    g = SimpleNamespace(
        sizes=sizes, offs=offs, N=offs[-1], L=len(weights), dtype=dtype,
        frames=frames.to(dtype),
        decay=pad(torch.exp(-cfg.dt / tau), 1.0).to(dtype),
        theta=pad(_knob(cfg.theta, n_neu, dtype), 1.0),
        sync=pad(_knob(cfg.sync_threshold, n_neu, torch.float64), 1.0).round().long(),
        neurons=slice(sizes[0], offs[-1]), outputs=slice(offs[-2], offs[-1]))
    layer = torch.cat([torch.full((n,), l) for l, n in enumerate(sizes)])
    g.hidden = (layer >= 1) & (layer < g.L)
    g.output = layer == g.L
    g.adj = torch.zeros(g.N, g.N, dtype=torch.float64)  # adj[j, i] = 1 iff j feeds i
    g.Wbig = torch.zeros(g.N, g.N, dtype=dtype)
    for l, w in enumerate(weights):
        rows, cols = slice(offs[l], offs[l + 1]), slice(offs[l + 1], offs[l + 2])
        g.adj[rows, cols] = 1.0 if adjacency is None else adjacency[l].to(torch.float64)
        g.Wbig[rows, cols] = w.t()  # differentiable (CopySlices)
    g.fanout = g.adj.sum(1).round().long()                     # targets per source
    g.fan_in1 = g.adj[:offs[1], offs[1]:offs[2]].sum(0).round().long()  # layer-1 fan-in
    return g


def _input_frame(g, cfg, t, training, seed):
    x = g.frames[t]
    if training and cfg.input_dropout > 0:
        idx = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        x = torch.where(uniform(seed, STREAM_INPUT_DROPOUT, t, 0, idx) < cfg.input_dropout, 0.0, x)
    return x


def _new_stats(T, B, n_neu, dtype):
    z = lambda: torch.zeros(T, B, dtype=torch.int64)  # noqa: E731
    return dict(forward_steps=z(), synops=z(), first_output_step=z() - 1,
                capped=torch.zeros(T, B, dtype=torch.bool),
                hidden_spikes=torch.zeros(B, dtype=torch.int64), spikes_processed=z(),
                V=torch.zeros(T, B, n_neu, dtype=dtype),
                neuron_spikes=torch.zeros(T, B, n_neu, dtype=torch.int64))


def _evaluate(g, st, cfg, I, recv, add_n, t, k, training, seed):
    """SPEC 5.4 for the receivers `recv` [B, N] of one step; updates `st` in place."""
    if st.E is not None:  # fill_slots: synced, not clamped: the outbox holds gradient
        st.E = st.E | (recv & (st.n_in + add_n >= g.sync) & ~st.R & g.hidden)
    before = st.n_in
    st.n_in = st.n_in + add_n
    V1 = (st.V + I) * (1 - st.R.to(g.dtype))
    synced = st.n_in >= g.sync
    s = spike(V1 - g.theta, cfg.surrogate_steepness) * synced.to(g.dtype)
    s = torch.where(recv, s, 0.0)
    fired = recv & (s > 0)
    if st.L is not None:  # fire_or_last: the derivative where it fired; else parked in L
        st.L = torch.where(recv, torch.where(fired, 0.0, s), st.L)
        s = torch.where(fired, s, s.detach())
    hid = recv & g.hidden
    st.O = st.O + torch.where(hid, s, 0.0)
    st.P = st.P | (hid & fired)
    if cfg.barrier_messages:
        st.P = st.P | (hid & ~fired & (before < g.sync) & synced)
    st.acc = st.acc + s[:, g.outputs]
    st.S = torch.where(fired, V1.detach(), st.S)
    if cfg.refractory:
        refr = fired
        if training and cfg.refractory_dropout > 0:
            u = uniform(st.seed, STREAM_REFRACTORY_DROPOUT, t, k, st.idx).to(g.dtype)
            refr = refr & ~(u < cfg.refractory_dropout)
        st.R = st.R | refr
    reset = s.detach() if cfg.detach_reset else s
    st.V = torch.where(recv, V1 * (1 - reset), st.V)
    st.hidden_spikes += (fired & g.hidden).sum(1)
    st.neuron_spikes += fired.long()
    out_fired = (fired & g.output).any(1)
    st.first = torch.where(out_fired & (st.first < 0), k + 1, st.first)


def _end_windows(st, cfg, ends):
    """fire_or_last: the windows of `ends` [B, N] end; the reset of their last
    evaluation, V <- V1 * (1 - s), takes its derivative now (V == V1 there)."""
    if not cfg.detach_reset:
        st.V = torch.where(ends, st.V * (1 - st.L), st.V)
    st.L = torch.where(ends, 0.0, st.L)


def _select(g, st, cfg, active, t, k, training):
    """[B, N] bool: the min(K, #pending) pending entries with the highest key (SPEC 6)."""
    if cfg.policy == "RS":
        key = uniform(st.seed, STREAM_RS_KEY, t, k, st.idx).to(g.dtype)
    else:
        key = st.S.clone()
        if training and cfg.momentum_noise > 0:
            key = key + cfg.momentum_noise * uniform(st.seed, STREAM_MOMENTUM_NOISE, t, k, st.idx).to(g.dtype)
        key[:, :g.sizes[0]] = math.inf
    n0 = g.sizes[0]
    random_inputs = cfg.policy == "MS" and cfg.input_order == "random"
    sel = torch.zeros_like(st.P)
    for b in range(st.P.shape[0]):
        if not active[b]:
            continue
        cand = st.P[b].nonzero().flatten()  # ascending flat index
        order = cand[torch.sort(-key[b, cand], stable=True).indices]
        if random_inputs:  # pending inputs first, by decreasing order key (ties: lower index)
            inp = cand[cand < n0]
            q = input_order_key(st.seed, t, torch.full_like(inp, b), inp)
            order = torch.cat([inp[torch.sort(-q, stable=True).indices], order[order >= n0]])
        sel[b, order[:cfg.forward_group_size]] = True
    return sel


def _fillers(g, st, cfg, sel, active, t, k):
    """[B, N] bool: fill_slots (SPEC 8): the K - #selected best candidates (hidden, not
    pending, outbox holding gradient: `st.E`), MS: highest V (float32), RS: U of
    STREAM_FILL; ties to the lower index."""
    if cfg.policy == "RS":
        key = uniform(st.seed, STREAM_FILL, t, k, st.idx).to(torch.float64)
    else:
        key = st.V.detach().to(torch.float32).to(torch.float64)
    fill = torch.zeros_like(st.P)
    for b in range(st.P.shape[0]):
        free = cfg.forward_group_size - int(sel[b].sum())
        if not active[b] or free <= 0:
            continue
        cand = (st.E[b] & ~st.P[b] & g.hidden).nonzero().flatten()
        order = cand[torch.sort(-key[b, cand], stable=True).indices]
        fill[b, order[:free]] = True
    return fill


def dense_simulate(weights, frames, cfg, *, seed=0, training=False, adjacency=None):
    """Event-driven simulation (policy RS or MS; "layered" dispatches to `dense_layered`).

    weights: list of W_l [n_{l+1}, n_l]; frames: [T, B, n_inputs]. Returns (out, stats):
    out [T, B, n_out] (counts or potentials per `cfg.readout`, differentiable); stats:
    forward_steps, synops, first_output_step, spikes_processed (int64 [T, B]), capped
    (bool [T, B]), hidden_spikes (int64 [B]), V (membrane after each pass, [T, B,
    n_neurons], detached), neuron_spikes (int64 [T, B, n_neurons]).
    """
    if cfg.policy == "layered":
        return dense_layered(weights, frames, cfg, seed=seed, training=training, adjacency=adjacency)
    g = _setup(weights, frames, cfg, adjacency)
    T, B = g.frames.shape[:2]
    N, n0 = g.N, g.sizes[0]
    fill_slots = training and cfg.fill_slots
    stats = _new_stats(T, B, N - n0, g.dtype)
    st = SimpleNamespace(seed=seed, idx=torch.arange(N).expand(B, N),
                         V=torch.zeros(B, N, dtype=g.dtype), O=torch.zeros(B, N, dtype=g.dtype),
                         P=torch.zeros(B, N, dtype=torch.bool), hidden_spikes=stats["hidden_spikes"],
                         L=torch.zeros(B, N, dtype=g.dtype) if cfg.surrogate_at == "fire_or_last" else None)
    outs = []
    for t in range(T):
        st.V = st.V * g.decay
        st.R = torch.zeros(B, N, dtype=torch.bool)
        st.S = torch.zeros(B, N, dtype=g.dtype)
        st.n_in = torch.zeros(B, N, dtype=torch.int64)
        if not cfg.carry_pending:
            st.O, st.P = torch.zeros_like(st.O), torch.zeros_like(st.P)
        st.acc = torch.zeros(B, g.sizes[-1], dtype=g.dtype)
        st.first = torch.full((B,), -1, dtype=torch.int64)
        st.neuron_spikes = torch.zeros(B, N, dtype=torch.int64)
        st.E = torch.zeros(B, N, dtype=torch.bool) if fill_slots else None
        steps = torch.zeros(B, dtype=torch.int64)
        synops = torch.zeros(B, dtype=torch.int64)
        processed = torch.zeros(B, dtype=torch.int64)
        x = _input_frame(g, cfg, t, training, seed)
        rest = torch.zeros(B, N - n0, dtype=g.dtype)
        k = 0
        if cfg.prioritize_input:
            I1 = x @ weights[0].t()
            I = torch.cat([torch.zeros(B, n0, dtype=g.dtype), I1,
                           torch.zeros(B, N - n0 - g.sizes[1], dtype=g.dtype)], 1)
            recv = torch.zeros(B, N, dtype=torch.bool)
            recv[:, g.offs[1]:g.offs[2]] = True
            add_n = torch.zeros(B, N, dtype=torch.long)
            add_n[:, g.offs[1]:g.offs[2]] = g.fan_in1  # every input feature, zero or not
            _evaluate(g, st, cfg, I, recv, add_n, t, 0, training, seed)
            nnz = (x != 0).sum(1)
            synops += ((x != 0).long() * g.fanout[:n0]).sum(1)
            processed += nnz
            steps += 1
            k = 1
        else:
            st.O = st.O + torch.cat([x, rest], 1)
            st.P = st.P | torch.cat([x != 0, rest != 0], 1)
        while True:
            out_stop = (cfg.stop == "output") & (st.first >= 0) & (steps >= st.first + cfg.steps_after_output)
            pending = st.P.any(1)
            done = ~pending | out_stop | (steps >= cfg.max_steps)
            if done.all():
                break
            active = ~done
            assert (steps[active] == k).all()
            sel = _select(g, st, cfg, active, t, k, training)
            fill = _fillers(g, st, cfg, sel, active, t, k) if fill_slots else torch.zeros_like(sel)
            D, Df = sel, fill
            if training and cfg.network_dropout > 0:
                kept = ~(uniform(seed, STREAM_NETWORK_DROPOUT, t, k, st.idx) < cfg.network_dropout)
                D, Df = sel & kept, fill & kept
            vals = torch.where(D | Df, st.O if st.L is None else st.O + st.L, 0.0)
            if st.L is not None:  # the emptied outboxes' windows end: their last evaluations count
                _end_windows(st, cfg, sel | fill)
            st.O = torch.where(sel | fill, 0.0, st.O)
            st.P = st.P & ~sel
            if fill_slots:
                st.E = st.E & ~(sel | fill)
            I = vals @ g.Wbig
            add_n = (D.double() @ g.adj).round().long()
            recv = ((D | Df).double() @ g.adj) > 0  # fillers' targets are evaluated, uncounted
            _evaluate(g, st, cfg, I, recv, add_n, t, k, training, seed)
            synops += ((D & (vals != 0)).long() * g.fanout).sum(1)
            processed += (D & (vals != 0)).sum(1)
            steps += active.long()
            k += 1
        if st.L is not None:  # every window ends with the pass
            st.O = st.O + torch.where(g.hidden, st.L, 0.0)
            st.acc = st.acc + st.L[:, g.outputs]
            _end_windows(st, cfg, torch.ones_like(st.P))
        stats["capped"][t] = (steps >= cfg.max_steps) & pending & ~out_stop
        stats["forward_steps"][t] = steps
        stats["synops"][t] = synops
        stats["spikes_processed"][t] = processed
        stats["first_output_step"][t] = st.first
        stats["V"][t] = st.V[:, g.neurons].detach()
        stats["neuron_spikes"][t] = st.neuron_spikes[:, g.neurons]
        outs.append(st.acc if cfg.readout == "counts" else st.V[:, g.outputs])
    return torch.stack(outs), stats


def dense_layered(weights, frames, cfg, *, seed=0, training=False, adjacency=None):
    """The usual synchronous SNN (SPEC 6 "layered"): one forward step per layer. Same
    return contract as `dense_simulate`; cfg.policy is not consulted."""
    g = _setup(weights, frames, cfg, adjacency)
    T, B = g.frames.shape[:2]
    L, offs, sizes = g.L, g.offs, g.sizes
    stats = _new_stats(T, B, g.N - sizes[0], g.dtype)
    V = [torch.zeros(B, n, dtype=g.dtype) for n in sizes[1:]]
    outs = []
    for t in range(T):
        V = [v * g.decay[offs[l + 1]:offs[l + 2]] for l, v in enumerate(V)]
        x = _input_frame(g, cfg, t, training, seed)
        prev = x
        synops = ((x != 0).long() * g.fanout[:offs[1]]).sum(1)
        processed = (x != 0).sum(1)
        spikes = []
        for l in range(1, L + 1):
            lay = slice(offs[l], offs[l + 1])
            if l >= 2 and training and cfg.network_dropout > 0:  # hidden layer l-1 at step k=l-1
                idx = torch.arange(offs[l - 1], offs[l]).expand(B, -1)
                drop = uniform(seed, STREAM_NETWORK_DROPOUT, t, l - 1, idx) < cfg.network_dropout
                prev = torch.where(drop, 0.0, prev)
            if l >= 2:
                synops = synops + ((prev != 0).long() * g.fanout[offs[l - 1]:offs[l]]).sum(1)
                processed = processed + (prev != 0).sum(1)
            V1 = V[l - 1] + prev @ weights[l - 1].t()
            s = spike(V1 - g.theta[lay], cfg.surrogate_steepness)
            V[l - 1] = V1 * (1 - (s.detach() if cfg.detach_reset else s))
            spikes.append(s)
            prev = s
        all_s = torch.cat(spikes, 1).detach()
        stats["forward_steps"][t] = L
        stats["synops"][t] = synops
        stats["spikes_processed"][t] = processed
        stats["first_output_step"][t] = torch.where(spikes[-1].detach().sum(1) > 0, L, -1)
        stats["hidden_spikes"] += all_s[:, :g.N - sizes[0] - sizes[-1]].sum(1).long()
        stats["V"][t] = torch.cat(V, 1).detach()
        stats["neuron_spikes"][t] = all_s.long()
        outs.append(spikes[-1] if cfg.readout == "counts" else V[-1])
    return torch.stack(outs), stats
