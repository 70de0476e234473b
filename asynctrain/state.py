"""The state of one batch in the engine (`State`), its packed copy for checkpoints
(`PackedState`) and its adjoint in the backward sweep (`Adjoints`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class State:
    """One batch's state; differentiable: v, o, acc. The engine's ops and the
    whole-state steps update it functionally (never in place: autograd may run through
    them), the receivers' steps and the fused steps in place; a checkpoint is a packed
    copy either way (`PackedState`). Ops that change some fields build the next state
    with ``dataclasses.replace``, so a field they do not name passes through."""

    v: torch.Tensor        # [B, W] membrane
    o: torch.Tensor        # [B, W] outbox values (pending spikes not yet delivered)
    acc: torch.Tensor      # [B, n_out] output spikes of the current pass
    refr: torch.Tensor     # bool [B, W]
    n_in: torch.Tensor     # int32 [B, W] currents received in this pass
    # plain autograd with surrogate_at="fire_or_last" only: [B, W], value 0, the parked
    # surrogate of each neuron's latest evaluation that did not fire (`ops.WindowCarrier`)
    carrier: torch.Tensor | None = None

    def clone(self) -> "State":
        """A copy the fused steps may update in place (they never touch a checkpoint)."""
        return State(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).clone()
                        for f in fields(self)})

    def pack(self, sync_free: bool = False, share: bool = False) -> "PackedState":
        """A copy in fewer bytes for a checkpoint (`PackedState`); `share`: keep this
        state's tensors where no packing changes them (only for steps that never update
        a state in place: the whole-state steps)."""
        return PackedState.of(self, sync_free, share)


@dataclass
class PackedState:
    """A kept state in ~8 bytes per column instead of 13: the outboxes as their nonzero
    entries when under half are nonzero (pending spikes: a few percent at small K),
    the received counts as int16 when they fit. A copy: the state may go on being
    updated in place (fused steps, the receivers' steps); with `share` the tensors that
    packing leaves unchanged are the state's own (steps that never update in place).
    `sync_free` (CUDA, inside the step loop): the outboxes stay dense and the counts
    int32, so packing reads nothing on the host (13 bytes per column; the sparse choice
    needs the number of nonzero entries)."""

    v: torch.Tensor
    o: torch.Tensor                # [B, W], or the values at `o_at`
    o_at: torch.Tensor | None      # int32 flat positions of the nonzero outboxes
    acc: torch.Tensor
    refr: torch.Tensor
    n_in: torch.Tensor             # int16 or int32
    n_in_dtype: torch.dtype

    @staticmethod
    def of(st: State, sync_free: bool = False, share: bool = False) -> "PackedState":
        cp = (lambda x: x) if share else torch.Tensor.clone  # noqa: E731
        if sync_free:
            return PackedState(cp(st.v), cp(st.o), None, cp(st.acc), cp(st.refr), cp(st.n_in), st.n_in.dtype)
        at = st.o.reshape(-1).nonzero().squeeze(1)
        sparse = 2 * at.numel() < st.o.numel() < 2**31
        o, o_at = (st.o.reshape(-1)[at], at.to(torch.int32)) if sparse else (cp(st.o), None)
        small = st.n_in.numel() == 0 or int(st.n_in.abs().max()) < 2**15
        n_in = st.n_in.to(torch.int16) if small else cp(st.n_in)
        return PackedState(cp(st.v), o, o_at, cp(st.acc), cp(st.refr), n_in, st.n_in.dtype)

    def unpack(self) -> State:
        """The state (sharing this one's tensors: clone before updating it in place)."""
        o = self.o
        if self.o_at is not None:
            o = torch.zeros_like(self.v).reshape(-1).index_put_((self.o_at.long(),), self.o).view_as(self.v)
        return State(self.v, o, self.acc, self.refr, self.n_in.to(self.n_in_dtype))


@dataclass
class Adjoints:
    """The backward sweep's adjoints of the differentiable state (`State`: v, o, acc),
    carried from segment to segment. The sweep's own tensors: each op's reverse updates
    them in place where that pays, or replaces them (`loop.CallLoop`: the ops of the
    engine and of the step modes)."""

    v: torch.Tensor    # [B, W]
    o: torch.Tensor    # [B, W]
    acc: torch.Tensor  # [B, n_out]
    # surrogate_at="fire_or_last" (else None): bool [B, W], the neuron's next evaluation
    # met going backwards is the last of its outbox window (set where a window ends: at
    # the pass's end and where a step empties the outbox; cleared by every evaluation)
    armed: torch.Tensor | None = None

    @staticmethod
    def zeros(st: State | PackedState, window: bool = False) -> "Adjoints":
        armed = torch.zeros(st.v.shape, dtype=torch.bool, device=st.v.device) if window else None
        return Adjoints(torch.zeros_like(st.v), torch.zeros_like(st.v), torch.zeros_like(st.acc), armed)
