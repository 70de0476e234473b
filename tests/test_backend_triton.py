"""Whole-model equality: backend="triton" vs backend="torch" on a small MLP.

The kernels run under Triton's interpreter on CPU tensors; Triton picks interpreted
vs compiled once, at its first import, so the comparison runs in a child process
started with TRITON_INTERPRET=1 (this test process already imported Triton)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHILD = textwrap.dedent("""
    import json, torch, asynctrain as at
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(23, 17, bias=False), torch.nn.Linear(17, 11, bias=False),
                              torch.nn.Linear(11, 5, bias=False))
    for m in net:
        torch.nn.init.xavier_uniform_(m.weight, gain=2.5)
    frames = (torch.rand(4, 3, 23) < 0.3).float()
    weights = torch.linspace(-1, 1, 5)
    res = {}
    for name, cfg in {
        "MS": at.SimConfig(K=3, policy="MS", theta=0.3, tau=20.0, refractory_dropout=0.5, momentum_noise=0.1),
        "RS": at.SimConfig(K=4, policy="RS", theta=0.3, tau=20.0, network_dropout=0.2),
        "MS-prio-potential": at.SimConfig(K=5, policy="MS", prioritize_input=True, readout="potential"),
        "layered": at.SimConfig(policy="layered"),
    }.items():
        outs, grads, steps = [], [], []
        for backend, det in (("torch", False), ("triton", False), ("triton", True)):
            snn = at.AsyncSNN(net, cfg, backend=backend, deterministic=det).train()
            out = snn(frames, seed=5)
            (out * weights).sum().backward()
            outs.append(out.detach()); steps.append(snn.stats["forward_steps"])
            grads.append(torch.cat([m.weight.grad.flatten() for m in net])); net.zero_grad()
        res[name] = dict(
            out_equal=all(torch.allclose(o, outs[0], atol=1e-5, rtol=1e-4) for o in outs[1:]),
            counts_exact=cfg.readout != "counts" or all(torch.equal(o, outs[0]) for o in outs[1:]),
            steps_equal=all(torch.equal(s, steps[0]) for s in steps[1:]),
            grad_err=max(float((g - grads[0]).abs().max()) for g in grads[1:]),
            grad_norm=float(grads[0].norm()), max_steps=int(steps[0].max()))
    print(json.dumps(res))
""")


def test_triton_backend_equals_torch_backend():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, v in res.items():
        assert v["out_equal"] and v["counts_exact"] and v["steps_equal"], (name, v)
        assert v["grad_norm"] > 0, (name, v)
        assert v["grad_err"] <= 1e-5 * max(1.0, v["grad_norm"]), (name, v)
    assert res["MS"]["max_steps"] > 3, "the case must take several forward steps per pass"
