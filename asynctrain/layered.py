"""Layered execution (SPEC 6, "layered"): the usual synchronous SNN.

One forward step per layer: every outbox of a layer (zero or not) is delivered before
any threshold of the next layer is evaluated, so each neuron is evaluated exactly
once per pass and refractoriness and sync thresholds play no role. Training through
it with plain autograd is "layered backpropagation", the baseline of every
comparison. Dense per-layer matmuls: this is what a GPU SNN library does.
"""

from __future__ import annotations

import torch

from . import rng
from .passes import new_stats
from .network import Network
from .ops import lif


def layered_forward(net: Network, cfg, weights: list[torch.Tensor], frames: torch.Tensor, *,
                    theta: torch.Tensor, decay: torch.Tensor, training: bool, seed: int,
                    histogram: bool = False) -> tuple[torch.Tensor, dict]:
    """Args: frames ``[T, B, n_inputs]``; theta, decay: ``[n_neurons]``.
    Returns (out ``[T, B, n_out]``, stats) with the engine's stats keys."""
    T, B = frames.shape[:2]
    dev = frames.device
    sizes, offs, L = net.layer_sizes, net.offsets, net.n_layers
    bounds = [(offs[l] - net.n_inputs, offs[l] - net.n_inputs + sizes[l]) for l in range(1, L + 1)]
    thetas = [theta[a:b] for a, b in bounds]
    decays = [decay[a:b] for a, b in bounds]
    true = torch.ones((), dtype=torch.bool, device=dev)
    p_net = cfg.network_dropout if training else 0.0
    bins = max(sizes[:-1]) + 1 if histogram else 0
    stats = new_stats(T, B, dev, bins)
    if net.image:
        fan_out = net.tables(dev).fan_out
        fan_in = net.fan_in_per_neuron().to(dev).split(list(sizes[1:]))
    v = [frames.new_zeros(B, n) for n in sizes[1:]]
    outs = []
    for t in range(T):
        v = [vl * d for vl, d in zip(v, decays)]
        spikes = frames[t]
        for l in range(L):
            if l > 0:  # hidden layer l delivers its outboxes at forward step k = l
                if p_net > 0:
                    cols = torch.arange(offs[l], offs[l] + sizes[l], device=dev).expand(B, -1)
                    keep = rng.uniform(seed, rng.STREAM_NETWORK_DROPOUT, t, l, cols) >= p_net
                    stats["hidden_spikes"] += (spikes != 0).sum(1)
                    spikes = spikes * keep
                else:
                    stats["hidden_spikes"] += (spikes != 0).sum(1)
            nz = (spikes != 0).sum(1)
            if net.image:  # conv maps: border sources reach fewer targets
                stats["synops"][t] += ((spikes != 0) * fan_out[offs[l]:offs[l] + sizes[l]]).sum(1)
                current = net.maps[l].dense(spikes, weights[l])
            else:
                stats["synops"][t] += nz * sizes[l + 1]
                current = spikes @ weights[l].t()
            stats["spikes_processed"][t] += nz
            m = true.expand(B, sizes[l + 1])
            v[l], spikes, _ = lif(v[l], current, ~m, m, m, thetas[l], float(cfg.surrogate_steepness),
                                  cfg.detach_reset)
            if bins and net.image:  # whole fan-in, which differs at borders
                stats["currents_to_spike"] += torch.bincount(
                    fan_in[l].expand(B, -1)[spikes != 0].clamp(max=bins - 1), minlength=bins)
            elif bins:  # every neuron integrates its whole fan-in before its threshold
                stats["currents_to_spike"][sizes[l]] += (spikes != 0).sum()
        stats["forward_steps"][t] = L
        fired_out = (spikes != 0).any(1)
        stats["first_output_step"][t] = torch.where(fired_out, L, -1)
        stats["spikes_to_first_output"][t] = torch.where(fired_out, stats["spikes_processed"][t], -1)
        outs.append(v[-1] if cfg.readout == "potential" else spikes)
    stats["final_v"] = torch.cat(v, 1).detach()
    return torch.stack(outs), stats
