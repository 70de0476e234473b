"""The plan of a call (`asynctrain/plan.py`): which step mode runs, why the fused steps
do not, forcing a mode (`plan.forced`) and its refusals; what a fused backend provides
(`kernels/step_spec.py` `FusedSteps`); a second backward through one checkpointed
forward refused by name (``retain_graph=True``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import asynctrain as at
from asynctrain import backends, plan
from asynctrain.engine import Engine
from asynctrain.kernels.cpu_step import CpuSteps
from asynctrain.kernels.step_spec import FusedSteps
from asynctrain.loop import CallLoop
from asynctrain.network import Network
from conftest import BASE, make_frames, make_net
from test_conv_engine import conv_net, image_frames

SIZES = [8, 7, 6, 3]
CPU = torch.device("cpu")


def _engine(module, ops=backends.CPU, histogram=False, **cfg):
    net = Network.from_module(module, getattr(module, "input_shape", None))
    return Engine(net, at.SimConfig(**BASE, **cfg), batch=2, device=CPU, dtype=torch.float32, training=True,
                  seed=0, ops=ops, histogram=histogram)


def test_the_plan_names_the_mode_and_why_the_fused_steps_do_not_run():
    fc, conv = make_net(SIZES), conv_net("pool")
    assert _engine(fc).plan.steps == "fused" and _engine(fc).plan.why_not_fused == ""
    assert _engine(fc, ops=backends.TORCH).plan.steps == "whole"
    assert "no fused steps" in _engine(fc, ops=backends.TORCH).plan.why_not_fused
    eng = _engine(conv)
    assert eng.plan.steps == "receivers" and "convolutional" in eng.plan.why_not_fused
    assert eng.plan.nested and eng.plan.record_ratio < 1
    with plan.forced(sync_free=True):  # listed when K x the list width <= a quarter of the width
        assert _engine(conv).plan.steps == "whole" and _engine(conv).plan.stop_every == 1
        assert _engine(conv, forward_group_size=1).plan.steps == "listed"
        assert _engine(fc).plan.steps == "fused" and _engine(fc).plan.sync_free
    with plan.forced(sync_free=True, steps="whole", stop_every=8):
        p = _engine(conv).plan
        assert (p.steps, p.stop_every, p.record_ratio) == ("whole", 8, 1.0)
        assert _engine(fc).plan.why_not_fused == "steps='whole' forced"
    assert not _engine(conv).plan.sync_free, "forced choices outlive their block"
    # the plan's mode for a call without autograd; every step functional under autograd
    assert _engine(conv).plan.mode(autograd=True) == "whole"


def test_fused_steps_without_the_histogram_say_so():
    pytest.importorskip("triton")
    from asynctrain.kernels.steps_triton import TritonSteps
    spec = _engine(make_net(SIZES)).step_spec()
    assert "histogram" in plan.why_not_fused(TritonSteps, spec, image=False, histogram=True)
    assert plan.why_not_fused(CpuSteps, spec, image=False, histogram=True) == ""
    assert "K <= 4096, not 5000" in plan.why_not_fused(TritonSteps, replace(spec, k=5000), image=False,
                                                        histogram=False)
    assert "float16" in plan.why_not_fused(CpuSteps, replace(spec, dtype=torch.float16), image=False,
                                           histogram=False)


def test_fused_backends_provide_the_protocol():
    names = [n for n in dir(FusedSteps) if not n.startswith("_")] + list(FusedSteps.__annotations__)
    assert {"bind_weights", "bind_state", "bind_pass", "forward_batch", "replay_step", "backward_step",
            "replay_steps", "backward_steps",
            "unsupported", "fills_slots", "records_histogram"} <= set(names)
    classes = [CpuSteps]
    try:
        from asynctrain.kernels.steps_triton import TritonSteps
        classes.append(TritonSteps)
    except ImportError:
        pass
    for cls in classes:
        for name in names:
            assert hasattr(cls, name), (cls.__name__, name)
        assert cls.unsupported(_engine(make_net(SIZES)).step_spec()) is None


@pytest.mark.parametrize("choices, match", [
    (dict(steps="listed"), "only convolutional"),
    (dict(steps="receivers"), "only convolutional"),
    (dict(sync_free=True, steps="receivers"), "only convolutional"),
    (dict(steps="fused", backend="torch"), "no fused steps"),
])
def test_an_impossible_forced_mode_is_refused_naming_why(choices, match):
    backend = choices.pop("backend", "cpu")
    snn = at.AsyncSNN(make_net(SIZES), at.SimConfig(**BASE, K=2), backend=backend)
    with plan.forced(**choices), pytest.raises(ValueError, match=match):
        snn(make_frames(2, 2, SIZES[0]))


def test_impossible_forced_modes_on_conv_nets_and_bad_choices():
    conv = conv_net("pool")
    with plan.forced(steps="receivers", sync_free=True), pytest.raises(ValueError, match="'listed'"):
        _engine(conv)
    with plan.forced(steps="listed", sync_free=False), pytest.raises(ValueError, match="sync_free=True"):
        _engine(conv)
    with plan.forced(steps="fused"), pytest.raises(ValueError, match="convolutional"):
        _engine(conv)
    with pytest.raises(ValueError, match="'bogus'"), plan.forced(steps="bogus"):
        pass
    with pytest.raises(ValueError, match="stop_every must be an int >= 1, got 0"), plan.forced(stop_every=0):
        pass
    with pytest.raises(TypeError, match="listed_below"), plan.forced(listed_below=1.0):
        pass


def test_a_forced_mode_runs_and_is_the_engines_for_its_backward():
    """The choice is made when the engine is built: a backward outside the block still
    sweeps with the forced mode (here the whole-state records of a conv net)."""
    net, frames = conv_net("pool"), image_frames(2, 2, (2, 6, 6), p=0.4)
    cfg = at.SimConfig(**BASE, K=3, policy="MS")
    made = []
    forward = CallLoop.forward

    def recording(self, *a, **kw):
        made.append(self)
        return forward(self, *a, **kw)

    snn = at.AsyncSNN(net, cfg, backend="torch").train()
    grads = []
    for steps in ("whole", "receivers"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(CallLoop, "forward", recording)
            with plan.forced(steps=steps):
                out = snn(frames, seed=1)
        out.sum().backward()
        assert made[-1].mode.name == steps
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        net.zero_grad()
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("model", ["fc", "conv"])
def test_second_backward_through_one_checkpointed_forward_is_refused_by_name(model):
    if model == "fc":
        net, frames = make_net(SIZES), make_frames(2, 2, SIZES[0])
    else:
        net, frames = conv_net("pool"), image_frames(2, 2, (2, 6, 6), p=0.4)
    snn = at.AsyncSNN(net, at.SimConfig(**BASE, K=2)).train()
    loss = snn(frames).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"retain_graph=True is not honoured.*checkpoint_every=0"):
        loss.backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), first)), "the refused backward added"


def test_plain_autograd_honours_retain_graph():
    net = make_net(SIZES)
    snn = at.AsyncSNN(net, at.SimConfig(**BASE, K=2), checkpoint_every=0).train()
    loss = snn(make_frames(2, 2, SIZES[0])).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in net.parameters()]
    loss.backward()
    assert any(g.abs().sum() > 0 for g in first)
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(net.parameters(), first))
