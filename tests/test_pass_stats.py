"""A pass's stats in one launch (`pass_stats_triton`) against its twin
(`pass_stats_torch`, the reduction `Pass.store` did as torch ops), every stat equal.

Where the tests run: as in tests/test_kernels_triton.py (tests/interpreter_child.py),
the kernel interpreted on CPU tensors.

Cases: queued or prioritized input (an input step first), the stop rule with and
without "output", fp32 and fp64 records, int64 and int32 columns with fillers (-1 -
column, counted nowhere), samples with and without an output spike, capped and not;
and the edges: no event steps, no evaluation at all, more steps than a block.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from asynctrain.kernels import pass_stats as mod  # noqa: E402
from asynctrain.kernels._triton import is_interpreted  # noqa: E402
from interpreter_child import wrap_tests  # noqa: E402

INTERPRETED = is_interpreted(mod._pass_stats_kernel)


def _rows(B: int, hidden: int = 5) -> mod.StatRows:
    z = lambda: torch.full((B,), 7, dtype=torch.int64)  # noqa: E731  (stale values: overwritten)
    return mod.StatRows(z(), z(), z(), z(), z(), torch.ones(B, dtype=torch.bool),
                        torch.full((B,), hidden, dtype=torch.int64))


def _case(S: int, B: int, K: int, W: int, seed: int, *, dtype=torch.float32, sel_dtype=torch.int64,
          has_input: bool = True, evals: int | None = None):
    g = torch.Generator().manual_seed(seed)
    vals = (torch.randn(S, B, K, generator=g) * (torch.rand(S, B, K, generator=g) < 0.6)).to(dtype)
    sel = torch.randint(0, W, (S, B, K), generator=g)
    sel = torch.where(torch.rand(S, B, K, generator=g) < 0.1, -1 - sel, sel).to(sel_dtype)  # fillers
    E = S + int(has_input) if evals is None else evals
    fired = torch.rand(E, B, generator=g) < 0.05
    fired[:, 0] = False  # a sample without an output spike
    if E:
        fired[E // 2, 1] = True  # and one with
    fan_out = torch.randint(0, 50, (W,), generator=g)
    steps = torch.randint(S // 2, S + 2, (B,), generator=g)
    steps[1] = 40  # at the cap
    first_out = torch.where(torch.rand(B, generator=g) < 0.5, torch.randint(0, S + 1, (B,), generator=g), -1)
    pending = torch.rand(B, W, generator=g) < 0.02
    pending[2] = False
    spike_sum = torch.randint(0, 4, (B, W), generator=g).to(dtype)
    hidden_f = (torch.rand(W, generator=g) < 0.7).to(dtype)
    inp = (torch.randint(0, 500, (B,), generator=g), torch.randint(0, 30, (B,), generator=g)) if has_input \
        else (None, None)
    return (vals, sel, fired, fan_out, *inp, steps, first_out, pending, spike_sum, hidden_f)


def _both(args, **kw):
    B = args[6].shape[0]
    got, want = _rows(B), _rows(B)
    mod.pass_stats_triton(got, *args, **kw)
    mod.pass_stats_torch(want, *args, **kw)
    for name, g, w in zip(mod.StatRows._fields, got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), (name, g, w)
    return want


@pytest.mark.parametrize("stop_output", [False, True], ids=["drain", "output"])
@pytest.mark.parametrize("has_input", [False, True], ids=["queued", "prioritized"])
@pytest.mark.parametrize("dtype,sel_dtype", [(torch.float32, torch.int64), (torch.float64, torch.int32)],
                         ids=["fp32", "fp64-int32"])
def test_stats_match_the_twin(has_input, stop_output, dtype, sel_dtype):
    for S, B, K, W in ((3, 4, 8, 300), (70, 5, 3, 1500)):  # 70 steps: more than a block of 32
        args = _case(S, B, K, W, seed=S, dtype=dtype, sel_dtype=sel_dtype, has_input=has_input)
        want = _both(args, max_steps=40, stop_output=stop_output, steps_after_output=1)
        assert want.first_output_step[0] == -1 and (want.first_output_step[1:] > 0).any(), "vacuous"
        assert want.capped.any() or S < 40


def test_no_event_steps_and_no_evaluations():
    args = _case(2, 3, 4, 64, seed=1)
    # the prioritized input step only: one evaluation, no event step
    only_input = (None, None, args[2][:1]) + args[3:]
    _both(only_input, max_steps=40, stop_output=True, steps_after_output=1)
    # nothing evaluated at all (queued input, empty pass)
    nothing = (None, None, None, args[3], None, None) + args[6:]
    want = _both(nothing, max_steps=40, stop_output=False, steps_after_output=1)
    assert (want.spikes_processed == 0).all() and (want.first_output_step == -1).all()


def test_argument_errors():
    args = _case(2, 3, 4, 64, seed=1)
    with pytest.raises(ValueError, match="input_synops and input_processed"):
        mod.pass_stats_triton(_rows(3), *args[:4], args[4], None, *args[6:], max_steps=4, stop_output=False,
                              steps_after_output=1)
    bad = _rows(3)._replace(synops=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"rows.synops must be a contiguous \[3\]"):
        mod.pass_stats_triton(bad, *args, max_steps=4, stop_output=False, steps_after_output=1)


wrap_tests(globals(), interpreted=INTERPRETED)
