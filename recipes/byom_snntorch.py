"""Bring your own model: an snnTorch network -> NIR -> asynchronous audit -> fine-tune -> NIR.

    python recipes/byom_snntorch.py                 # about a minute on 2 CPU cores
    python recipes/byom_snntorch.py --quick         # smoke run (seconds)

1. Train an snnTorch network the usual (layered) way on the demo's digits
   (`asynctrain.data.digits`: 8x8 images rate coded into T frames): bias-free
   ``nn.Linear`` layers, each followed by ``snn.Leaky(reset_mechanism="zero")``,
   cross-entropy on the output spike counts, BPTT through snnTorch.
2. Export it with snnTorch's own NIR exporter (`asynctrain.nir.from_snntorch` checks
   the neurons first and records dt = 0.1 ms and the reset), write ``model.nir``.
3. Audit it: ``python -m asynctrain.audit model.nir --data digits --finetune N``:
   layered vs asynchronous (RS, MS, K sweep, chip presets), then unlayered
   fine-tuning from the snnTorch weights, written back as ``finetuned.nir``.

Before the audit the script checks that the imported model's layered spike counts
equal snnTorch's own on the test frames (exact, see asynctrain/nir.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from asynctrain import SimConfig, data
from asynctrain import audit as audit_cli
from asynctrain import nir as anir
from asynctrain.experiment import subset


def snntorch_net(sizes, beta: float, threshold: float) -> nn.Sequential:
    import snntorch as snn

    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=False))
        layers.append(snn.Leaky(beta=beta, threshold=threshold, init_hidden=True,
                                reset_mechanism="zero", output=i == len(sizes) - 2))
    return nn.Sequential(*layers)


def run_snntorch(net: nn.Sequential, frames: torch.Tensor) -> torch.Tensor:
    """snnTorch's layered simulation: frames [T, B, F] -> output spikes [T, B, C]."""
    import snntorch as snn

    for m in net:
        if isinstance(m, snn.Leaky):
            m.reset_mem()
    return torch.stack([net(frames[t])[0] for t in range(frames.shape[0])])


def train_snntorch(net: nn.Sequential, loader: DataLoader, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(epochs):
        correct = total = 0
        for frames, labels in loader:
            counts = run_snntorch(net, frames).sum(0)
            loss = nn.functional.cross_entropy(counts, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((counts.argmax(1) == labels).sum())
            total += len(labels)
        print(f"snnTorch epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, train accuracy "
              f"{correct / total:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="byom-out")
    ap.add_argument("--hidden", type=int, nargs="+", default=[32, 32, 32])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=20, help="snnTorch (layered) training")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--finetune", type=int, default=10, help="unlayered fine-tuning epochs")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--K", type=int, nargs="*", default=[1, 8, 64])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, 1 epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.finetune = 1, 1
        a.max_train, a.max_test = a.max_train or 96, a.max_test or 48
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    out = Path(a.out)
    train_ds = subset(data.digits(train=True, T=a.T, seed=0), a.max_train, a.seed)
    test_ds = subset(data.digits(train=False, T=a.T, seed=0), a.max_test, a.seed + 1)
    loader = DataLoader(train_ds, batch_size=64, shuffle=True, collate_fn=data.collate_time_major)
    net = snntorch_net([64, *a.hidden, 10], a.beta, a.threshold)
    train_snntorch(net, loader, a.epochs, a.lr)

    # 2. snnTorch's exporter -> NIR file; our import reproduces snnTorch exactly
    frames, labels = data.collate_time_major([test_ds[i] for i in range(len(test_ds))])
    snn_model, graph = anir.from_snntorch(net, frames[0, :1], SimConfig(policy="layered"))
    with torch.no_grad():
        ref = run_snntorch(net, frames)
        ours = snn_model(frames)
    same = torch.equal(ref, ours)
    print(f"imported model vs snnTorch, layered, {len(test_ds)} test samples: output spikes "
          f"{'identical' if same else 'DIFFER'} ({int(ref.sum())} spikes); snnTorch accuracy "
          f"{float((ref.sum(0).argmax(1) == labels).float().mean()):.3f}")
    if not same:
        return 1
    out.mkdir(parents=True, exist_ok=True)
    anir.write(out / "model.nir", graph)

    # 3. the audit, as a user would run it
    args = [str(out / "model.nir"), "--data", "digits", "--T", str(a.T), "--out", str(out),
            "--finetune", str(a.finetune), "--seed", str(a.seed), "--K", *map(str, a.K)]
    if a.max_test:
        args += ["--max-samples", str(a.max_test)]
    if a.max_train:
        args += ["--max-train", str(a.max_train)]
    if a.quick:
        args += ["--steps-after-output", "0", "1"]
    if a.no_progress:
        args.append("--no-progress")
    print("python -m asynctrain.audit " + " ".join(args))
    return audit_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
