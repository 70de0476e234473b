"""Shared helpers for the engine tests: tiny random networks and inputs, one call of
the engine (`AsyncSNN`) and one of the dense oracle with the same weights, seed and
mode, and the comparison rule of the engine tests (spikes and stats exact, potentials
and gradients within a stated tolerance).

The test files import these as ``from conftest import ...`` (``tests/`` is on
``sys.path`` the same way ``dense_oracle`` is).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from asynctrain import AsyncSNN, SimConfig
from dense_oracle import dense_simulate

# Every tensor here is tiny: intra-op threads only add synchronisation, and on a
# loaded 2-core machine they made test_engine_vs_oracle.py 6x slower (21.5 s with
# torch's default 2 threads vs 3.5 s with 1, same load).
torch.set_num_threads(1)

# Stats the engine must reproduce exactly (SPEC 9 metrics of one call).
STAT_KEYS = ("forward_steps", "synops", "first_output_step", "capped", "hidden_spikes",
             "spikes_processed")

# fp32: a forward step sums a handful of weights in another order than the oracle's
# dense matmul (measured max |diff| ~4e-6 on gradients of magnitude ~30, i.e. ~1e-7
# relative); fp64: the same computation at double precision.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}

# Knobs shared by most tests: tau = 20 ms at dt = 10 ms (decay ~0.61), low threshold
# and a soft surrogate so that random nets spike over several forward steps.
BASE = dict(tau=20.0, dt=10.0, theta=0.3, surrogate_steepness=2.0)


def make_net(sizes, *, scale: float = 0.6, shift: float = 0.15, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``nn.Sequential`` of bias-free Linear layers with weights ``scale * N(0, 1) + shift``
    (the positive shift gives enough gain for spikes to reach the output layer)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for n, m in zip(sizes[:-1], sizes[1:]):
        lin = nn.Linear(n, m, bias=False).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(scale * torch.randn(m, n, generator=g, dtype=torch.float64) + shift)
        layers.append(lin)
    return nn.Sequential(*layers)


def dyadic_(net: nn.Module, bits: int = 10) -> nn.Module:
    """Round every weight to a multiple of 2**-bits (in place): sums of a few hundred
    such currents (|w| < 4, spike values 1 or 2, pooled x 0.25) need far fewer than
    24 mantissa bits, so fp32 adds them exactly in any order. Tests that demand equal
    spikes from float-atomic deliveries (whose order changes from run to run) use it."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.round(p * 2**bits) / 2**bits)
    return net


def make_frames(T: int, B: int, n: int, *, p: float = 0.5, seed: int = 1,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Binary spike frames ``[T, B, n]`` with spike probability p."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, n, generator=g) < p).to(dtype)


def weights_of(net: nn.Module) -> list[torch.Tensor]:
    layers = list(net) if isinstance(net, nn.Sequential) else [net]
    return [m.weight for m in layers]


def loss_weights(shape, dtype, seed: int = 5) -> torch.Tensor:
    """Fixed random cotangent: the loss is ``sum(out * c)``, so every output entry
    (and every pass) carries its own gradient."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(out: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
    if not out.requires_grad:  # no forward step touched the weights
        return [torch.zeros_like(w) for w in ws]
    gs = torch.autograd.grad((out * loss_weights(out.shape, out.dtype)).sum(), ws, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(ws, gs)]


def run_engine(net, cfg: SimConfig, frames, *, seed: int = 3, training: bool = False,
               checkpoint_every: int | None = None, grads: bool = True, backend: str = "auto"):
    """One call of `AsyncSNN`. Returns (out detached, stats, weight grads)."""
    snn = AsyncSNN(net, cfg, checkpoint_every=checkpoint_every, backend=backend)
    snn.train(training)
    out = snn(frames, seed=seed)
    gs = _grads(out, weights_of(net)) if grads else None
    return out.detach(), snn.stats, gs


def run_oracle(net, cfg: SimConfig, frames, *, seed: int = 3, training: bool = False):
    """The dense oracle with copies of `net`'s weights. Returns (out detached,
    stats with ``final_v`` = membranes after the last pass, weight grads)."""
    ws = [w.detach().clone().requires_grad_() for w in weights_of(net)]
    out, stats = dense_simulate(ws, frames, cfg, seed=seed, training=training)
    stats = dict(stats, final_v=stats["V"][-1])
    return out.detach(), stats, _grads(out, ws)


def assert_stats_equal(a: dict, b: dict, keys=STAT_KEYS) -> None:
    for k in keys:
        assert torch.equal(a[k], b[k]), f"stats[{k!r}] differ:\n{a[k]}\nvs\n{b[k]}"


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    tol = TOL[a.dtype]
    assert torch.allclose(a, b, **tol), \
        f"{what}: max |diff| {(a - b).abs().max().item():.3g} exceeds {tol}"


def assert_match(eng, ora, readout: str = "counts") -> None:
    """Engine vs reference: counts and stats exact; potentials and gradients close."""
    (out_e, st_e, g_e), (out_o, st_o, g_o) = eng, ora
    if readout == "counts":
        assert torch.equal(out_e, out_o), "output spike counts differ"
    else:
        assert_close(out_e, out_o, "output potentials")
    assert_stats_equal(st_e, st_o)
    assert_close(st_e["final_v"], st_o["final_v"], "final potentials")
    for l, (a, b) in enumerate(zip(g_e, g_o)):
        assert_close(a, b, f"weight gradient of layer {l}")


def cuda_or_skip() -> torch.device:
    """The CUDA device with compiled Triton kernels, else skip the test (the GPU-only tests)."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    from asynctrain.kernels import steps_triton
    from asynctrain.kernels._triton import is_interpreted
    if is_interpreted(steps_triton._forward_kernel):
        pytest.skip("Triton was imported with TRITON_INTERPRET=1: no compiled kernels in this process")
    return torch.device("cuda")


# ---------------------------------------------------------------- markers
# The markers of pyproject.toml, set here by what a test does (one place for every test
# file). `make test-fast` runs -m "not slow and not subprocess" in under 3 minutes on 2
# idle CPU cores; `make test` (CI) runs everything.
SLOW = {
    # more than about a second on 2 idle cores (measured with --durations=0)
    "test_audit.py": ("test_audit_and_finetune_on_a_small_pt", "test_audit_conv_nir_on_image_frames",
                      "test_audit_on_a_recipe_data_set", "test_byom_recipe_tiny",
                      "test_byom_checks_out_before_training_and_keeps_other_runs",
                      "test_one_audit_per_folder_and_the_old_option_names"),
    "test_cifar_recipe.py": ("test_quick_run_and_a_busy_folder",
                             "test_checkpoints_rebuild_the_model_and_refuse_contradictions",
                             "test_layered_model_evaluates_async_from_checkpoint",
                             "test_nan_weights_stop_the_recipe_naming_the_tensor"),
    "test_conv_engine.py": ("test_checkpointed_backward_equals_plain_autograd_conv",
                            "test_conv_engine_matches_oracle",
                            "test_nested_segments_backward_equals_plain_autograd_conv",
                            "test_steps_at_receivers_or_whole_state_match_oracle"),
    "test_demo.py": ("test_demo_quick",),
    # the three that read the counts: their module fixture runs benchmarks/launches.py in a
    # Triton-interpreter child (minutes)
    "test_launches.py": ("test_every_case_and_phase_is_counted", "test_no_host_sync_in_the_loops",
                         "test_launch_budgets_or_todays_ceilings"),
    "test_listed_steps.py": ("test_listed_steps_change_nothing",
                             "test_listed_steps_convert_nothing_but_the_stop_test",
                             "test_nested_segments_with_listed_records"),
    "test_nir.py": ("test_round_trip_conv_exact",),
    "test_no_sync.py": ("test_step_loop_converts_nothing_but_the_stop_test",
                        "test_stop_every_n_steps_changes_nothing", "test_sync_free_mode_changes_nothing",
                        "test_sync_free_mode_changes_nothing_under_plain_autograd",
                        "test_training_iterations_convert_nothing_but_the_stop_test"),
    "test_recipe_cli.py": ("test_quick_and_full_runs_do_not_share_checkpoints",
                           "test_eval_only_rebuilds_the_model_from_the_checkpoint",
                           "test_quick_keeps_the_options_given", "test_a_lock_left_by_a_dead_run_is_taken_over",
                           "test_a_full_disk_names_the_file_and_exits_2"),
    "test_recipes.py": ("test_recipe_one_short_epoch", "test_recipe_resumes_and_evaluates_other_executions"),
    "test_report_figures.py": ("test_twenty_executions_stay_readable",),
}
_STARTS_PROCESSES = ("subprocess.", "_torchrun(", "Popen(")
_CUDA = ("cuda_or_skip(", "skipif(not torch.cuda.is_available()")


def _source(fn) -> str:
    try:
        return inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        src, name = _source(fn), item.originalname
        if name in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
        # run in the Triton-interpreter child (tests/interpreter_child.py), start a
        # process themselves, or compile cubins with ptxas / cuobjdump
        if getattr(fn, "_in_interpreter", False) or any(s in src for s in _STARTS_PROCESSES) \
                or "cubin" in name or "without_spills" in name:
            item.add_marker(pytest.mark.subprocess)
        if any(s in src for s in _CUDA) or name.startswith("test_cuda"):
            item.add_marker(pytest.mark.cuda)
