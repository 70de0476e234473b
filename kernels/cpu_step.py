"""Fused forward steps on the CPU (fully connected networks): the `cpu` backend.

On a CPU, a forward step of a small network costs less in arithmetic than in the
~100 tensor ops the torch path issues for it (select, gather, scatter, LIF,
bookkeeping; ~70 more per step in the backward's recompute and sweep), each a few
microseconds at B = 32, N = 755. `cpu_step.c` does each of the three per-step
phases in one call over the whole batch:

- `forward_step`: per sample, the top-K pending outboxes by packed key (quickselect,
  then the K sorted; SPEC 6 ties to the lower index), network dropout, the gather of
  the K fan-out rows into the receivers, LIF evaluation, refractoriness (with its
  dropout), outboxes, output accumulator, pending flags, barrier messages, pre-spike
  potentials, step counts, first output step; then every sample's stop condition.
- `replay_step`: the same delivery and evaluation for a recorded selection (the
  backward's recompute), writing the record the sweep needs (one flag byte per
  column: `step_spec.FusedRecord`); `replay_steps` runs n of them.
- `backward_step`: the reverse of one step (surrogate, adjoints of receivers and
  outboxes, weight-table rows of the K sources); `backward_steps` runs n, last first.

The twin is the torch path itself (`Engine.select`, `Engine.deliver`, the whole-state
mode of `asynctrain/steps.py`: `WholeState.evaluate`, `.bookkeep`, `.evaluation_backward`
with `deliver_backward_torch`):
same counter hash, same float operations in the same order, compiled without FMA
contraction, so selections and spikes are identical and potentials bitwise equal
when the K slots are added in the same order (here: highest key first; the torch
path's `topk(sorted=False)` order is unspecified, so tests compare sorted
selections and potentials to fp tolerance). Gradients match to fp rounding (sums
in another order). Tests: tests/test_cpu_backend.py.

State tensors are updated in place; a checkpoint is a packed copy
(`state.PackedState`), so the steps never touch one. The library is built from the C source on
first use with the system C compiler (``$CC``, else ``cc``) into
``$ASYNCTRAIN_CACHE`` (default ``~/.cache/asynctrain``, or a folder in the
temporary directory when the home is not writable), keyed by a hash of the source,
and loaded with ctypes: no torch headers, a build takes about a second.
Single-threaded; float32 and float64.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from . import host
from .step_spec import FusedRecord, OneStep, PassTensors, StepSpec, as_spec

_HERE = Path(__file__).resolve().parent
_SOURCES = ("cpu_step.c", "cpu_step_impl.h")
_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_p, _i64, _u32, _i32, _dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int32, ctypes.c_double


class Ctx(ctypes.Structure):
    """Mirror of `Ctx` in cpu_step.c (field order and types must match)."""

    _fields_ = [("B", _i64), ("W", _i64), ("K", _i64), ("F", _i64), ("n_slots", _i64),
                ("out_lo", _i64), ("out_hi", _i64),
                ("source_slot", _p), ("slot_lo", _p), ("slot_hi", _p),
                ("is_source", _p),
                ("is_input", _p), ("sync", _p), ("theta", _p), ("wt", _p),
                ("policy_ms", _i32), ("refractory", _i32), ("barrier", _i32), ("stop_output", _i32),
                ("eager_first", _i32), ("detach_reset", _i32), ("input_random", _i32),
                ("fill", _i32),
                ("noise", _dbl), ("p_ref", _dbl), ("p_net", _dbl), ("alpha", _dbl),
                ("max_steps", _i64), ("steps_after_output", _i64), ("seed", _u32),
                ("v", _p), ("o", _p), ("acc", _p), ("refr", _p), ("n_in", _p),
                ("pending", _p), ("pre_spike", _p), ("spike_sum", _p), ("steps", _p),
                ("first_out", _p), ("done", _p), ("hist_bins", _i64), ("hist", _p),
                ("fillable", _p)]


def _cache_dir() -> Path:
    """$ASYNCTRAIN_CACHE, else ~/.cache/asynctrain, else (no writable home, e.g. a CI
    user) a per-user folder in the system's temporary directory."""
    if "ASYNCTRAIN_CACHE" in os.environ:
        return Path(os.environ["ASYNCTRAIN_CACHE"])
    home = Path.home() / ".cache" / "asynctrain"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"asynctrain-{os.getuid()}"


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """Build (once per source version) and load the library. Raises RuntimeError with
    the compiler's message when it cannot be built."""
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((_HERE / name).read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    lib = _cache_dir() / f"cpu_step-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        cc = os.environ.get("CC", "cc")
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *_FLAGS, str(_HERE / "cpu_step.c"), "-o", tmp],
                               capture_output=True, text=True)
        except OSError as e:
            os.unlink(tmp)
            raise RuntimeError(f"backend='cpu' needs a C compiler: running {cc!r} failed ({e}); "
                               f"set CC or use backend='torch'") from None
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"backend='cpu': building {_HERE / 'cpu_step.c'} with {cc!r} failed:\n"
                               f"{r.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own temp file
    dll = ctypes.CDLL(str(lib))
    for sfx in _SUFFIX.values():
        getattr(dll, f"at_forward_step_{sfx}").restype = ctypes.c_int
        getattr(dll, f"at_forward_step_{sfx}").argtypes = [ctypes.POINTER(Ctx), _i64, _i64] + [_p] * 6
        getattr(dll, f"at_forward_steps_{sfx}").restype = ctypes.c_int64
        getattr(dll, f"at_forward_steps_{sfx}").argtypes = [ctypes.POINTER(Ctx), _i64, _i64, _i64] + [_p] * 6
        getattr(dll, f"at_replay_step_{sfx}").restype = None
        getattr(dll, f"at_replay_step_{sfx}").argtypes = [ctypes.POINTER(Ctx), _i64, _i64] + [_p] * 6
        getattr(dll, f"at_backward_step_{sfx}").restype = None
        getattr(dll, f"at_backward_step_{sfx}").argtypes = [ctypes.POINTER(Ctx)] + [_p] * 11
    return dll


def available() -> bool:
    """True when the library builds and loads here."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def _ptr(x: torch.Tensor) -> int:
    return x.data_ptr()


class CpuSteps(OneStep):
    """The fused steps of one engine call (`step_spec.FusedSteps`). Holds the tables, knobs
    (`StepSpec`) and the pointers of the state it works on; `bind_state` / `bind_pass`
    point it at other tensors (all contiguous, on the CPU, in the call's dtype; they are
    kept referenced here while bound)."""

    fills_slots = True  # fill_slots: bind_pass takes the pass's fill candidates
    records_histogram = True  # the currents-to-spike histogram (`PassTensors.hist`)

    @staticmethod
    def unsupported(spec: StepSpec) -> str | None:
        """Why these steps cannot run `spec` (None: they can)."""
        if spec.dtype not in _SUFFIX:
            return f"the fused CPU steps take float32 and float64, not {spec.dtype}"
        return None

    def __init__(self, spec) -> None:
        """`spec`: a `step_spec.StepSpec` (or an engine, through its ``step_spec()``)."""
        spec = as_spec(spec)
        if spec.dtype not in _SUFFIX:
            raise TypeError(f"backend='cpu' supports float32 and float64, got {spec.dtype}")
        dll = load()
        sfx = _SUFFIX[spec.dtype]
        self._fwd = getattr(dll, f"at_forward_step_{sfx}")
        self._fwd_n = getattr(dll, f"at_forward_steps_{sfx}")
        self._replay = getattr(dll, f"at_replay_step_{sfx}")
        self._bwd = getattr(dll, f"at_backward_step_{sfx}")
        self.B, self.W, self.K, self.dtype = spec.batch, spec.width, spec.k, spec.dtype
        self.F = spec.fan_out
        u8 = lambda x: x.to(torch.uint8).contiguous()  # noqa: E731
        i64 = lambda x: x.to(torch.int64).contiguous()  # noqa: E731
        self._keep = dict(source_slot=i64(spec.source_slot), slot_lo=i64(spec.slot_lo),
                          slot_hi=i64(spec.slot_hi), is_source=u8(spec.is_source),
                          is_input=u8(spec.is_input), sync=spec.sync.to(torch.int32).contiguous(),
                          theta=spec.theta.contiguous())
        c = self.ctx = Ctx()
        c.B, c.W, c.K, c.F = self.B, self.W, self.K, self.F
        c.n_slots = spec.n_slots
        c.out_lo, c.out_hi = spec.out_lo, spec.out_hi
        for name, t in self._keep.items():
            setattr(c, name, _ptr(t))
        c.policy_ms = int(spec.policy_ms)
        c.refractory, c.barrier = int(spec.refractory), int(spec.barrier)
        c.stop_output = c.eager_first = int(spec.stop_output)
        c.detach_reset = int(spec.detach_reset)
        c.input_random = int(spec.input_random)
        c.fill = int(spec.fill)
        c.noise, c.p_ref, c.p_net, c.alpha = spec.noise, spec.p_ref, spec.p_net, spec.alpha
        c.max_steps, c.steps_after_output = spec.max_steps, spec.steps_after_output
        c.seed = spec.seed
        self.ref = ctypes.byref(c)
        self._cur = torch.empty(self.W, dtype=self.dtype)
        self._cand = torch.empty(self.W, dtype=torch.int64)
        self._bound: dict = {}

    def bind_weights(self, wt: torch.Tensor) -> None:
        if wt.shape != (self.W, self.F) or wt.dtype != self.dtype or not wt.is_contiguous():
            raise ValueError(f"weight table must be contiguous {self.dtype} [{self.W}, {self.F}], "
                             f"got {wt.dtype} {tuple(wt.shape)}")
        self._bound["wt"] = wt
        self.ctx.wt = _ptr(wt)

    def bind_state(self, st) -> None:
        """Point at `st` (a `state.State` whose tensors this object may modify)."""
        for name in ("v", "o", "acc", "refr", "n_in"):
            t = getattr(st, name)
            assert t.is_contiguous(), name
            self._bound[name] = t
            setattr(self.ctx, name, _ptr(t))

    def bind_pass(self, p: PassTensors) -> None:
        """Point at a pass's bookkeeping: flags, counters, done flags and, when recorded,
        its int64 currents-to-spike histogram (added to in place)."""
        for name in ("pending", "pre_spike", "spike_sum", "steps", "first_out", "done"):
            t = getattr(p, name)
            assert t.is_contiguous(), name
            self._bound[name] = t
            setattr(self.ctx, name, _ptr(t))
        hist = p.hist
        self._bound["hist"] = hist
        self.ctx.hist_bins = 0 if hist is None else hist.numel()
        self.ctx.hist = None if hist is None else _ptr(hist)
        if self.ctx.fill:
            fl = p.fillable
            assert fl is not None and fl.is_contiguous() and fl.dtype == torch.bool, "fillable"
            self._bound["fillable"] = fl
            self.ctx.fillable = _ptr(fl)

    def forward_step(self, t: int, k: int):
        """One forward step of the bound state and pass. Returns (sel, sel_deliv int32
        [B, K], vals [B, K], out_fired bool [B], all_done)."""
        sel = torch.empty(self.B, self.K, dtype=torch.int32)
        sd = torch.empty(self.B, self.K, dtype=torch.int32)
        vals = torch.empty(self.B, self.K, dtype=self.dtype)
        fired = torch.empty(self.B, dtype=torch.bool)
        all_done = self._fwd(self.ref, t, k, _ptr(sel), _ptr(sd), _ptr(vals), _ptr(fired), _ptr(self._cur),
                             _ptr(self._cand))
        return sel, sd, vals, fired, bool(all_done)

    def forward_steps(self, t: int, k0: int, n_max: int):
        """Up to `n_max` forward steps (k0, k0 + 1, ...), stopping after the step that
        leaves every sample done (the caller checks that one is not done first).
        Returns (sel, sel_deliv int32 [n, B, K], vals [n, B, K], out_fired bool [n, B])."""
        sel = torch.empty(n_max, self.B, self.K, dtype=torch.int32)
        sd = torch.empty(n_max, self.B, self.K, dtype=torch.int32)
        vals = torch.empty(n_max, self.B, self.K, dtype=self.dtype)
        fired = torch.empty(n_max, self.B, dtype=torch.bool)
        n = self._fwd_n(self.ref, t, k0, n_max, _ptr(sel), _ptr(sd), _ptr(vals), _ptr(fired), _ptr(self._cur),
                        _ptr(self._cand))
        if 2 * n <= n_max:  # do not keep the unused tail alive through the views
            return sel[:n].clone(), sd[:n].clone(), vals[:n].clone(), fired[:n].clone()
        return sel[:n], sd[:n], vals[:n], fired[:n]

    def forward_batch(self, t: int, k0: int, n_max: int):
        """`forward_steps` and whether every sample is done after them (the stop
        test: `host.read`)."""
        out = self.forward_steps(t, k0, n_max)
        return (*out, bool(host.read(self._bound["done"].all())))

    def replay_steps(self, t: int, step0: int, sel: torch.Tensor, sel_deliv: torch.Tensor) -> FusedRecord:
        """Replay n recorded consecutive steps (step0, step0 + 1, ...; sel, sel_deliv
        [n, B, K]) on the bound state. Returns their records (vals [n, B, K], v_pre
        [n, B, W] defined at the receivers: the sweep reads nothing else, flags
        [n, B, W]: `step_spec.FusedRecord`)."""
        n = sel.shape[0]
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        vals = torch.empty(n, self.B, self.K, dtype=self.dtype)
        v_pre = torch.empty(n, self.B, self.W, dtype=self.dtype)
        flags = torch.empty(n, self.B, self.W, dtype=torch.uint8)
        for i in range(n):
            self._replay(self.ref, t, step0 + i, _ptr(sel[i]), _ptr(sel_deliv[i]), _ptr(vals[i]), _ptr(v_pre[i]),
                         _ptr(flags[i]), _ptr(self._cur))
        return FusedRecord(vals, v_pre, flags)

    def backward_steps(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor,
                       g_v: torch.Tensor, g_o: torch.Tensor, g_acc: torch.Tensor,
                       grad_wt: torch.Tensor, armed: torch.Tensor | None = None) -> None:
        """The reverse of the n steps `rec` records (last first): updates g_v, g_o (and
        `armed`, bool [B, W], with surrogate_at="fire_or_last": the sweep of loop.py)
        and adds into grad_wt, in place."""
        for name, t in (("g_v", g_v), ("g_o", g_o), ("g_acc", g_acc), ("grad_wt", grad_wt)):
            if not t.is_contiguous() or t.dtype != self.dtype:
                raise ValueError(f"{name} must be contiguous {self.dtype}, got {t.dtype}")
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        arm = _armed_ptr(armed, (self.B, self.W))
        for i in reversed(range(sel.shape[0])):
            self._bwd(self.ref, _ptr(sel[i]), _ptr(sel_deliv[i]), _ptr(rec.vals[i]), _ptr(rec.v_pre[i]),
                      _ptr(rec.flags[i]), _ptr(g_v), _ptr(g_o), _ptr(g_acc), _ptr(grad_wt), _ptr(self._cur), arm)


def _armed_ptr(armed: torch.Tensor | None, shape: tuple[int, int]) -> int | None:
    """`armed` as the C steps read it (NULL: every evaluation's surrogate counts)."""
    if armed is None:
        return None
    if armed.dtype != torch.bool or tuple(armed.shape) != shape or not armed.is_contiguous():
        raise ValueError(f"armed must be a contiguous bool tensor {list(shape)}, got {armed.dtype} "
                         f"{tuple(armed.shape)}")
    return _ptr(armed)


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 and x.is_contiguous() else x.to(torch.int32).contiguous()
