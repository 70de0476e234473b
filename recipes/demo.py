"""Short end-to-end example on synthetic spikes (placeholder until the demo issue).

Builds a narrow, deep MLP, draws class-dependent Bernoulli spike frames, trains it a
few Adam steps layered and unlayered (MS), then runs both models under every
execution and prints what the engine measured: accuracy on the synthetic batch,
forward steps per pass, synaptic operations and hidden spikes per sample.

    python recipes/demo.py [--steps 30] [--K 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import asynctrain as at


def synthetic(n_classes: int, n_in: int, T: int, batch: int, gen: torch.Generator):
    """Each class fires a fixed random subset of inputs at a higher rate."""
    protos = (torch.rand(n_classes, n_in, generator=gen) < 0.2).float()
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    rate = 0.02 + 0.25 * protos[labels]                      # [B, n_in]
    frames = (torch.rand(T, batch, n_in, generator=gen) < rate).float()
    return frames, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="Adam steps per training (default 30)")
    ap.add_argument("--K", type=int, default=8, help="forward group size for async execution")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.steps < 1 or a.K < 1:
        ap.error(f"--steps and --K must be >= 1, got {a.steps}, {a.K}")
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    n_in, n_cls, T = 64, 4, 8
    frames, labels = synthetic(n_cls, n_in, T, 128, gen)
    base = at.SimConfig(forward_group_size=a.K, theta=0.3, tau=20.0, dt=1.0, surrogate_steepness=5.0)

    models = {}
    for train_policy in ("layered", "MS"):
        net = torch.nn.Sequential(torch.nn.Linear(n_in, 32, bias=False), torch.nn.Linear(32, 32, bias=False),
                                  torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, n_cls, bias=False))
        for m in net:
            torch.nn.init.xavier_uniform_(m.weight, gain=1.5)
        snn = at.AsyncSNN(net, base.replace(policy=train_policy)).train()
        opt = torch.optim.Adam(net.parameters(), lr=5e-3)
        t0 = time.perf_counter()
        for _ in tqdm(range(a.steps), desc=f"train {train_policy:7}", leave=False):
            loss = torch.nn.functional.cross_entropy(snn(frames).sum(0), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[train_policy] = (snn.eval(), loss.item(), time.perf_counter() - t0)

    print(f"\nsynthetic data: {n_cls} classes, {n_in} inputs, T={T}, batch 128; K={a.K}")
    print(f"{'train':8} {'infer':8} {'acc':>6} {'steps/pass':>10} {'synops':>9} {'hidden spk':>10} "
          f"{'train s':>8}")
    for train_policy, (snn, loss, secs) in models.items():
        for infer in ("layered", "RS", "MS"):
            with torch.no_grad(), snn.configured(policy=infer):
                out = snn(frames, seed=a.seed)
            s = snn.stats
            acc = (out.sum(0).argmax(1) == labels).float().mean().item()
            print(f"{train_policy:8} {infer:8} {acc:6.3f} {s['forward_steps'].float().mean():10.2f} "
                  f"{s['synops'].sum(0).float().mean():9.0f} {s['hidden_spikes'].float().mean():10.1f} "
                  f"{secs:8.1f}")
    print("\n(accuracy on the training batch of synthetic data; the real demo on scikit-learn's "
          "digits comes with the demo issue)")


if __name__ == "__main__":
    main()
