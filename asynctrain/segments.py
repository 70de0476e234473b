"""The states the forward keeps for the backward (`Checkpoints`): the backward
recomputes one segment of ops at a time from the state kept before it
(`backward.py`). Not the model files of `checkpoint.py`."""

from __future__ import annotations

import math

from .state import PackedState, State


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
    ~3 (ops r)^(1/3) states in all.

    `sync_free` (CUDA): states are packed without host reads (`PackedState.of`)."""

    def __init__(self, every: int | None, ratio: float = 1.0, nested: bool = False,
                 sync_free: bool = False):
        self.adaptive = every is None
        self.sync_free = sync_free  # pack without reading the state on the host
        self.c = 1 if every is None else every
        self.ratio = ratio
        self.nested = nested
        self.saved: dict[int, PackedState] = {}

    def offer(self, i: int, st: State) -> None:
        if i % self.c:
            return
        self.saved[i] = st.pack(sync_free=True) if self.sync_free else st.pack()
        cap = math.sqrt(self.c * self.ratio) if self.nested else self.c * self.ratio
        if self.adaptive and len(self.saved) > cap:
            self.c *= 2
            self.saved = {j: s for j, s in self.saved.items() if j % self.c == 0}


def _offer(ckpt: Checkpoints | None, ops: list, st: State) -> None:
    if ckpt is not None:
        ckpt.offer(len(ops), st)
