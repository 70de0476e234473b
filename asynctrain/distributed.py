"""What `fit` and `evaluate` need for a run over several processes (torchrun).

    dist = Distributed.from_env("cuda")          # WORLD_SIZE / RANK / LOCAL_RANK of torchrun
    fit(snn, loader, epochs, lr, distributed=dist)   # loader with a DistributedSampler
    results = dist.evaluate(snn, shard_loader, ["layered", "RS:K=64"])   # every rank

Each process trains on its shard of every batch (a `DistributedSampler`, whose epoch
`fit` sets, so the shuffle is the same whether or not the run was resumed); after the
backward the gradients are averaged over the processes (one all-reduce per parameter,
the sum DistributedDataParallel computes, without wrapping the module), so every
process takes the same optimizer step and the weights stay equal (`weight_spread`
checks it). Only rank 0 writes checkpoints, logs and progress bars. A non-finite loss
on one rank stops every rank at the same batch (the check is agreed on, so no rank is
left waiting in an all-reduce). Evaluation: each rank runs its shard, rank 0 merges
the per-sample results (`merge_results`), so the metrics cover every test sample once.

With one process (``WORLD_SIZE`` unset or 1) every method is a no-op and nothing of
``torch.distributed`` is initialised.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .evaluate import ExecutionResult, evaluate

__all__ = ["Distributed", "merge_results"]


@dataclass
class Distributed:
    """Rank and world size of this process; `device` holds the collectives' tensors."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def lead(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> "Distributed":
        """From torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); joins
        the process group (nccl for CUDA, gloo for CPU) when there are several ranks.
        ``device="cuda"`` picks the local rank's GPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        device = torch.device(device)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local if device.index is None else device.index)
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # --- collectives (no-ops for one process) --------------------------------------
    def all_sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` holds on some rank."""
        return self.all_sum([float(flag)])[0] > 0 if self.world > 1 else bool(flag)

    def broadcast_(self, params: Iterable[torch.Tensor]) -> None:
        """Rank 0's values into every rank's `params` (the start of a run)."""
        if self.world > 1:
            for p in params:
                dist.broadcast(p.data, 0)

    def average_gradients_(self, params: Iterable[torch.Tensor]) -> None:
        """Each gradient becomes the mean over the ranks (after the backward)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def weight_spread(self, params: Iterable[torch.Tensor]) -> float:
        """Largest difference between any rank's weights and rank 0's (0.0 when the
        ranks agree, as they must)."""
        flat = torch.cat([p.detach().reshape(-1) for p in params]).to(self.device)
        if self.world == 1:
            return 0.0
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        return max(float((g - gathered[0]).abs().max()) for g in gathered)

    def evaluate(self, snn: Any, loader: Iterable, executions: Sequence[str], **kw: Any
                 ) -> dict[str, ExecutionResult] | None:
        """`asynctrain.evaluate.evaluate` on this rank's shard; rank 0 gets the merged
        results over every rank, the others None."""
        local = evaluate(snn, loader, executions, **kw)
        if self.world == 1:
            return local
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)
        if not self.lead:
            return None
        return {name: merge_results([g[name] for g in gathered]) for name in local}


def merge_results(parts: Sequence[ExecutionResult]) -> ExecutionResult:
    """One `ExecutionResult` over the samples of `parts` (one execution evaluated on
    disjoint shards): means weighted by samples, the mean first output step by the
    passes that had one, histograms summed, per-sample lists concatenated."""
    parts = [p for p in parts if p.samples]
    if len(parts) == 1:
        return parts[0]
    n = np.array([p.samples for p in parts], dtype=np.float64)

    def mean(key: str, weights: np.ndarray = n) -> float:
        return float(np.average([getattr(p, key) for p in parts], weights=weights))

    reached = n * np.array([p.passes_with_output for p in parts])
    first = float(np.average([p.first_output_step for p in parts], weights=reached)) \
        if reached.sum() else float("nan")
    width = max(len(p.currents_to_spike) for p in parts)
    hist = np.zeros(width, dtype=np.int64)
    for p in parts:
        hist[:len(p.currents_to_spike)] += np.asarray(p.currents_to_spike, dtype=np.int64)
    curve = {k: float(np.average([p.accuracy_vs_steps_after_output[k] for p in parts], weights=n))
             for k in parts[0].accuracy_vs_steps_after_output}
    per = {k: [v for p in parts for v in p.per_sample[k]] for k in parts[0].per_sample}
    return dataclasses.replace(
        parts[0], samples=int(n.sum()), accuracy=mean("accuracy"), density=mean("density"),
        synops=mean("synops"), energy=mean("energy"), latency_steps=mean("latency_steps"),
        latency_spikes=mean("latency_spikes"), first_output_step=first,
        passes_with_output=mean("passes_with_output"),
        capped_passes=sum(p.capped_passes for p in parts), currents_to_spike=hist.tolist(),
        accuracy_vs_steps_after_output=curve, per_sample=per)
