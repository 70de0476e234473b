"""The select kernel that computes its own keys (`select_keyed_triton`) against its
twin (`select_keyed_torch`, the engine's sync-free keys over every column).

Where the tests run: as in tests/test_kernels_triton.py (tests/interpreter_child.py),
the kernel interpreted on CPU tensors.

Selected sets compared exactly (rows sorted: the kernel writes ascending index, the
twin highest key first); in fill mode the selection's real slots are unchanged and
the fillers are the twin's set. Policies RS, MS, MS + momentum noise, MS + random
input order; widths one below and above the one-block limit (`_ONE_BLOCK_MAX`: keys
in registers) and a row of three chunks (the staged path, `staged_plan`, up to kk =
`_STAGED_MAX_KK`; above it the row is streamed through a scratch row per radix
round); K = 1, a middle value, the staged path's largest kk and one above it, and K
above the pending count and the width; fp32 and fp64 potentials. Rows
range from nothing pending to everything pending; potentials are coarse (many ties,
to the lower index) and hold both -0.0 and +0.0 (equal keys).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain.kernels import select as select_mod  # noqa: E402
from asynctrain.kernels import select_keyed as keyed_mod  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from asynctrain.kernels.select_keyed import select_keyed_torch, select_keyed_triton  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402

INTERPRETED = is_interpreted(keyed_mod._select_keyed_kernel)
F32, F64 = torch.float32, torch.float64
POLICIES = {"RS": dict(policy_ms=False), "MS": dict(policy_ms=True),
            "MS-noise": dict(policy_ms=True, noise=0.1), "MS-random-order": dict(policy_ms=True, input_random=True)}
N_INPUTS = 9
SEED, T, STEP = 11, 2, 5


def _case(b: int, w: int, seed: int, dtype: torch.dtype):
    """(pending, values, is_input): rows of densities 0 .. 1 (the dump never pending),
    coarse values with ties and signed zeros, the first N_INPUTS columns inputs."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randint(-4, 5, (b, w), generator=g).to(dtype) / 4)
    zero = values == 0
    values[zero & (torch.rand(b, w, generator=g) < 0.5)] = -0.0
    density = torch.linspace(0, 1, b)[:, None]
    pending = torch.rand(b, w, generator=g) < density
    pending[-1] = True  # everything pending
    pending[:, -1] = False
    is_input = torch.zeros(w, dtype=torch.bool)
    is_input[:N_INPUTS] = True
    return pending, values, is_input


def _rows(sel: torch.Tensor) -> list[list[int]]:
    return [sorted(r) for r in sel.tolist()]


def _both(*args, **kw):
    got = select_keyed_triton(*args, **kw)
    want = select_keyed_torch(*args, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.int64
    return got, want


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("width", [2039, 2053, 4500], ids=["one-block", "staged-2", "staged-3"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_selection_matches_the_twin(policy, width, dtype):
    assert (width <= select_mod._ONE_BLOCK_MAX) == (width == 2039)
    pending, values, is_input = _case(4, width, seed=width, dtype=dtype)
    top = keyed_mod._STAGED_MAX_KK
    # 5000: above every row's pending count and the width (streamed); top + 1 streamed
    for k in (1, 37, top, top + 1, 5000) if width == 4500 else (1, 37, 5000):
        assert (keyed_mod.staged_plan(width, min(k, width)) is not None) == (width > 2039 and k <= top)
        got, want = _both(pending, values, is_input, k, SEED, T, STEP, **POLICIES[policy])
        assert _rows(got) == _rows(want), (policy, k)
        assert got[0].eq(width - 1).all(), "nothing pending: all dump"
        if k == 1:
            assert (got[1:] != width - 1).all(), "vacuous"
        # the kernel's order: ascending index, then the dump
        real = got[got != width - 1].view(-1)
        assert all(r == sorted(r) for r in got.tolist()) and real.numel() > 0


@pytest.mark.parametrize("width", [257, 4500], ids=["one-block", "staged"])
def test_ties_and_signed_zeros_go_to_the_lower_index(width):
    """MS without noise: every pending key equal (+0.0 and -0.0 alternating), so the
    K lowest pending indices; inputs (+inf) first."""
    pending = torch.zeros(2, width, dtype=torch.bool)
    pending[:, 20:width - 1] = True
    pending[1, 3] = True  # an input
    values = torch.zeros(2, width)
    values[:, ::2] = -0.0
    is_input = torch.zeros(width, dtype=torch.bool)
    is_input[:N_INPUTS] = True
    got, want = _both(pending, values, is_input, 5, SEED, T, STEP, policy_ms=True)
    assert _rows(got) == _rows(want) == [[20, 21, 22, 23, 24], [3, 20, 21, 22, 23]]


@pytest.mark.parametrize("width", [2039, 2053, 4500], ids=["one-block", "staged-2", "staged-3"])
@pytest.mark.parametrize("policy", ["RS", "MS"])
def test_fill_mode_matches_the_twin(policy, width):
    """fill_slots (SPEC 8): the free slots of a selection take the best candidates
    (MS: highest V, RS: STREAM_FILL keys), as -1 - column; other slots unchanged."""
    pending, values, is_input = _case(5, width, seed=3, dtype=F32)
    g = torch.Generator().manual_seed(4)
    cand = ~pending & (torch.rand(pending.shape, generator=g) < 0.3)
    cand[:, :N_INPUTS] = False  # fillers are hidden neurons
    cand[:, -1] = False
    cand[2] = False  # a row without candidates
    for k in (1, 37, 5000):
        sel = select_keyed_torch(pending, values, is_input, k, SEED, T, STEP, policy_ms=policy == "MS")
        got, want = _both(cand, values, is_input, k, SEED, T, STEP, policy_ms=policy == "MS", sel=sel)
        real = sel != width - 1
        assert torch.equal(got[real], sel[real]) and torch.equal(want[real], sel[real])
        assert _rows(got) == _rows(want), k
        assert torch.equal(got[2], sel[2])
        assert (want < 0).any(), "vacuous: no filler"


def test_staged_path_sizes():
    """The staged path's scratch against the streamed one's int64 [B, W] row: a
    VGG-7-wide row (229,387 columns) at K = 8 and 64 (a chunk's best kk per 2,048
    columns), and where it stops (rows searched in registers; kk above the cap)."""
    w = 229_387
    for kk, ratio in ((8, 100), (64, 15)):
        plan = keyed_mod.staged_plan(w, kk)
        assert plan["n_chunks"] == -(-w // keyed_mod._CHUNK) == 113 and plan["n_cand"] == 113 * kk
        assert plan["scratch_bytes"] * ratio < w * 8, (kk, plan)
    assert keyed_mod.staged_plan(select_mod._ONE_BLOCK_MAX, 8) is None
    assert keyed_mod.staged_plan(w, keyed_mod._STAGED_MAX_KK) is not None
    assert keyed_mod.staged_plan(w, keyed_mod._STAGED_MAX_KK + 1) is None


def test_degenerate_sizes():
    is_input = torch.zeros(1, dtype=torch.bool)
    for policy in POLICIES.values():
        got, want = _both(torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, 1), is_input, 3, 1, 0, 0, **policy)
        assert got.tolist() == want.tolist() == [[0]]
    out = select_keyed_triton(torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, 5),
                              torch.zeros(5, dtype=torch.bool), 2, 1, 0, 0, policy_ms=False)
    assert out.shape == (0, 2)


wrap_tests(globals(), interpreted=INTERPRETED)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_cuda_selection_matches_the_twin(policy):
    """The compiled kernel on a GPU (skipped without one): a VGG-7-wide row (229,387
    columns: the streamed path), batch 8, K 8 and 512, selection and fill mode."""
    from conftest import cuda_or_skip
    dev = cuda_or_skip()
    pending, values, is_input = (x.to(dev) for x in _case(8, 229_387, seed=7, dtype=F32))
    for k in (8, 512):
        got, want = _both(pending, values, is_input, k, SEED, T, STEP, **POLICIES[policy])
        assert _rows(got) == _rows(want), (policy, k)
        if policy in ("RS", "MS"):
            cand = ~pending & (torch.rand(pending.shape, device=dev) < 0.01)
            cand[:, :N_INPUTS] = False
            cand[:, -1] = False
            got, want = _both(cand, values, is_input, k, SEED, T, STEP, sel=want, **POLICIES[policy])
            assert _rows(got) == _rows(want), (policy, k, "fill")
