"""Bring your own model: an snnTorch network -> NIR -> asynchronous audit -> fine-tune -> NIR.

    python recipes/byom_snntorch.py                 # about a minute on 2 CPU cores
    python recipes/byom_snntorch.py --quick         # smoke run (seconds)

1. Train an snnTorch network the usual (layered) way on the demo's digits
   (`asynctrain.data.digits`: 8x8 images rate coded into T frames): bias-free
   ``nn.Linear`` layers, each followed by ``snn.Leaky(reset_mechanism="zero")``,
   cross-entropy on the output spike counts, BPTT through snnTorch.
2. Export it with snnTorch's own NIR exporter (`asynctrain.nir.from_snntorch` checks
   the neurons first and records dt = 0.1 ms and the reset), write ``model.nir``.
3. Audit it: ``python -m asynctrain.audit model.nir --data digits --finetune-epochs N``:
   layered vs asynchronous (RS, MS, K sweep, chip presets), then unlayered
   fine-tuning from the snnTorch weights, written back as ``finetuned.nir``.

Before the audit the script checks that the imported model's layered spike counts
equal snnTorch's own on the test frames (exact, see asynctrain/nir.py).

--out is checked before training, and owned by one run at a time: a folder holding
the results of a run with other settings is refused unless --fresh. Exit status: 0
done, 1 the import did not reproduce snnTorch's spikes (or fine-tuning diverged), 2 bad
arguments or paths, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from asynctrain import SimConfig, cli, data, outdir
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


QUICK = dict(epochs=1, finetune_epochs=1, max_train=96, max_test=48)
"""``--quick``: a smoke run (options given on the command line win), under <out>/quick."""
RECORD = "byom-run.json"


def parser() -> argparse.ArgumentParser:
    pos_i, pos_f = cli.positive(int), cli.positive(float)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--out", default="byom-out", help="output folder (--quick: <out>/quick)")
    ap.add_argument("--hidden", type=pos_i, nargs="+", default=[32, 32, 32],
                    help="hidden layer sizes of the snnTorch MLP")
    ap.add_argument("--T", type=pos_i, default=8, help="frames per digits sample")
    ap.add_argument("--beta", type=cli.probability, default=0.5,
                    help="snn.Leaky decay per step (0..1)")
    ap.add_argument("--threshold", type=pos_f, default=0.5, help="snn.Leaky firing threshold")
    ap.add_argument("--epochs", type=pos_i, default=20, help="snnTorch (layered, BPTT) training epochs")
    ap.add_argument("--batch-size", type=pos_i, default=64, help="samples per batch")
    ap.add_argument("--lr", type=pos_f, default=5e-3, help="Adam learning rate of the snnTorch training")
    ap.add_argument("--finetune-epochs", type=cli.at_least(0), default=10,
                    help="epochs of unlayered fine-tuning in the audit (0: none)")
    ap.add_argument("--finetune", dest="finetune_epochs", type=cli.at_least(0),
                    action=cli.deprecated("--finetune-epochs"), help=argparse.SUPPRESS)
    ap.add_argument("--max-train", type=pos_i, default=None,
                    help="use a seeded random subset of this many training samples (none: all)")
    ap.add_argument("--max-test", type=pos_i, default=None,
                    help="use a seeded random subset of this many test samples (none: all)")
    ap.add_argument("--eval", nargs="*", default=None, metavar="EXECUTION",
                    help="the audit's executions besides layered, RS and MS at K = 8 (none: RS and "
                         "MS at K = 1 and 64)")
    ap.add_argument("--K", type=pos_i, nargs="*", default=None,
                    action=cli.deprecated("--eval RS:K=k MS:K=k"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 96 train / 48 test samples, 1 epoch, 1 fine-tuning epoch "
                         "(options given on the command line win), written under <out>/quick")
    ap.add_argument("--fresh", action="store_true",
                    help="replace the results of a run with other settings in --out")
    ap.add_argument("--seed", type=cli.at_least(0), default=0, help="seed of all randomness")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    if a.K is not None and a.eval is None:
        a.eval = [f"{p}:K={k}" for p in ("RS", "MS") for k in a.K]
    if a.quick:
        changed = cli.apply_quick(a, cli.explicit(ap, argv), QUICK)
        print(f"--quick: {', '.join(changed) or 'nothing changed (every value given)'}")
    out = Path(a.out) / "quick" if a.quick else Path(a.out)
    try:
        cli.out_folder(out)  # before any training
    except ValueError as err:
        ap.error(str(err))

    identity = {k: v for k, v in vars(a).items() if k not in ("out", "no_progress", "fresh", "K")}

    def body() -> int:
        with outdir.claim(out):
            outdir.check_owner(out, RECORD, identity, fresh=a.fresh,
                               outputs=(*audit_cli.OUTPUTS, audit_cli.RECORD, "model.nir"))
            return _run(a, out, identity)

    return cli.guarded(body, "rerun the same command (it starts over)")


def _run(a: argparse.Namespace, out: Path, identity: dict) -> int:
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    train_ds = subset(data.digits(train=True, T=a.T, seed=0), a.max_train, a.seed)
    test_ds = subset(data.digits(train=False, T=a.T, seed=0), a.max_test, a.seed + 1)
    loader = DataLoader(train_ds, batch_size=a.batch_size, shuffle=True,
                        collate_fn=data.collate_time_major)
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
    outdir.write_record(out, RECORD, identity)
    anir.write(out / "model.nir", graph)

    # 3. the audit, as a user would run it (in this run's --out, which it owns)
    args = [str(out / "model.nir"), "--data", "digits", "--T", str(a.T), "--out", str(out),
            "--finetune-epochs", str(a.finetune_epochs), "--seed", str(a.seed), "--fresh",
            "--batch-size", str(a.batch_size)]
    if a.eval is not None:
        args += ["--eval", *a.eval]
    if a.max_test:
        args += ["--max-test", str(a.max_test)]
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
