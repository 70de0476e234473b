"""Shared helpers for the engine tests: tiny random networks and inputs, one call of
the engine (`AsyncSNN`) and one of the dense oracle with the same weights, seed and
mode, and the comparison rule of the engine tests (spikes and stats exact, potentials
and gradients within a stated tolerance).

The test files import these as ``from conftest import ...`` (``tests/`` is on
``sys.path`` the same way ``dense_oracle`` is).
"""

from __future__ import annotations

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
