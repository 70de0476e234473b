"""Fused forward steps on the GPU (fully connected networks): the `fused` steps of
the `triton` backend, the Triton twin of `cpu_step.CpuSteps`.

Same interface as `CpuSteps` (`step_spec.FusedSteps`: `bind_weights`, `bind_state`,
`bind_pass`, `forward_batch`, `replay_steps`, `backward_steps`; records are
`step_spec.FusedRecord`; also `forward_step`, `forward_steps`) and the same
semantics as the C functions of `cpu_step.c`: the same counter hash, packed keys (SPEC 6: ties to the lower index),
slot order (highest key first) and float operations in the same order (launched
with ``enable_fp_fusion=False``: no FMA contraction, as the C is built with
``-ffp-contract=off``). Selections, spikes and potentials are therefore those of
the C steps, bit for bit in the interpreter (the backward's fp32 surrogate divides
with the GPU's ``div.full``, within 2 ulp of IEEE: gradients match to tolerance).

Design: one program per sample (grid ``(B,)``), state in global memory. The kernels:
kernels/steps_forward.py (`_forward_kernel`), kernels/steps_backward.py
(`_replay_kernel`, `_backward_kernel`), their shared step helpers (`_evaluate`)
kernels/steps_eval.py; this module holds the host side (`TritonSteps`).
- `_forward_kernel` is persistent: it runs up to `n_max` forward steps of its own
  sample in one launch (select, network dropout, deliver, LIF, refractoriness,
  bookkeeping, stop condition), writing step i's rows of the [n_max, B, K]
  selection buffers; a sample that is done writes dump rows. The host reads one
  number per launch (the most steps any sample took), so a pass of S steps costs
  about S / n_max launches instead of ~10 kernels per step.
- Selection never sorts the row: the mapped keys of the pending entries go to a
  scratch row (`select_keyed._row_keys`, `select_keyed._fill_keys`: the key math
  of the per-op keyed select too), a radix search over their 32 bits finds the K-th largest (as
  kernels/select.py), one pass takes the entries above it plus the lowest-index
  ties, and only those K are sorted (`tl.sort`, K rounded up to a power of two).
- No atomics in the forward: a sample's currents reach only its own row, and the
  program owning the row adds the K fan-out rows one after the other (vectorised
  over the receiving columns, current kept in registers per column block), so the
  sums are in the C order and reproducible.
- The backward's weight-table gradient is shared by all samples: `atomic_add`,
  so the order of the additions across samples (hence the last bits of grad_wt)
  can change from run to run, as in kernels/deliver.py; within a sample the
  dot products are block reductions (another order than the C's sequential sums:
  gradients match to fp tolerance, not bitwise).

Phases of a step exchange data through global memory between threads of one
program (a selection written, then read as scalars; outboxes zeroed in the K
layout, then read in the row layout), separated by `tl.debug_barrier()`. The
interpreter runs a program sequentially, so it checks the arithmetic and the
control flow, not the barriers, the atomics' races or register pressure (the
compile-only test checks that sm_90 / sm_80 builds do not spill). Limits: K up to
`_K_MAX` (the sort holds next_pow2(K) keys in registers); float32 and float64.
Tests: tests/test_steps_triton.py.
"""

from __future__ import annotations

import torch

from . import host, rng
from ._triton import check_tensors, hash_arg, triton
from .cpu_step import _int32
from .lif import surrogate_constants
from .step_spec import FusedRecord, OneStep, PassTensors, StepSpec, as_spec
from .steps_backward import _backward_kernel, _replay_kernel
from .steps_forward import _forward_kernel

_SUFFIX = (torch.float32, torch.float64)
_K_MAX = 4096


def _config(width: int, dtype: torch.dtype = torch.float32, forward: bool = True) -> dict:
    """Row block, radix digit and warps. Rows are streamed in blocks (the state of a
    whole network does not fit registers); the radix count compares a block with all
    2**DIGIT_BITS digits at once, kept at <= 8192 values: 512 x 16, or 32 x 256 for
    narrow rows (4 rounds instead of 8). Warps: the spill-free choices of ptxas
    (CUDA 13, sm_90 / sm_80; it puts 8-48 byte stack frames erratically elsewhere):
    forward 4 warps in fp32 (<= 168 registers), 8 in fp64; replay and backward 8,
    with ``maxnreg`` 128 (the persistent replay and backward, a loop over the run's
    steps: left to choose, ptxas took 32-40 registers and an 8-24 byte stack frame;
    with the bound, 53-80 registers and none: tests/test_steps_triton.py)."""
    block = min(512, max(32, triton.next_power_of_2(width)))
    warps = 4 if forward and dtype == torch.float32 else 8
    cfg = dict(BLOCK=block, num_warps=warps)
    if forward:
        cfg["DIGIT_BITS"] = 8 if block <= 32 else 4
    else:
        cfg["maxnreg"] = 128
    return cfg


# --- host ---------------------------------------------------------------------------------
def _partial_hash(seed: int, stream: int, t: int) -> int:
    """`rng.counter_hash` before its last round (the forward step, mixed in-kernel)."""
    h = rng._fmix32_int(seed ^ rng._GOLDEN)
    for c in (stream, t):
        h = rng._fmix32_int(h ^ ((c * rng._GOLDEN) & rng._MASK32))
    return h


def _armed_u8(armed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """`armed` (bool [B, W], updated in place) as the kernel reads and writes it."""
    if armed.dtype != torch.bool or tuple(armed.shape) != shape or not armed.is_contiguous():
        raise ValueError(f"armed must be a contiguous bool tensor {list(shape)}, got {armed.dtype} "
                         f"{tuple(armed.shape)}")
    return armed.view(torch.uint8)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


class TritonSteps(OneStep):
    """The fused steps of one engine call on the engine's device (CUDA, or CPU
    tensors under TRITON_INTERPRET=1). State tensors are bound as in `CpuSteps` and
    updated in place; scratch rows ([B, W] keys, [B, next_pow2(K)] candidates) are
    this object's."""

    fills_slots = True  # fill_slots: bind_pass takes the pass's fill candidates
    records_histogram = False  # record_currents=True runs the per-op kernels

    @staticmethod
    def unsupported(spec: StepSpec) -> str | None:
        """Why these steps cannot run `spec` (None: they can)."""
        if spec.dtype not in _SUFFIX:
            return f"the fused Triton steps take float32 and float64, not {spec.dtype}"
        if spec.k > _K_MAX:
            return f"the fused Triton steps take K <= {_K_MAX}, not {spec.k}"
        return None

    def __init__(self, spec) -> None:
        """`spec`: a `step_spec.StepSpec` (or an engine, through its ``step_spec()``)."""
        spec = as_spec(spec)
        if spec.dtype not in _SUFFIX:
            raise TypeError(f"backend='triton' fused steps support float32 and float64, got {spec.dtype}")
        if spec.k > _K_MAX:
            raise ValueError(f"backend='triton' fused steps support K <= {_K_MAX}, got {spec.k}")
        dev = self.device = spec.device
        self.B, self.W, self.K, self.dtype = spec.batch, spec.width, spec.k, spec.dtype
        self.F = spec.fan_out
        u8 = lambda x: x.to(device=dev, dtype=torch.uint8).contiguous()  # noqa: E731
        i64 = lambda x: x.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
        self._tables = dict(source_slot=i64(spec.source_slot), slot_lo=i64(spec.slot_lo),
                            slot_hi=i64(spec.slot_hi), is_source=u8(spec.is_source), is_input=u8(spec.is_input),
                            sync=spec.sync.to(device=dev, dtype=torch.int32).contiguous(),
                            theta=spec.theta.to(dev).contiguous())
        self.n_slots = spec.n_slots
        self.out_lo, self.out_hi = spec.out_lo, spec.out_hi
        self.policy_ms = spec.policy_ms
        self.input_random = spec.input_random
        self.fill = spec.fill
        self.refractory, self.barrier = spec.refractory, spec.barrier
        self.stop_output = spec.stop_output
        self.detach_reset = spec.detach_reset
        self.noise, self.p_ref, self.p_net = spec.noise, spec.p_ref, spec.p_net
        self.max_steps, self.steps_after_output = spec.max_steps, spec.steps_after_output
        self.seed = spec.seed
        self.KB = max(2, triton.next_power_of_2(self.K))
        self.NS = max(2, triton.next_power_of_2(self.n_slots))
        self._fwd_cfg = _config(self.W, self.dtype, forward=True)
        self._step_cfg = _config(self.W, self.dtype, forward=False)
        self._const = surrogate_constants(spec.alpha, self.dtype, dev)  # no host tensor (a sync on CUDA)
        self._keys = torch.empty(self.B, self.W, dtype=torch.int64, device=dev)
        self._cand = torch.empty(self.B, self.KB, dtype=torch.int64, device=dev)
        self._bound: dict = {}

    def _launch_opts(self, forward: bool = False) -> dict:
        return dict(self._fwd_cfg if forward else self._step_cfg, enable_fp_fusion=False)

    def bind_weights(self, wt: torch.Tensor) -> None:
        if wt.shape != (self.W, self.F) or wt.dtype != self.dtype or not wt.is_contiguous():
            raise ValueError(f"weight table must be contiguous {self.dtype} [{self.W}, {self.F}], "
                             f"got {wt.dtype} {tuple(wt.shape)}")
        check_tensors("TritonSteps", _forward_kernel, wt=wt, theta=self._tables["theta"])
        self._bound["wt"] = wt

    def bind_state(self, st) -> None:
        """Point at `st` (a `state.State` whose tensors this object may modify)."""
        for name in ("v", "o", "acc", "refr", "n_in"):
            t = getattr(st, name)
            assert t.is_contiguous(), name
            self._bound[name] = _u8(t)

    def bind_pass(self, p: PassTensors) -> None:
        """Point at a pass's bookkeeping: flags, counters and done flags. No
        currents-to-spike histogram here (`records_histogram` is False)."""
        if p.hist is not None:
            raise NotImplementedError("the fused Triton steps do not record the currents-to-spike "
                                      "histogram; the engine runs the per-op kernels for it")
        for name in ("pending", "pre_spike", "spike_sum", "steps", "first_out", "done"):
            t = getattr(p, name)
            assert t.is_contiguous(), name
            self._bound[name] = _u8(t)
        if self.fill:
            assert p.fillable is not None and p.fillable.is_contiguous(), "fillable"
            self._bound["fillable"] = _u8(p.fillable)

    def forward_step(self, t: int, k: int):
        """One forward step of the bound state and pass. Returns (sel, sel_deliv int32
        [B, K], vals [B, K], out_fired bool [B], all_done)."""
        sel, sd, vals, fired, all_done = self.forward_batch(t, k, 1)
        return sel[0], sd[0], vals[0], fired[0], all_done

    def forward_steps(self, t: int, k0: int, n_max: int):
        """Up to `n_max` forward steps (k0, k0 + 1, ...) in one launch, stopping after
        the step that leaves every sample done (the caller checks that one is not
        done first). Returns (sel, sel_deliv int32 [n, B, K], vals [n, B, K],
        out_fired bool [n, B])."""
        return self.forward_batch(t, k0, n_max)[:4]

    def forward_batch(self, t: int, k0: int, n_max: int):
        """`forward_steps` and whether every sample is done after them: one host read
        per launch (`host.read`: the steps taken and the done flags together)."""
        B, K, dev, s = self.B, self.K, self.device, self._bound
        sel = torch.empty(n_max, B, K, dtype=torch.int32, device=dev)
        sd = torch.empty(n_max, B, K, dtype=torch.int32, device=dev)
        vals = torch.empty(n_max, B, K, dtype=self.dtype, device=dev)
        fired = torch.empty(n_max, B, dtype=torch.bool, device=dev)
        taken = torch.zeros(B, dtype=torch.int32, device=dev)
        tb = self._tables
        h = [_partial_hash(self.seed, stream, t) for stream in
             (rng.STREAM_MOMENTUM_NOISE if self.policy_ms else rng.STREAM_RS_KEY,
              rng.STREAM_NETWORK_DROPOUT, rng.STREAM_REFRACTORY_DROPOUT)]
        _forward_kernel[(B,)](
            tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["is_input"], tb["sync"],
            tb["theta"], s["wt"], s["v"], s["o"], s["acc"], s["refr"], s["n_in"],
            s["pending"], s["pre_spike"], s["spike_sum"], s["steps"], s["first_out"], s["done"],
            sel, sd, vals, fired.view(torch.uint8), taken, self._keys, self._cand,
            s["fillable"] if self.fill else s["pending"],  # the latter never read (FILL off)
            B, self.W, K, self.F, self.n_slots, self.out_lo, self.out_hi, k0, n_max, *map(hash_arg, h),
            hash_arg(rng.counter_hash(self.seed, rng.STREAM_INPUT_ORDER, t, 0)),
            hash_arg(_partial_hash(self.seed, rng.STREAM_FILL, t)),
            float(self.noise), float(self.p_ref), float(self.p_net), self.max_steps, self.steps_after_output,
            POLICY_MS=self.policy_ms, HAS_NOISE=self.noise > 0, INPUT_RANDOM=self.input_random,
            FILL=self.fill, HAS_PNET=self.p_net > 0,
            REFRACTORY=self.refractory, HAS_PREF=self.p_ref > 0, BARRIER=self.barrier,
            STOP_OUTPUT=self.stop_output, KB=self.KB, NS=self.NS, **self._launch_opts(forward=True))
        n, all_done = host.read(torch.stack([taken.max().to(torch.int64),
                                             self._bound["done"].view(torch.bool).all().to(torch.int64)]))
        n = max(1, n)
        if 2 * n <= n_max:  # do not keep the unused tail alive through the views
            return sel[:n].clone(), sd[:n].clone(), vals[:n].clone(), fired[:n].clone(), bool(all_done)
        return sel[:n], sd[:n], vals[:n], fired[:n], bool(all_done)

    def replay_steps(self, t: int, step0: int, sel: torch.Tensor, sel_deliv: torch.Tensor) -> FusedRecord:
        """Replay n recorded consecutive steps (step0, step0 + 1, ...; sel, sel_deliv
        [n, B, K]) on the bound state, in one launch. Returns their records (vals
        [n, B, K], v_pre [n, B, W] defined at the receivers only, flags [n, B, W]:
        `step_spec.FusedRecord`)."""
        n, B, W, K, dev, s, tb = sel.shape[0], self.B, self.W, self.K, self.device, self._bound, self._tables
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        vals = torch.empty(n, B, K, dtype=self.dtype, device=dev)
        v_pre = torch.empty(n, B, W, dtype=self.dtype, device=dev)
        flags = torch.empty(n, B, W, dtype=torch.uint8, device=dev)
        if n:
            _replay_kernel[(B,)](
                tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["sync"], tb["theta"], s["wt"],
                s["v"], s["o"], s["acc"], s["refr"], s["n_in"], sel, sel_deliv, vals, v_pre, flags,
                B, W, K, self.F, self.n_slots, self.out_lo, self.out_hi, step0, n,
                hash_arg(_partial_hash(self.seed, rng.STREAM_REFRACTORY_DROPOUT, t)), float(self.p_ref),
                REFRACTORY=self.refractory, HAS_PREF=self.p_ref > 0, KB=self.KB, NS=self.NS,
                **self._launch_opts())
        return FusedRecord(vals, v_pre, flags)

    def backward_steps(self, rec: FusedRecord, sel: torch.Tensor, sel_deliv: torch.Tensor,
                       g_v: torch.Tensor, g_o: torch.Tensor, g_acc: torch.Tensor,
                       grad_wt: torch.Tensor, armed: torch.Tensor | None = None) -> None:
        """The reverse of the n steps `rec` records (last first), in one launch: updates
        g_v, g_o (and `armed`, bool [B, W], with surrogate_at="fire_or_last": the sweep
        of loop.py) and adds into grad_wt (float atomics across samples), in place."""
        for name, t in (("g_v", g_v), ("g_o", g_o), ("g_acc", g_acc), ("grad_wt", grad_wt)):
            if not t.is_contiguous() or t.dtype != self.dtype:
                raise ValueError(f"{name} must be contiguous {self.dtype}, got {t.dtype}")
        n, tb = sel.shape[0], self._tables
        sel, sel_deliv = _int32(sel), _int32(sel_deliv)
        if n:
            _backward_kernel[(self.B,)](
                tb["source_slot"], tb["slot_lo"], tb["slot_hi"], tb["is_source"], tb["theta"], self._bound["wt"],
                self._const, sel, sel_deliv, rec.vals, rec.v_pre, rec.flags, g_v, g_o, g_acc, grad_wt,
                rec.flags if armed is None else _armed_u8(armed, (self.B, self.W)),  # never written without ARMED
                self.B, self.W, self.K, self.F, self.n_slots, self.out_lo, self.out_hi, n,
                DETACH_RESET=self.detach_reset, KB=self.KB, NS=self.NS, ARMED=armed is not None,
                **self._launch_opts())
