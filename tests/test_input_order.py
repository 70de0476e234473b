"""`SimConfig.input_order` (SPEC 6): under MS the pending input entries of a pass rank
above every neuron and are taken in a random permutation drawn from the call's seed,
fresh per sample and timestep (`"random"`, the default), or lower index first
(`"index"`, the rule before the option existed).

What is checked: the order the engine really takes the inputs in (read from its
per-step records at K = 1), on the torch ops and on the fused C steps; that
`"index"` is the old rule (ascending, and equal to the oracle's index order);
that `"random"` is a per-(sample, timestep) permutation given by
`rng.input_order_key`, the same at every step of the pass, so the checkpointed
backward (which replays the recorded selections) gives the plain-autograd gradient
and the oracle's; that RS and the prioritized input step do not depend on it.
"""

from __future__ import annotations

import pytest
import torch

from asynctrain import SimConfig, backends, rng
from asynctrain.engine import Engine
from asynctrain.loop import CallLoop
from asynctrain.timeline import EventStep
from asynctrain.network import Network
from conftest import BASE, assert_match, make_frames, make_net, run_engine, run_oracle

SIZES = [8, 7, 6, 3]
OPS = {"torch": backends.TORCH, "cpu": backends.CPU}


def _input_sequences(cfg: SimConfig, frames: torch.Tensor, backend: str, seed: int = 3):
    """{(t, b): input indices in the order the engine selected them} (K = 1: one per step)."""
    net = make_net(SIZES)
    graph = Network.from_module(net)
    T, B = frames.shape[:2]
    eng = Engine(graph, cfg, batch=B, device=torch.device("cpu"), dtype=torch.float32, training=False,
                 seed=seed, ops=OPS[backend])
    wt = graph.weight_table([m.weight.detach() for m in net]).contiguous()
    with torch.no_grad():
        ops = CallLoop(eng).forward(frames, wt, keep_checkpoints=False).ops
    seqs = {(t, b): [] for t in range(T) for b in range(B)}
    for op in ops:
        if isinstance(op, EventStep):
            sel = op.sel.long()
            for b in range(B):
                for i in sel[b].tolist():
                    if i < SIZES[0]:
                        seqs[(op.t, b)].append(i)
    return seqs


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_index_order_takes_inputs_in_ascending_order(backend):
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=1, input_order="index")
    frames = make_frames(3, 3, SIZES[0], p=0.6)
    seqs = _input_sequences(cfg, frames, backend)
    for (t, b), seq in seqs.items():
        assert seq == frames[t, b].nonzero().flatten().tolist(), (t, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_random_order_is_a_fresh_permutation_per_sample_and_timestep(backend):
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=1)
    assert cfg.input_order == "random"  # the default
    frames = torch.ones(4, 3, SIZES[0])  # every input pending: a full permutation each pass
    seqs = _input_sequences(cfg, frames, backend)
    perms = set()
    for (t, b), seq in seqs.items():
        assert sorted(seq) == list(range(SIZES[0])), f"not a permutation at t={t}, b={b}: {seq}"
        # the order of rng.input_order_key, decreasing, ties to the lower index
        q = rng.input_order_key(3, t, torch.tensor([b]), torch.arange(SIZES[0]))
        want = sorted(range(SIZES[0]), key=lambda i: (-int(q[i]), i))
        assert seq == want, (t, b)
        perms.add(tuple(seq))
    assert tuple(range(SIZES[0])) not in perms, "random order gave the index order"
    assert len(perms) == len(seqs), "the permutation must differ per sample and timestep"
    # another call seed, other permutations
    assert _input_sequences(cfg, frames, backend, seed=4)[(0, 0)] != seqs[(0, 0)]


def test_random_order_spans_steps_of_a_pass():
    # K = 3 with 8 pending inputs: the permutation continues across steps (not redrawn
    # per step): the inputs of steps 1, 2, 3 are the permutation's consecutive thirds.
    frames = torch.ones(2, 2, SIZES[0])
    one = _input_sequences(SimConfig(**BASE, policy="MS", forward_group_size=1), frames, "torch")
    three = _input_sequences(SimConfig(**BASE, policy="MS", forward_group_size=3), frames, "cpu")
    for key in one:
        for j in range(0, SIZES[0], 3):
            assert sorted(three[key][j:j + 3]) == sorted(one[key][j:j + 3]), key


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("k,training", [(1, False), (3, True), (5, False)])
def test_random_order_matches_oracle_and_replays(k, training, backend):
    """Checkpointed (recompute from records) == plain autograd == dense oracle: the
    backward replays the recorded random order exactly."""
    regs = dict(refractory_dropout=0.5, network_dropout=0.2, momentum_noise=0.1) if training else {}
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=k, **regs)
    net, frames = make_net(SIZES), make_frames(4, 3, SIZES[0], p=0.6)
    ora = run_oracle(net, cfg, frames, training=training)
    for ck in (0, 1, None):
        assert_match(run_engine(net, cfg, frames, training=training, checkpoint_every=ck, backend=backend), ora)
    assert any(g.abs().sum() > 0 for g in ora[2])
    # the order changes the run (else the comparison above would not test it)
    idx = run_oracle(net, cfg.replace(input_order="index"), frames, training=training)
    assert not torch.equal(idx[1]["V"], ora[1]["V"]) or not all(
        torch.equal(a, b) for a, b in zip(idx[2], ora[2]))


def test_random_order_fp64_matches_oracle():
    cfg = SimConfig(**BASE, policy="MS", forward_group_size=2)
    net = make_net(SIZES, dtype=torch.float64)
    frames = make_frames(3, 3, SIZES[0], p=0.6, dtype=torch.float64)
    assert_match(run_engine(net, cfg, frames, checkpoint_every=1), run_oracle(net, cfg, frames))


@pytest.mark.parametrize("kw", [dict(policy="RS", forward_group_size=2),
                                dict(policy="MS", forward_group_size=2, prioritize_input=True),
                                dict(policy="layered")], ids=["RS", "MS-prio", "layered"])
def test_order_irrelevant_under_rs_and_prioritized_input(kw):
    net, frames = make_net(SIZES), make_frames(3, 3, SIZES[0], p=0.6)
    a = run_engine(net, SimConfig(**BASE, **kw, input_order="random"), frames)
    b = run_engine(net, SimConfig(**BASE, **kw, input_order="index"), frames)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["final_v"], b[1]["final_v"])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_input_order_validated():
    with pytest.raises(ValueError, match="'raster'"):
        SimConfig(input_order="raster")
    with pytest.raises(ValueError, match="input_order"):
        SimConfig(input_order=None)
