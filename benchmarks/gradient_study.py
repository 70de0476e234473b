"""Why unlayered gradients explode (or vanish), and what `surrogate_at` does about it:
one batch, one backward, max |grad| per weight layer. Prints one JSON line per run
(and appends it to --log). docs/gradients.md reads these numbers.

    OMP_NUM_THREADS=1 python benchmarks/gradient_study.py vgg --K 512 64 8 --rules every fire_or_last
    OMP_NUM_THREADS=1 python benchmarks/gradient_study.py stack --K 1 4 16 64 --theta 0.1 0.2 0.4
    OMP_NUM_THREADS=1 python benchmarks/gradient_study.py oracle

- ``vgg``: the CIFAR recipe's model and configuration (recipes/cifar_vgg7.py:
  `parse_args` + `build`: IF neurons, theta 0.2, steepness 2, refractory dropout 0.7,
  prioritized analog input, potential readout, RS) on a batch of CIFAR-like noise
  (uint8 noise, standardised), the cross-entropy of the summed potentials.
- ``stack``: a narrow VGG-like conv stack (channels ``--channels``, ``--depth`` convs,
  a 2x2 pooling after every second one, a linear readout; 2x16x16 inputs) with the same
  kind of neurons and input, small enough for the dense oracle; swept over K,
  theta, steepness, input scale (density) and depth. Besides the gradients it
  measures (``--count``, also for ``vgg``), per weight layer, the forward's two
  multipliers of the exact ("every") gradient: the mean number of evaluations a
  delivered outbox window holds (each adds a surrogate term), the evaluations per
  neuron and pass, and the mean log of the reset factor 1 - V1 * s'(V1 - theta) of a
  non-firing evaluation (its product over a neuron's evaluations scales the gradient
  carried by V; > 1 where V1 < 0).
- ``oracle``: the stack in float64 against the dense oracle (tests/dense_oracle.py):
  the relative difference of the weight gradients for both rules (the engine's
  gradient is the exact gradient of the model).
Rules: "every", "every+detach" (detach_reset), "fire_or_last", "fire_or_last+detach".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes"), str(ROOT / "tests")]
import asynctrain as at  # noqa: E402
from asynctrain import engine as engine_mod, receivers as receivers_mod, steps as steps_mod  # noqa: E402
from asynctrain.kernels.lif import arctan_surrogate  # noqa: E402

RULES = ("every", "every+detach", "fire_or_last", "fire_or_last+detach")


def rule_config(rule: str) -> dict:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    name, _, detach = rule.partition("+")
    return dict(surrogate_at=name, detach_reset=bool(detach))


def cifar_noise(batch: int, seed: int, size: int = 32, channels: int = 3, dtype=torch.float32):
    """CIFAR-like noise: uint8 pixels, standardised as the recipe's data; labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, channels, size, size), generator=g).to(dtype) / 255
    return ((x - 0.5) / 0.25)[None], torch.randint(0, 10, (batch,), generator=g)


def max_grads(snn: at.AsyncSNN, frames, labels, seed: int) -> tuple[list[float], dict]:
    snn.net.zero_grad()
    out = snn(frames, seed=seed)
    F.cross_entropy(out.sum(0), labels).backward()
    grads = [m.weight.grad for m in snn.net if hasattr(m, "weight")]
    return [float(g.abs().max()) for g in grads], snn.stats


def _summary(grads: list[float]) -> dict:
    finite = all(math.isfinite(g) for g in grads)
    last = grads[-1]
    return dict(max_grad=grads, finite=finite,
                ratio_to_last=max(grads) / last if finite and last > 0 else None)


# --- VGG-7 through the recipe ------------------------------------------------------------------
def run_vgg(width: float, K: int, rule: str, batch: int, seed: int, count: bool = False) -> dict:
    import cifar_vgg7
    policy = "layered" if K == 0 else "RS"
    args = cifar_vgg7.parse_args(["--width", str(width), "--K", str(K or 8), "--policy", policy,
                                  "--out", "/tmp/gradient-study-out"])
    net, snn = cifar_vgg7.build(args, torch.device("cpu"))
    snn.cfg = snn.cfg.replace(**rule_config(rule))
    snn.train()
    frames, labels = cifar_noise(batch, seed)
    t0 = time.time()
    grads, stats = max_grads(snn, frames, labels, seed)
    row = dict(case="vgg", width=width, K=K or "layered", rule=rule, batch=batch, seed=seed,
               forward_steps=float(stats["forward_steps"].float().mean()), seconds=round(time.time() - t0, 1),
               **_summary(grads))
    if count and K:
        row.update(counted(snn, frames, labels, seed, args.theta, args.steepness))
    return row


# --- the narrow conv stack ---------------------------------------------------------------------
def conv_stack(depth: int, channels: int, in_ch: int = 2, size: int = 16, seed: int = 0,
               dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c, s = in_ch, size
    for i in range(depth):
        layers.append(nn.Conv2d(c, channels * (1 + i // 2), 3, padding=1, bias=False))
        c = channels * (1 + i // 2)
        if i % 2 == 1 and s % 2 == 0 and s > 3:
            layers.append(nn.AvgPool2d(2))
            s //= 2
    layers += [nn.Flatten(), nn.Linear(c * s * s, 10, bias=False)]
    net = nn.Sequential(*layers).to(dtype)
    net.input_shape = (in_ch, size, size)
    return net


def stack_snn(net: nn.Sequential, K: int, rule: str, theta: float, steepness: float,
              refractory_dropout: float = 0.7) -> at.AsyncSNN:
    snn = at.AsyncSNN(net, backend="torch")
    g = snn.graph
    th = torch.full((g.n_neurons,), theta)
    th[-g.n_outputs:] = 1e9  # non-spiking integrating outputs, as the CIFAR recipe's
    snn.cfg = at.SimConfig(K=K or 8, policy="layered" if K == 0 else "RS", prioritize_input=True,
                           refractory=True, refractory_dropout=refractory_dropout, tau=math.inf, theta=th,
                           dt=1.0, surrogate_steepness=steepness, readout="potential",
                           max_steps=100_000, **rule_config(rule))
    return snn.train()


class WindowCounter:
    """Counts, per weight layer, the evaluations each delivered outbox window holds,
    the evaluations per neuron and pass, and the log reset factors of non-firing
    evaluations, from the engine's steps (`counted` hooks the step modes)."""

    def __init__(self, snn: at.AsyncSNN, theta: float, alpha: float):
        g = snn.graph
        self.layer = torch.full((g.width + 1,), -1, dtype=torch.long)
        for l in range(1, len(g.layer_sizes)):
            self.layer[g.offsets[l]:g.offsets[l] + g.layer_sizes[l]] = l - 1
        self.n_layers, self.theta, self.alpha = len(g.layer_sizes) - 1, theta, alpha
        self.windows = [[] for _ in range(self.n_layers)]
        self.log_reset = [[] for _ in range(self.n_layers)]
        self.per_pass = [[] for _ in range(self.n_layers)]
        self.count = self.in_pass = None

    def evaluated_at(self, info, shape) -> None:
        """An evaluation at a step's receivers (`receivers.StepInfoAt`)."""
        def dense(x, fill):
            return torch.full(shape, fill, dtype=x.dtype).view(-1).index_put((info.idx,), x).view(shape)
        received = dense(torch.ones_like(info.gate), False)
        self.evaluated(received, dense(info.v_pre, 0.0), dense(info.gate, False), dense(info.refr, False))

    def evaluated(self, received, v_pre, gate, refr) -> None:
        if self.count is None:
            self.count = torch.zeros(received.shape, dtype=torch.long)
            self.in_pass = torch.zeros(received.shape, dtype=torch.long)
        self.count += received.long()
        self.in_pass += received.long()
        live = received & gate & ~refr & (v_pre < self.theta)
        factor = 1 - v_pre * arctan_surrogate(v_pre - self.theta, self.alpha)
        lay = self.layer[None, :].expand_as(live)
        for l in range(self.n_layers):
            m = live & (lay == l)
            if m.any():
                self.log_reset[l].append(factor[m].abs().log())

    def emptied(self, cols: torch.Tensor) -> None:
        if self.count is None:
            return
        n = self.count.gather(1, cols)
        lay = self.layer[cols]
        for l in range(self.n_layers):
            m = (lay == l) & (n > 0)
            if m.any():
                self.windows[l].append(n[m].float())
        self.count.scatter_(1, cols, 0)

    def pass_ended(self) -> None:
        if self.in_pass is None:
            return
        lay = self.layer[None, :].expand_as(self.in_pass)
        for l in range(self.n_layers):
            m = (lay == l) & (self.in_pass > 0)
            if m.any():
                self.per_pass[l].append(self.in_pass[m].float())
        self.count = self.in_pass = None

    def summary(self) -> dict:
        def mean(xs):
            return round(float(torch.cat(xs).mean()), 3) if xs else None
        return dict(evals_per_delivered_window=[mean(w) for w in self.windows[:-1]],
                    evals_per_pass=[mean(p) for p in self.per_pass],
                    mean_log_reset_factor=[mean(r) for r in self.log_reset])


def counted(snn: at.AsyncSNN, frames, labels, seed: int, theta: float, alpha: float) -> dict:
    """One forward run (no grad) with the window counter hooked into the step modes."""
    counter = WindowCounter(snn, theta, alpha)
    whole, at_recv = steps_mod.WholeState, receivers_mod.AtReceivers
    saved = (whole.step, at_recv.step, whole.evaluate, engine_mod.Engine.op_start)

    def wrap(orig):
        def step(self, st, sel, sel_deliv, wt, t, k):
            counter.emptied(self.eng.decode(sel)[1])
            st, info, mode = orig(self, st, sel, sel_deliv, wt, t, k)
            if isinstance(info, receivers_mod.StepInfoAt):
                counter.evaluated_at(info, st.v.shape)
            return st, info, mode
        return step

    def evaluate(self, st, current, n_add, received, t, k, vals):  # whole state (and the input step)
        st, info = saved[2](self, st, current, n_add, received, t, k, vals)
        counter.evaluated(info.received, info.v_pre, info.gate, info.refr)
        return st, info

    def op_start(self, st):
        counter.pass_ended()
        return saved[3](self, st)

    whole.step, at_recv.step, whole.evaluate, engine_mod.Engine.op_start = wrap(saved[0]), wrap(saved[1]), \
        evaluate, op_start
    try:
        with torch.no_grad():
            snn(frames, seed=seed)
    finally:
        whole.step, at_recv.step, whole.evaluate, engine_mod.Engine.op_start = saved
    counter.pass_ended()
    return counter.summary()


def run_stack(depth: int, channels: int, K: int, rule: str, theta: float, steepness: float, scale: float,
              batch: int, seed: int, count: bool) -> dict:
    net = conv_stack(depth, channels, seed=seed)
    snn = stack_snn(net, K, rule, theta, steepness)
    frames, labels = cifar_noise(batch, seed, size=16, channels=2)
    frames = frames * scale
    t0 = time.time()
    grads, stats = max_grads(snn, frames, labels, seed)
    row = dict(case="stack", depth=depth, channels=channels, K=K or "layered", rule=rule, theta=theta,
               steepness=steepness, input_scale=scale, batch=batch, seed=seed,
               forward_steps=float(stats["forward_steps"].float().mean()),
               hidden_density=float(stats["hidden_spikes"].float().mean()) / (snn.graph.n_neurons - 10),
               seconds=round(time.time() - t0, 1), **_summary(grads))
    if count and K:
        row.update(counted(snn, frames, labels, seed, theta, steepness))
    return row


def run_oracle(K: int, rule: str, seed: int) -> dict:
    from conv_oracle import run_conv_oracle
    net = conv_stack(4, 2, size=8, seed=seed, dtype=torch.float64)
    snn = stack_snn(net, K, rule, 0.2, 2.0)
    frames, labels = cifar_noise(2, seed, size=8, channels=2, dtype=torch.float64)
    grads_e = []
    out = snn(frames, seed=seed)
    cot = torch.autograd.grad(F.cross_entropy(out.sum(0), labels), out, retain_graph=True)[0]
    weights = [m.weight for m in net if hasattr(m, "weight")]
    grads_e = torch.autograd.grad((out * cot).sum(), weights)
    _, stats_o, grads_o = run_conv_oracle(net, snn.cfg, frames, net.input_shape, seed=seed, training=True,
                                          cotangent=cot)
    rel = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-300)) for a, b in zip(grads_e, grads_o)]
    return dict(case="oracle", K=K, rule=rule, seed=seed, dtype="float64",
                forward_steps=float(snn.stats["forward_steps"].float().mean()),
                max_grad=[float(g.abs().max()) for g in grads_o], max_rel_diff=rel)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=("vgg", "stack", "oracle"))
    ap.add_argument("--K", type=int, nargs="+", default=[0, 512, 64, 8], help="K values (0 = layered)")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    ap.add_argument("--width", type=float, nargs="+", default=[0.25], help="vgg: width multipliers")
    ap.add_argument("--depth", type=int, nargs="+", default=[4], help="stack: conv layers")
    ap.add_argument("--channels", type=int, default=4, help="stack: channels of the first convs")
    ap.add_argument("--theta", type=float, nargs="+", default=[0.2], help="stack: thresholds")
    ap.add_argument("--steepness", type=float, nargs="+", default=[2.0], help="stack: surrogate alpha")
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0], help="stack: input scale (density)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--count", action="store_true", help="also count windows, evaluations and reset factors")
    ap.add_argument("--log", type=Path, default=None, help="append the JSON lines here too")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for seed in a.seeds:
        for K in a.K:
            for rule in a.rules:
                if a.case == "vgg":
                    rows = [run_vgg(w, K, rule, a.batch, seed, a.count) for w in a.width]
                elif a.case == "oracle":
                    rows = [run_oracle(K, rule, seed)]
                else:
                    rows = [run_stack(d, a.channels, K, rule, th, st, sc, a.batch, seed, a.count)
                            for d in a.depth for th in a.theta for st in a.steepness for sc in a.scale]
                for row in rows:
                    row["torch"] = torch.__version__
                    line = json.dumps(row)
                    print(line, flush=True)
                    if a.log:
                        with open(a.log, "a") as f:
                            f.write(line + "\n")


if __name__ == "__main__":
    main()
