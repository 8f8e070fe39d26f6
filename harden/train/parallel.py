"""Data-parallel training under DistributedDataParallel, adopted by a training loop in a few lines.

Every rank runs the same loop over the same global batches (the same seeded order); :class:`DataParallel`
gives each rank its share of every batch, wraps the module that computes the loss in DDP (gradients
all-reduced during backward) and weights each rank's loss so that the summed gradient is the gradient of the
whole batch's mean: the result is a single-process run's, within float rounding.  With one process the
module is used as it is and every weight is 1.

    dp = DataParallel(objective)                 # nn.Module whose forward returns the batch-mean loss (terms)
    for idx in batches:                           # identical on every rank
        rows, weight = dp.shard(idx)              # this rank's rows of the global batch, its loss weight
        loss = dp.module(x[rows], y[rows]) * weight
        loss.backward(); optimizer.step()
    totals = dp.sum(local_sums)                   # metrics all-reduced over the ranks

Every rank must call ``dp.module`` and ``backward`` for every batch (DDP's all-reduce is collective): a batch
with fewer rows than ranks gives the spare ranks one row at weight 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from harden.core.distributed import agree, all_reduce, world


class DataParallel:
    def __init__(self, module: nn.Module, device: str | torch.device = "cpu"):
        self.world = world()
        self.plain = module
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device = torch.device(device)
            ids = [device] if device.type == "cuda" else None
            # static_graph: every step uses the same parameters (a loss need not touch all of them), so DDP
            # learns which ones once instead of searching the autograd graph at every step.
            self.module = DDP(module, device_ids=ids, static_graph=True)
        else:
            self.module = module

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of the global batch ``idx`` (contiguous, sizes differing by at most one) and the
        weight of its batch-mean loss: ``size * rows / len(idx)``, so that DDP's average of the ranks' gradients
        is the whole batch's mean gradient."""
        span, weight = self.span(len(idx))
        return idx[span], weight

    def span(self, n: int) -> tuple[slice, float]:
        """The positions of this rank's rows in a global batch of ``n`` (what :meth:`shard` takes of it), and
        their loss weight: for tensors drawn per batch (noise) that must be cut as the batch is."""
        w = self.world
        if not w.distributed:
            return slice(0, n), 1.0
        sizes = [len(part) for part in torch.tensor_split(torch.arange(n), w.size)]
        start = sum(sizes[: w.rank])
        if sizes[w.rank] == 0:   # fewer rows than ranks: take part in the all-reduce with a zero gradient
            return slice(0, 1), 0.0
        return slice(start, start + sizes[w.rank]), w.size * sizes[w.rank] / n

    def share(self, idx: torch.Tensor) -> float:
        """This rank's share of the global batch (its rows over the batch's), for metrics summed with ``sum``."""
        rows, weight = self.shard(idx)
        return weight / self.world.size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce(tensor, "sum")

    def agree(self, flag: bool) -> bool:
        return agree(flag)
