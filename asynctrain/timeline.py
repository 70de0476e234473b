"""The timeline of a call: its ops as typed records (`PassStart`, `InputStep`,
`EventStep`, `PassEnd`) and the states kept for the backward before some of them
(`Checkpoints`): the backward recomputes one segment of ops at a time from the
state kept before it (`loop.CallLoop`). Not the model files of `checkpoint.py`.

A call of T passes runs, per pass t::

    PassStart(t)  InputStep(t)  EventStep(t, 0 or 1, ...) ...  PassEnd(t)

Only event steps need a record: the [B, K] entries they selected (int32; fillers of
`fill_slots` as -1 - column, `Engine.decode`, so a record stays [B, K]), and those
delivered when network dropout removed some. Everything else replays from the
state, the frames and the counter hash of `rng`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .state import PackedState, State


@dataclass(frozen=True, slots=True)
class PassStart:
    """Membranes decay, outboxes are dropped (unless `carry_pending`), counts reset."""

    t: int


@dataclass(frozen=True, slots=True)
class InputStep:
    """The frame of pass t: delivered as one forward step (prioritized input) or
    queued into the outboxes."""

    t: int


@dataclass(frozen=True, slots=True)
class EventStep:
    """One forward step of pass t: the K entries selected per sample."""

    t: int
    step: int                        # forward step in the pass (the input step is 0)
    sel: torch.Tensor                # int32 [B, K] selected entries (fillers: -1 - column)
    sel_deliv: torch.Tensor | None   # int32 [B, K] delivered (dropped: the dump); None: `sel`

    def selections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(selected, delivered) int64 [B, K], as recorded."""
        sel = self.sel.long()
        return sel, (sel if self.sel_deliv is None else self.sel_deliv.long())


@dataclass(frozen=True, slots=True)
class PassEnd:
    """The pass's readout (output spikes or potentials)."""

    t: int


Op = PassStart | InputStep | EventStep | PassEnd


class Checkpoints:
    """States kept before every C-th op. ``every=None``: adaptive -- C doubles (and
    every other checkpoint is dropped) whenever more than C are kept, so at the end
    C ~ sqrt(ops) and about sqrt(ops) checkpoints remain.

    `ratio` r < 1 (a step's backward record is r times the size of a state, as for
    conv networks at small K): C doubles whenever more than r C are kept, so
    C ~ sqrt(ops / r), about sqrt(ops r) states are kept and the memory of the
    backward, ~2 sqrt(ops r) states, stays flat as K shrinks (ops ~ 1/K, r ~ K).

    `nested` (the backward splits each segment again, `Plan.sub_segment`): C doubles
    whenever more than sqrt(C r) are kept, so C ~ ops^(2/3) r^(-1/3): the kept states
    then weigh half of what one split segment holds at once, the minimum of their sum:
    ~3 (ops r)^(1/3) states in all.

    `sync_free` (CUDA): states are packed without host reads (`PackedState.of`);
    `share`: a kept state holds the live state's tensors instead of copies (the steps
    must never update a state in place: the whole-state steps)."""

    def __init__(self, every: int | None, ratio: float = 1.0, nested: bool = False,
                 sync_free: bool = False, share: bool = False):
        self.adaptive = every is None
        self.sync_free = sync_free  # pack without reading the state on the host
        self.share = share  # the steps never update a state in place: keep its tensors
        self.c = 1 if every is None else every
        self.ratio = ratio
        self.nested = nested
        self.saved: dict[int, PackedState] = {}

    def offer(self, i: int, st: State) -> None:
        """`st` is the state before op `i`: kept when a checkpoint is due there."""
        if i % self.c:
            return
        self.saved[i] = st.pack(sync_free=self.sync_free, share=self.share)
        cap = math.sqrt(self.c * self.ratio) if self.nested else self.c * self.ratio
        if self.adaptive and len(self.saved) > cap:
            self.c *= 2
            self.saved = {j: s for j, s in self.saved.items() if j % self.c == 0}
