"""The fused Triton steps (kernels/steps_triton.py) against their twin, the fused C
steps (kernels/cpu_step.py), on the same engine state.

Where the tests run: as in tests/test_kernels_triton.py (tests/interpreter_child.py),
every test here except ``test_compile_*`` and ``test_cuda_*`` runs with the kernels
interpreted (CPU tensors). ``test_cuda_*`` compare the compiled kernels on a GPU with
the C steps and skip with the reason when there is none.

Comparison rules:
- forward steps: selections, delivered selections, delivered values, output flags,
  spikes, pending flags, step counts, first output steps and done flags exact; the
  potentials, outboxes, accumulators and pre-spike potentials exact as well (the
  kernel adds the K rows in the C's order with the C's operations; the interpreter
  evaluates them in IEEE arithmetic like the C build without FMA);
- replay: the record exact (vals, flags; v_pre at the receivers) and the state after,
  for single steps and for a run of steps (one launch);
- backward: adjoints and grad_wt within `TOL` (the kernel's dot products are block
  reductions, the C's sequential sums);
- whole model (AsyncSNN, backend="triton" vs "cpu"): output counts and stats exact,
  potentials and weight gradients within `TOL`.
The compile-only tests build the three kernels for sm_90 and sm_80 (fp32; fp64 on
sm_90) and check that the cubins use no local memory (no spills).
"""

from __future__ import annotations

import copy

import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain import AsyncSNN, SimConfig, backends  # noqa: E402
from asynctrain.engine import Engine  # noqa: E402
from asynctrain.passes import Pass  # noqa: E402
from asynctrain.state import State  # noqa: E402
from asynctrain.kernels import steps_triton  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402
from asynctrain.kernels.cpu_step import CpuSteps  # noqa: E402
from asynctrain.kernels.steps_backward import _backward_kernel, _replay_kernel  # noqa: E402
from asynctrain.kernels.steps_triton import TritonSteps  # noqa: E402
from asynctrain.network import Network  # noqa: E402
from conftest import BASE, STAT_KEYS, TOL, make_frames, make_net  # noqa: E402

F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")
INTERPRETED = is_interpreted(steps_triton._forward_kernel)
SIZES = [10, 8, 7, 4]




# --- engine states --------------------------------------------------------------------------
def _engine(cfg: SimConfig, dtype, batch: int, training: bool, seed: int = 123):
    net = make_net(SIZES, dtype=dtype)
    graph = Network.from_module(net)
    eng = Engine(graph, cfg, batch=batch, device=CPU, dtype=dtype, training=training, seed=seed,
                 ops=backends.CPU)
    wt = graph.weight_table([m.weight.detach() for m in net]).contiguous()
    return eng, wt


def _state(eng: Engine, seed: int, p_pending: float = 0.5):
    """A mid-pass state: pending outboxes holding 1 or 2 spikes, potentials around 0,
    a few refractory neurons, received counts 0..2, pre-spike potentials with ties."""
    B, W, dt = eng.batch, eng.width, eng.dtype
    g = torch.Generator().manual_seed(seed)
    pending = (torch.rand(B, W, generator=g) < p_pending) & eng.tables.is_source
    o = pending.to(dt) * torch.randint(1, 3, (B, W), generator=g).to(dt)
    v = (torch.randn(B, W, generator=g, dtype=F64) * 0.2).to(dt)
    st = State(v, o, torch.zeros(B, eng.net.n_outputs, dtype=dt), torch.rand(B, W, generator=g) < 0.1,
               torch.randint(0, 3, (B, W), generator=g, dtype=torch.int32))
    ps = Pass(B, W, dt, CPU, pending, eager_first=eng.cfg.stop == "output")
    ps.pre_spike = torch.randint(0, 3, (B, W), generator=g).to(dt) * 0.25
    if eng.fill:  # fill_slots: outboxes holding gradient, some of them pending
        ps.fillable = (torch.rand(B, W, generator=g) < 0.5) & eng.tables.is_hidden
    return st, ps


def _forward(cls, eng, wt, st, ps, t, k0, n_max, steps0=None):
    """Run `cls`'s forward_steps on copies; returns (outputs, state, pass, done)."""
    st = st.clone()
    p = Pass(eng.batch, eng.width, eng.dtype, CPU, ps.pending.clone(), ps.eager_first)
    p.pre_spike = ps.pre_spike.clone()
    if ps.fillable is not None:
        p.fillable = ps.fillable.clone()
    if steps0 is not None:
        p.steps += steps0
    done = p.done(eng.cfg).contiguous()
    f = cls(eng)
    f.bind_weights(wt)
    f.bind_state(st)
    f.bind_pass(p.tensors(done))
    return f.forward_steps(t, k0, n_max), st, p, done


def _assert_forward_equal(a, b):
    names = ("sel", "sel_deliv", "vals", "out_fired")
    assert a[0][0].shape == b[0][0].shape, f"steps taken: C {a[0][0].shape[0]}, Triton {b[0][0].shape[0]}"
    for n, x, y in zip(names, a[0], b[0]):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{n}:\n{x}\nvs\n{y}"
    for n in ("v", "o", "acc", "refr", "n_in"):
        assert torch.equal(getattr(a[1], n), getattr(b[1], n)), n
    for n in ("pending", "pre_spike", "spike_sum", "steps", "first_out", "fillable"):
        assert (getattr(a[2], n) is None and getattr(b[2], n) is None) or \
            torch.equal(getattr(a[2], n), getattr(b[2], n)), n
    assert torch.equal(a[3], b[3]), "done"


FORWARD = {
    "MS-K1": (dict(policy="MS", forward_group_size=1), {}),
    "MS-K3-index-order": (dict(policy="MS", forward_group_size=3, input_order="index"), {}),
    "MS-K3-ties-noise": (dict(policy="MS", forward_group_size=3, momentum_noise=0.1), {}),
    "MS-K40-more-than-pending": (dict(policy="MS", forward_group_size=40), {}),
    "RS-K3": (dict(policy="RS", forward_group_size=3), {}),
    "RS-dropouts": (dict(policy="RS", forward_group_size=2, network_dropout=0.3, refractory_dropout=0.5), {}),
    "MS-barrier-sync": (dict(policy="MS", forward_group_size=2, barrier_messages=True, sync_threshold=3), {}),
    "MS-stop-output": (dict(policy="MS", forward_group_size=2, stop="output", steps_after_output=1), {}),
    "RS-max-steps": (dict(policy="RS", forward_group_size=1, max_steps=6), dict(steps0=[0, 3, 5])),
    "MS-nothing-pending": (dict(policy="MS", forward_group_size=2), dict(p_pending=0.0)),
    "MS-n-max-short": (dict(policy="MS", forward_group_size=1, refractory=False), dict(n_max=3)),
    "MS-fill-K5": (dict(policy="MS", forward_group_size=5, fill_slots=True), {}),
    "RS-fill-K40-dropout": (dict(policy="RS", forward_group_size=40, fill_slots=True, network_dropout=0.3), {}),
}


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(FORWARD))
def test_forward_steps_match_c(name, dtype):
    if dtype == F64 and name not in ("MS-K3-ties-noise", "RS-dropouts", "MS-barrier-sync", "MS-fill-K5"):
        pytest.skip("fp64: three configurations (the kernels are dtype-generic)")
    kw, opt = FORWARD[name]
    cfg = SimConfig(**{**BASE, **kw})
    training = any(x in kw for x in ("momentum_noise", "network_dropout", "refractory_dropout", "fill_slots"))
    eng, wt = _engine(cfg, dtype, batch=3, training=training)
    st, ps = _state(eng, seed=2, p_pending=opt.get("p_pending", 0.5))
    steps0 = torch.tensor(opt["steps0"]) if "steps0" in opt else None
    n_max = opt.get("n_max", 64)
    a, b = (_forward(cls, eng, wt, st, ps, 2, 1, n_max, steps0) for cls in (CpuSteps, TritonSteps))
    _assert_forward_equal(a, b)
    n = a[0][0].shape[0]
    if name == "MS-nothing-pending":
        assert n == 1 and (a[0][0] == eng.width - 1).all()
    elif name == "MS-n-max-short":
        assert n == 3 and not a[3].all(), "n_max must cut the batch short"
    else:
        assert n > 1 and a[3].all() and a[2].spike_sum.sum() > 0, "vacuous"
    if "fill" in name:
        assert (a[0][0] < 0).any(), "vacuous: no filler"
    if name == "RS-max-steps":
        assert (a[2].steps <= 6).all() and (a[2].steps == 6).any()
    if name == "MS-stop-output":
        assert (a[2].first_out >= 0).any()


def test_forward_step_reports_all_done():
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2)
    eng, wt = _engine(cfg, F32, batch=2, training=False)
    st, ps = _state(eng, seed=4)
    done = ps.done(cfg).contiguous()
    f = TritonSteps(eng)
    f.bind_weights(wt)
    f.bind_state(st)
    f.bind_pass(ps.tensors(done))
    flags = []
    for k in range(1, 200):
        sel, sd, vals, fired, all_done = f.forward_step(0, k)
        assert sel.shape == (2, 2) and vals.shape == (2, 2) and fired.shape == (2,)
        flags.append(all_done)
        if all_done:
            break
    assert flags[-1] and not any(flags[:-1]) and len(flags) > 2 and bool(done.all())


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("armed", [False, True], ids=["", "armed"])
@pytest.mark.parametrize("name", ["MS-refr-dropout", "RS-net-dropout-detach", "MS-fill-K6"])
def test_replay_and_backward_match_c(name, dtype, armed):
    """`armed` (surrogate_at="fire_or_last"): the backward reads and updates the
    window flags in place, the same on both."""
    kw = {"MS-refr-dropout": dict(policy="MS", forward_group_size=3, refractory_dropout=0.5),
          "RS-net-dropout-detach": dict(policy="RS", forward_group_size=2, network_dropout=0.3, detach_reset=True),
          "MS-fill-K6": dict(policy="MS", forward_group_size=6, fill_slots=True, network_dropout=0.2)}[name]
    cfg = SimConfig(**{**BASE, **kw})
    eng, wt = _engine(cfg, dtype, batch=3, training=True)
    st0, ps = _state(eng, seed=5)
    (sel, sd, _, _), _, _, _ = _forward(CpuSteps, eng, wt, st0, ps, 1, 1, 6)
    assert sel.shape[0] >= 4, "vacuous: too few steps for a run"
    assert "fill" not in name or (sel < 0).any(), "vacuous: no filler"
    B, W = eng.batch, eng.width
    g = torch.Generator().manual_seed(9)
    adj = [torch.randn(B, W, generator=g, dtype=F64).to(dtype) for _ in range(2)]
    g_acc = torch.randn(B, eng.net.n_outputs, generator=g, dtype=F64).to(dtype)
    armed0 = torch.rand(B, W, generator=g) < 0.5 if armed else None
    results = []
    for cls in (CpuSteps, TritonSteps):
        st = st0.clone()
        f = cls(eng)
        f.bind_weights(wt)
        f.bind_state(st)
        # the first two steps one at a time, the rest as one run (the Triton steps: one launch)
        recs = [f.replay_step(1, 1 + i, sel[i], sd[i]) for i in range(2)] + [f.replay_steps(1, 3, sel[2:], sd[2:])]
        g_v, g_o = adj[0].clone(), adj[1].clone()
        arm = None if armed0 is None else armed0.clone()
        grad_wt = torch.zeros_like(wt)
        f.backward_steps(recs[2], sel[2:], sd[2:], g_v, g_o, g_acc, grad_wt, arm)
        for i in reversed(range(2)):
            f.backward_step(recs[i], sel[i], sd[i], g_v, g_o, g_acc, grad_wt, arm)
        results.append((st, recs, g_v, g_o, grad_wt, arm))
    (st_c, rec_c, gv_c, go_c, gw_c, arm_c), (st_t, rec_t, gv_t, go_t, gw_t, arm_t) = results
    if armed:
        assert torch.equal(arm_c, arm_t) and not torch.equal(arm_c, armed0), "armed"
    for n in ("v", "o", "acc", "refr", "n_in"):
        assert torch.equal(getattr(st_c, n), getattr(st_t, n)), n
    assert [r.vals.shape[0] for r in rec_t] == [1, 1, sel.shape[0] - 2]
    for rc, rt in zip(rec_c, rec_t):
        assert torch.equal(rc.vals, rt.vals) and torch.equal(rc.flags, rt.flags), "record"
        for i in range(rc.flags.shape[0]):
            recv = rc.masks(i)[1]  # v_pre is defined at the receivers only
            assert torch.equal(rc.v_pre[i][recv], rt.v_pre[i][recv]), "v_pre"
    assert recv.any() and gw_c.abs().sum() > 0, "vacuous"
    for what, x, y in (("g_v", gv_c, gv_t), ("g_o", go_c, go_t), ("grad_wt", gw_c, gw_t)):
        torch.testing.assert_close(y, x, **TOL[dtype], msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("surrogate_at", ["every", "fire_or_last"])
@pytest.mark.parametrize("fill", [False, True], ids=["", "fill"])
@pytest.mark.parametrize("policy", ["MS", "RS"])
def test_model_triton_matches_cpu(policy, fill, surrogate_at):
    """AsyncSNN on backend='triton' (the fused Triton steps, interpreted) against
    backend='cpu' (the fused C steps): counts and stats exact, gradients close.
    (backend='cpu' against the dense oracle: tests/test_surrogate_at.py.)"""
    assert backends.triton_ops(False).fused is TritonSteps
    kw = dict(policy="MS", forward_group_size=3, momentum_noise=0.1, refractory_dropout=0.5) \
        if policy == "MS" else dict(policy="RS", forward_group_size=2, network_dropout=0.2)
    cfg = SimConfig(**{**BASE, **kw}, fill_slots=fill, surrogate_at=surrogate_at)
    net = make_net(SIZES)
    frames = make_frames(2, 3, SIZES[0])
    w = torch.randn(2, 3, SIZES[-1], generator=torch.Generator().manual_seed(3))
    res = []
    for backend in ("cpu", "triton"):
        snn = AsyncSNN(net, cfg, backend=backend).train()
        out = snn(frames, seed=7)
        (out * w).sum().backward()
        res.append((out.detach(), snn.stats, [m.weight.grad.clone() for m in net]))
        net.zero_grad()
    (out_c, st_c, g_c), (out_t, st_t, g_t) = res
    assert torch.equal(out_c, out_t)
    for k in STAT_KEYS:
        assert torch.equal(st_c[k], st_t[k]), k
    torch.testing.assert_close(st_t["final_v"], st_c["final_v"], **TOL[F32])
    for x, y in zip(g_c, g_t):
        torch.testing.assert_close(y, x, **TOL[F32])
    assert st_c["forward_steps"].max() > 3 and sum(float(g.abs().sum()) for g in g_c) > 0, "vacuous"


def test_fused_backward_launches_once_per_run():
    """The backward of the fused steps replays and sweeps each run of consecutive event
    steps (one pass's steps within one checkpoint segment) in one launch of each
    kernel, where it launched both kernels per step: launches counted as a GPU would
    see them (tests/specialization.py), runs from the steps replayed. Long passes
    (K = 1) in one segment: at most one launch per 8 backward steps in all."""
    from asynctrain import fused
    from specialization import record_variants

    replayed = []
    replay = fused.FusedMode.replay

    def counting(self, op):
        replayed.append((op.t, op.step))
        return replay(self, op)

    cfg = SimConfig(**{**BASE, "policy": "RS", "forward_group_size": 1})
    net = make_net(SIZES)
    fused.FusedMode.replay = counting
    try:
        with record_variants({"replay": _replay_kernel, "backward": _backward_kernel}) as seen:
            snn = AsyncSNN(net, cfg, backend="triton", checkpoint_every=10_000).train()
            snn(make_frames(2, 3, SIZES[0]), seed=7).sum().backward()
    finally:
        fused.FusedMode.replay = replay
    runs = 1 + sum((t, step) != (t0, step0 + 1) for (t0, step0), (t, step) in zip(replayed, replayed[1:]))
    assert len(replayed) >= 16 * runs, f"vacuous: {len(replayed)} steps in {runs} runs"
    assert seen.launches["replay"] == seen.launches["backward"] == runs, dict(seen.launches)
    assert 8 * (seen.launches["replay"] + seen.launches["backward"]) <= len(replayed)


# --- compile-only (no GPU needed) -----------------------------------------------------------
def _sig(kernel, fp: str) -> dict:
    """Signature of `kernel` as the launcher calls it: float tensors `fp`, masks u8,
    sizes i32, hashes i64 (constexprs are overridden by the caller)."""
    ints = dict(source_slot_ptr="*i64", slot_lo_ptr="*i64", slot_hi_ptr="*i64", is_source_ptr="*u8",
                is_input_ptr="*u8", sync_ptr="*i32", refr_ptr="*u8", n_in_ptr="*i32", pend_ptr="*u8",
                steps_ptr="*i64", first_ptr="*i64", done_ptr="*u8", sel_ptr="*i32", sd_ptr="*i32",
                fired_ptr="*u8", taken_ptr="*i32", keys_ptr="*i64", cand_ptr="*i64",
                flags_ptr="*u8", fill_ptr="*u8", armed_ptr="*u8", h_key_t="i64", h_order="i64",
                h_fill_t="i64", h_drop_t="i64", h_ref_t="i64",
                noise="fp32", p_ref="fp32", p_net="fp32")
    sig = {}
    for name in kernel.arg_names:
        if name in ints:
            sig[name] = ints[name]
        elif name.endswith("_ptr"):
            sig[name] = f"*{fp}"
        else:
            sig[name] = "i32"
    return sig


_FLAGS = dict(POLICY_MS=True, HAS_NOISE=True, INPUT_RANDOM=True, FILL=False, HAS_PNET=True, REFRACTORY=True,
              HAS_PREF=True, BARRIER=True, STOP_OUTPUT=True)
_C = steps_triton._config
COMPILE = {  # case -> (kernel, dtype, constexprs and warps as the launcher picks them)
    "forward_ms_k8_w755": ("_forward_kernel", dict(_FLAGS, KB=8, NS=8)),
    "forward_rs_k512_w20000": ("_forward_kernel", dict(_FLAGS, POLICY_MS=False, KB=512, NS=8)),
    "forward_k1_w40": ("_forward_kernel", dict(_FLAGS, KB=2, NS=4)),
    "forward_fill_ms_k8_w755": ("_forward_kernel", dict(_FLAGS, FILL=True, KB=8, NS=8)),
    "forward_fill_rs_k512_w20000": ("_forward_kernel", dict(_FLAGS, FILL=True, POLICY_MS=False, KB=512, NS=8)),
    "replay_k8": ("_replay_kernel", dict(REFRACTORY=True, HAS_PREF=True, KB=8, NS=8)),
    "backward_k8": ("_backward_kernel", dict(DETACH_RESET=False, KB=8, NS=8, ARMED=False)),
    "backward_k512": ("_backward_kernel", dict(DETACH_RESET=True, KB=512, NS=8, ARMED=False)),
    "backward_armed_k8": ("_backward_kernel", dict(DETACH_RESET=False, KB=8, NS=8, ARMED=True)),
    "backward_armed_k512": ("_backward_kernel", dict(DETACH_RESET=True, KB=512, NS=8, ARMED=True)),
}
_WIDTH = {"forward_ms_k8_w755": 755, "forward_fill_ms_k8_w755": 755, "forward_fill_rs_k512_w20000": 20000,
          "forward_rs_k512_w20000": 20000, "forward_k1_w40": 40}
# fp64 on sm_90: the three kernels at the shape of the shd-like network (W = 755, K = 8).
# fp64 with fill_slots: the filler search (a second radix select in the step) leaves
# a 16-byte stack frame on sm_90 at the 128 registers ptxas allots; a known cost,
# checked to stay (strict: the mark fails once it compiles spill-free).
_FP64_FILL = pytest.param("forward_fill_ms_k8_w755", "sm90", "fp64", marks=pytest.mark.xfail(
    strict=True, reason="fp64 forward with fill_slots: 16-byte stack frame on sm_90"))
_PARAMS = [(c, a, "fp32") for c in COMPILE for a in ("sm90", "sm80")] + \
          [(c, "sm90", "fp64") for c in ("forward_ms_k8_w755", "replay_k8", "backward_k8", "backward_armed_k8")] + \
          [_FP64_FILL]


@pytest.mark.parametrize("case,arch,fp", _PARAMS)
def test_compile_without_spills(case, arch, fp, tmp_path):
    import test_triton_compile as tc
    from triton.compiler import ASTSource

    if INTERPRETED:
        pytest.skip("the kernels are interpreted in this process; compiling needs JITFunctions")
    if tc._tool("ptxas") is None or tc._tool("cuobjdump") is None:
        pytest.skip("no ptxas / cuobjdump (Triton's bundled ones or on PATH)")
    name, consts = COMPILE[case]
    dtype = {"fp32": F32, "fp64": F64}[fp]
    consts = dict(consts, **_C(_WIDTH.get(case, 755), dtype, forward=name == "_forward_kernel"))
    warps = consts.pop("num_warps")
    limits = {"maxnreg": consts.pop("maxnreg")} if "maxnreg" in consts else {}
    kernel = getattr(steps_triton, name)
    sig = {n: ("constexpr" if n in consts else t) for n, t in _sig(kernel, fp).items()}
    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=tc.TARGETS[arch],
                        options=dict(num_warps=warps, enable_fp_fusion=False, **limits))
    path = tmp_path / f"{case}.cubin"
    path.write_bytes(ck.asm["cubin"])
    out = subprocess.run([tc._tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, out
    reg, stack, _, local = map(int, usage.groups())
    assert local == 0 and stack == 0, f"{case} ({arch}, {fp}): {reg} registers, spills:\n{out}"


wrap_tests(globals(), interpreted=INTERPRETED, keep=('test_compile', 'test_cuda'), timeout_s=900)


# --- on a GPU (make gpu-check runs these with -k cuda) --------------------------------------
@pytest.mark.parametrize("policy,k,fill", [("MS", 8, False), ("RS", 8, False), ("MS", 64, False),
                                           ("MS", 8, True), ("RS", 64, True)])
def test_cuda_model_fused_steps_match_cpu(policy, k, fill):
    """The compiled fused Triton steps (persistent forward, replay, backward with
    atomics) on CUDA tensors against backend='cpu' on a copy: counts and stats exact,
    potentials and weight gradients to fp32 tolerance. What the interpreter cannot
    check: the barriers between phases, the atomics' races."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if INTERPRETED:
        pytest.skip("Triton was imported with TRITON_INTERPRET=1: no compiled kernels in this process")
    cfg = SimConfig(**BASE, policy=policy, forward_group_size=k, momentum_noise=0.1, refractory_dropout=0.5,
                    network_dropout=0.1, fill_slots=fill)
    sizes = [350, 128, 128, 128, 20]
    net = make_net(sizes, scale=0.15, shift=0.02)
    frames = make_frames(6, 16, sizes[0], p=0.05)
    w = torch.randn(6, 16, sizes[-1], generator=torch.Generator().manual_seed(3))
    res = []
    for dev, backend in ((CPU, "cpu"), (torch.device("cuda"), "triton")):
        mnet = copy.deepcopy(net).to(dev)
        snn = AsyncSNN(mnet, cfg, backend=backend).train()
        out = snn(frames.to(dev), seed=7)
        (out * w.to(dev)).sum().backward()
        res.append((out.detach().cpu(), {key: v.cpu() for key, v in snn.stats.items()
                                         if isinstance(v, torch.Tensor)},
                    [m.weight.grad.cpu() for m in mnet]))
    (out_c, st_c, g_c), (out_t, st_t, g_t) = res
    assert st_c["forward_steps"].max() > 4, "vacuous: one step per layer"
    assert torch.equal(out_c, out_t)
    for key in STAT_KEYS:
        assert torch.equal(st_c[key], st_t[key]), key
    torch.testing.assert_close(st_t["final_v"], st_c["final_v"], **TOL[F32])
    for x, y in zip(g_c, g_t):
        torch.testing.assert_close(y, x, **TOL[F32])
