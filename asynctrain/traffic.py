"""Host traffic and kernel launches of the step loops, counted on a CPU.

On CUDA a value read on the host waits for every kernel queued before it (a host
sync), a tensor built from Python values is copied to the device with a blocking copy,
and every torch op or Triton kernel is a launch of a few microseconds. None of that
can be seen on a CPU, where tensors live on the host and reads cost nothing. This
module gives those GPU-only facts a CPU proxy that tests hold (tests/test_no_sync.py,
tests/test_launches.py) and benchmarks report (benchmarks/launches.py), with the
CUDA modes forced on the CPU (`plan.forced(sync_free=True)`, Triton interpreted with
``TRITON_INTERPRET=1``):

- `HostReads` records, while it watches, every call a CUDA run would pay a host sync
  or a blocking copy for (`KINDS`): a conversion to a host value (``item``,
  ``tolist``, ``bool()``, ``int()``, ``float()``, ``operator.index``, ``complex()``,
  ``numpy``, ``cpu``, ``__array__``), an op whose output shape depends on the data
  (``nonzero``, ``argwhere``, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, one-argument ``torch.where``) or
  that returns a host bool (``equal``, ``allclose``, ``is_nonzero``), indexing with
  a boolean mask (``__getitem__``, ``__setitem__``, ``index_put(_)``: a nonzero),
  a Python number assigned through a tensor index (``x[idx] = 0.0``: the number
  becomes a CPU tensor copied to the device, blocking) and a tensor built from
  Python values (``torch.tensor``, ``torch.as_tensor``, ``torch.asarray`` of
  anything but a tensor). Tensor methods and torch functions are wrapped while it
  is installed (``with HostReads() as reads:``); ``reads.watching()`` turns
  recording on, ``reads.allowed()`` off (the stop test, `kernels/host.py`).
- `Traffic` counts, per region (`Traffic.region`), what a CUDA run of the same code
  would launch, copy and sync:

  * a **launch** is one Triton kernel launch (``JITFunction.run``, or the
    interpreter's ``InterpretedFunction.run``; nothing the interpreter does inside
    is counted) or one torch op that computes on the device, seen as an ATen op by
    a ``TorchDispatchMode``: every op but views, ``empty*`` allocations, the scalar
    reads counted as syncs and ``scalar_tensor`` (a Python number an op was given,
    wrapped on the host: a CUDA kernel takes it as an argument). One op counts once even where CUDA runs several
    kernels for it (``topk``, ``sort``, ``cumsum``, ``nonzero``), so the counts are
    a lower bound of the kernels a profiler shows;
  * a **device copy** is a launch that only moves bytes: ``copy_``, ``clone``,
    ``_to_copy`` (dtype conversions included), ``cat``, ``stack``;
  * a **host sync** is a `HostReads` record outside `Traffic.allowed`, or an ATen op
    that syncs on CUDA and was not called from a recorded Python call
    (``_local_scalar_dense``, ``nonzero``, ``masked_select``, ``unique``,
    ``bincount``, ``repeat_interleave`` without ``output_size``, ``equal``,
    ``is_nonzero``, indexing with a bool tensor); the allowed stop-test reads are
    counted apart (``reads``).

`measure` runs one training iteration (forward, checkpointed backward) under a
`Traffic` and splits its counts into the forward and the backward (recompute and
sweep together), each into its per-step part (`STEP_METHODS`: the step loops, a
step's replay and reverse) and the rest, per pass (set-up: a pass's start, input,
end and their reverses, the loops' allocations, checkpoints of nested segments).
"""

from __future__ import annotations

import contextlib
import numbers
import traceback
from collections import Counter as _Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("item", "tolist", "bool", "int", "float", "index", "complex", "numpy", "cpu", "array",
         "nonzero", "argwhere", "masked_select", "unique", "bincount", "repeat_interleave", "where(cond)",
         "equal", "allclose", "is_nonzero", "bool-mask index", "scalar through a tensor index",
         "tensor from Python values")

# Tensor methods that read the host, by kind.
_METHODS = {"item": "item", "tolist": "tolist", "__bool__": "bool", "__int__": "int", "__float__": "float",
            "__index__": "index", "__complex__": "complex", "numpy": "numpy", "cpu": "cpu",
            "__array__": "array", "nonzero": "nonzero", "argwhere": "argwhere",
            "masked_select": "masked_select", "unique": "unique", "unique_consecutive": "unique",
            "bincount": "bincount", "equal": "equal", "allclose": "allclose"}
# torch functions that read the host, by kind.
_FUNCTIONS = {"nonzero": "nonzero", "argwhere": "argwhere", "masked_select": "masked_select",
              "unique": "unique", "unique_consecutive": "unique", "bincount": "bincount",
              "equal": "equal", "allclose": "allclose", "is_nonzero": "is_nonzero"}


def _has_bool_tensor(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    if isinstance(index, (tuple, list)):
        return any(_has_bool_tensor(i) for i in index)
    return False


def _has_tensor(index) -> bool:
    if isinstance(index, torch.Tensor):
        return True
    if isinstance(index, (tuple, list)):
        return any(_has_tensor(i) for i in index)
    return False


def _is_python_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, torch.Tensor)


class HostReads:
    """Records host reads (`KINDS`) while installed and watching; see the module doc.
    ``seen``: the kinds recorded, in order; ``where``: a short location of each.
    `on_read(kind)`: called at each record. `setattr`: how the wrappers are installed
    (e.g. pytest's ``monkeypatch.setattr``, which then also removes them; the
    default is undone by leaving the ``with`` block)."""

    def __init__(self, on_read=None, setattr=None):
        self.on = False
        self.seen: list[str] = []
        self.where: list[str] = []
        self._depth = 0  # inside a wrapped call: nested wrapped calls are its own
        self._on_read = on_read
        self._saved: list[tuple[object, str, object]] = []
        self._setattr = setattr

    # --- install / uninstall ------------------------------------------------------------
    def __enter__(self) -> "HostReads":
        for name, kind in _METHODS.items():
            self._wrap(torch.Tensor, name, lambda *a, _k=kind, **kw: _k)
        for name, kind in _FUNCTIONS.items():
            self._wrap(torch, name, lambda *a, _k=kind, **kw: _k)
        self._wrap(torch.Tensor, "repeat_interleave", _repeat_kind)
        self._wrap(torch, "repeat_interleave", lambda x, repeats=None, *a, **kw: _repeat_kind(x, repeats, *a, **kw))
        self._wrap(torch, "where", lambda *a, **kw: "where(cond)" if len(a) + len(kw) == 1 else None)
        for name in ("tensor", "as_tensor", "asarray"):
            self._wrap(torch, name, lambda data=None, *a, **kw: None if isinstance(data, torch.Tensor)
                       else "tensor from Python values")
        for name in ("__getitem__", "index_put", "index_put_"):
            self._wrap(torch.Tensor, name, lambda x, index=None, *a, **kw: "bool-mask index"
                       if _has_bool_tensor(index) else None)
        self._wrap(torch.Tensor, "__setitem__", _setitem_kind)
        for cls in _triton_classes():  # what a kernel launch (interpreted too) does inside is its own
            self._wrap(cls, "run", lambda *a, **kw: None)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()

    def _wrap(self, owner, name, kind_of) -> None:
        orig = getattr(owner, name)
        reads = self

        def wrapper(*a, **kw):
            if reads._depth:
                return orig(*a, **kw)
            kind = kind_of(*a, **kw) if reads.on else None
            if kind is not None:
                reads._record(kind)
            reads._depth += 1
            try:
                return orig(*a, **kw)
            finally:
                reads._depth -= 1

        wrapper.__name__ = getattr(orig, "__name__", name)
        wrapper.__doc__ = getattr(orig, "__doc__", None)
        if self._setattr is not None:
            self._setattr(owner, name, wrapper)
        else:
            self._saved.append((owner, name, orig))
            setattr(owner, name, wrapper)

    def _record(self, kind: str) -> None:
        self.seen.append(kind)
        frames = [f for f in traceback.extract_stack(limit=12) if "traffic.py" not in f.filename]
        self.where.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[-3:][::-1]))
        if self._on_read is not None:
            self._on_read(kind)

    @property
    def inside(self) -> bool:
        """A wrapped call is running (its ATen ops are its own)."""
        return self._depth > 0

    # --- recording on / off ---------------------------------------------------------------
    @contextlib.contextmanager
    def watching(self):
        was, self.on = self.on, True
        try:
            yield self
        finally:
            self.on = was

    @contextlib.contextmanager
    def allowed(self):
        was, self.on = self.on, False
        try:
            yield self
        finally:
            self.on = was


def _repeat_kind(x, repeats=None, *a, output_size=None, **kw):
    return "repeat_interleave" if isinstance(repeats, torch.Tensor) and output_size is None else None


def _setitem_kind(x, index=None, value=None):
    if _has_bool_tensor(index):
        return "bool-mask index"
    if _has_tensor(index) and _is_python_number(value):
        return "scalar through a tensor index"
    return None


def _triton_classes() -> tuple[type, ...]:
    """The classes whose ``run`` launches a Triton kernel (compiled, interpreted)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        return ()
    return JITFunction, InterpretedFunction


# --- launches, copies, syncs --------------------------------------------------------------
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "lift", "resize_", "set_", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream",
              "_local_scalar_dense", "equal", "is_nonzero", "scalar_tensor"}
_COPIES = {"copy_", "_copy_from", "clone", "_to_copy", "cat", "stack"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "bincount", "equal", "is_nonzero", "argwhere"}


def _aten_sync(name: str, args, kwargs) -> bool:
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave":
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        return len(args) > 1 and _has_bool_tensor(args[1])
    return False


@dataclass
class Counts:
    launches: int = 0
    copies: int = 0
    syncs: int = 0
    reads: int = 0  # the allowed stop-test reads
    ops: _Counter = field(default_factory=_Counter)      # launches by op / kernel name
    sync_kinds: _Counter = field(default_factory=_Counter)

    def add(self, other: "Counts") -> None:
        self.launches += other.launches
        self.copies += other.copies
        self.syncs += other.syncs
        self.reads += other.reads
        self.ops.update(other.ops)
        self.sync_kinds.update(other.sync_kinds)


class _Dispatch(TorchDispatchMode):
    def __init__(self, traffic: "Traffic"):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.traffic._aten(func, args, kwargs)
        return func(*args, **kwargs)


class Traffic:
    """Counts launches, device copies and host syncs per region while entered
    (``with Traffic() as tr:``); see the module doc. `region(label)` attributes what
    runs inside it to `label` (nested: the innermost); `allowed()` marks the stop
    test's reads. ``counts[label]``: `Counts`."""

    def __init__(self):
        self.counts: dict[str, Counts] = {}
        self._labels = ["outside"]
        self._paused = 0
        self._allowed = 0
        self.reads = HostReads(on_read=self._on_read)
        self._mode = _Dispatch(self)
        self._triton: list[tuple[type, object]] = []

    def _here(self) -> Counts:
        return self.counts.setdefault(self._labels[-1], Counts())

    # --- events -------------------------------------------------------------------------
    def _on_read(self, kind: str) -> None:
        c = self._here()
        c.syncs += 1
        c.sync_kinds[kind] += 1

    def _aten(self, func, args, kwargs) -> None:
        if self._paused:
            return
        name = func._schema.name.split("::")[-1]
        c = self._here()
        if _aten_sync(name, args, kwargs) and not self.reads.inside and not self._allowed:
            c.syncs += 1
            c.sync_kinds[f"aten.{name}"] += 1
        if name in _NO_KERNEL or func.is_view:
            return
        c.launches += 1
        c.ops[name] += 1
        if name in _COPIES:
            c.copies += 1

    def _launch(self, kernel) -> None:
        c = self._here()
        c.launches += 1
        fn = getattr(kernel, "fn", kernel)
        c.ops[f"triton:{getattr(fn, '__name__', repr(fn))}"] += 1

    # --- regions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def region(self, label: str):
        self._labels.append(label)
        try:
            yield
        finally:
            self._labels.pop()

    @contextlib.contextmanager
    def allowed(self):
        """A stop test's read: counted as one of ``reads``, not as a sync."""
        self._here().reads += 1
        self._allowed += 1
        try:
            with self.reads.allowed():
                yield
        finally:
            self._allowed -= 1

    def total(self, *labels: str) -> Counts:
        out = Counts()
        for label in labels:
            if label in self.counts:
                out.add(self.counts[label])
        return out

    # --- install ---------------------------------------------------------------------------
    def __enter__(self) -> "Traffic":
        self._install_triton()
        self.reads.__enter__()
        self.reads.on = True
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self.reads.on = False
        self.reads.__exit__(*exc)
        for cls, run in reversed(self._triton):
            cls.run = run
        self._triton.clear()

    def _install_triton(self) -> None:
        traffic = self
        for cls in _triton_classes():
            orig = cls.run

            def run(kernel, *args, _orig=orig, **kwargs):
                if traffic._paused:
                    return _orig(kernel, *args, **kwargs)
                traffic._launch(kernel)
                traffic._paused += 1
                try:
                    return _orig(kernel, *args, **kwargs)
                finally:
                    traffic._paused -= 1

            self._triton.append((cls, orig))
            cls.run = run


# --- one training iteration, by phase ------------------------------------------------------
def step_methods() -> list[tuple[type, str]]:
    """The methods whose launches are per-step work: the forward's step loops (the
    per-op loop with its stop tests, the fused steps' batches) and, in the backward, a
    recorded step's replay (its evaluation and record) and its reverse."""
    from .fused import FusedMode
    from .loop import CallLoop
    from .steps import PerOpMode
    return [(CallLoop, "_steps"), (CallLoop, "_fused_pass"), (CallLoop, "_replay_step"),
            (PerOpMode, "step_backward"), (FusedMode, "step_backward")]


@dataclass
class PhaseCounts:
    """One phase of an iteration: per forward step and, for the rest, per pass."""

    steps: int            # forward (event) steps of the call
    passes: int
    step: Counts          # inside the step methods
    setup: Counts         # the rest of the phase

    def per_step(self) -> dict:
        n = max(self.steps, 1)
        return dict(launches_per_step=self.step.launches / n, device_copies_per_step=self.step.copies / n,
                    host_syncs_per_step=(self.step.syncs + self.setup.syncs) / n,
                    stop_tests_per_step=(self.step.reads + self.setup.reads) / n,
                    setup_launches_per_pass=self.setup.launches / max(self.passes, 1),
                    setup_copies_per_pass=self.setup.copies / max(self.passes, 1))


def measure(snn, frames: torch.Tensor, *, seed: int = 0, grad_weights: torch.Tensor | None = None
            ) -> tuple[dict[str, PhaseCounts], Traffic, torch.Tensor]:
    """One training iteration of `snn` on `frames` (forward, backward of
    ``(out * grad_weights).sum()``; no optimizer step) under a `Traffic`, split by
    phase: {"forward": ..., "backward": ...} (`PhaseCounts`). Returns (phases, the
    traffic, the output)."""
    from unittest import mock

    from .kernels import host
    from .loop import CallLoop
    from .timeline import EventStep

    tr = Traffic()
    n_steps = []
    forward, backward, read = CallLoop.forward, CallLoop.backward, host.read

    def in_phase(label, fn):
        def wrapped(self, *a, **kw):
            with tr.region(label):
                res = fn(self, *a, **kw)
            if label == "forward":
                n_steps.append(sum(isinstance(op, EventStep) for op in res.ops))
            return res
        return wrapped

    def in_step(fn):
        def wrapped(*a, **kw):
            phase = tr._labels[-1].split(":")[0]
            with tr.region(f"{phase}:step"):
                return fn(*a, **kw)
        return wrapped

    def allowed_read(x):
        with tr.allowed():
            return read(x)

    patches = [mock.patch.object(CallLoop, "forward", in_phase("forward", forward)),
               mock.patch.object(CallLoop, "backward", in_phase("backward", backward)),
               mock.patch.object(host, "read", allowed_read)]
    patches += [mock.patch.object(cls, name, in_step(cls.__dict__[name])) for cls, name in step_methods()]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        with tr:
            out = snn(frames, seed=seed)
            w = torch.ones_like(out) if grad_weights is None else grad_weights
            (out * w).sum().backward()
    steps, passes = sum(n_steps), frames.shape[0] * len(n_steps)
    phases = {p: PhaseCounts(steps, passes, tr.total(f"{p}:step"), tr.total(p)) for p in ("forward", "backward")}
    return phases, tr, out.detach()
