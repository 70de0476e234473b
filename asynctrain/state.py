"""The state of one batch in the engine, its packed copy for checkpoints, and what a
neuron evaluation leaves for the bookkeeping and the backward (`StepInfo`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def pack(self, sync_free: bool = False) -> "PackedState":
        """A copy in fewer bytes for a checkpoint (`PackedState`)."""
        return PackedState.of(self, sync_free)


@dataclass
class PackedState:
    """A kept state in ~8 bytes per column instead of 13: the outboxes as their nonzero
    entries when under half are nonzero (pending spikes: a few percent at small K),
    the received counts as int16 when they fit. A copy: the state may go on being
    updated in place (fused steps). `sync_free` (CUDA, inside the step loop): the
    outboxes stay dense and the counts int32, so packing reads nothing on the host
    (13 bytes per column; the sparse choice needs the number of nonzero entries)."""

    v: torch.Tensor
    o: torch.Tensor                # [B, W], or the values at `o_at`
    o_at: torch.Tensor | None      # int32 flat positions of the nonzero outboxes
    acc: torch.Tensor
    refr: torch.Tensor
    n_in: torch.Tensor             # int16 or int32
    n_in_dtype: torch.dtype

    @staticmethod
    def of(st: State, sync_free: bool = False) -> "PackedState":
        if sync_free:
            return PackedState(st.v.clone(), st.o.clone(), None, st.acc.clone(), st.refr.clone(),
                               st.n_in.clone(), st.n_in.dtype)
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


@dataclass
class StepInfoListed(StepInfoAt):
    """`StepInfoAt` at a fixed-size list of a step's receivers (sync-free conv steps:
    `Engine._op_step_listed`): `idx` lists every target of every delivered entry,
    repeats included, and the sample's dump column where an entry reaches nobody
    (`valid` False there: not received, nothing changed). Every repeat of a column
    holds the same values, so whatever is written back at `idx` is idempotent."""

    valid: torch.Tensor    # bool [R]
