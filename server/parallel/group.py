"""The collectives a tensor-parallel model runs, and nothing else.

A model layer holds a `TensorParallel` and calls it where partial results meet: `all_reduce` after a
row-parallel projection (o_proj, the MLP's down projection, the experts) and after the vocab-parallel
embedding; `gather_to_first` for the lm_head's logit slices (the first rank samples);
`broadcast_from_first` for the sampled tokens (every rank embeds them next step). Without a group
(one rank) each is the identity, so one code path serves both; a group of one rank still runs
them (the GPU tests use that to capture real NCCL calls in the decode graphs on one GPU).

On CUDA the group is NCCL's, and the collectives are issued on the current stream without a host
wait, so they are captured in the decode CUDA graphs like any kernel; on the CPU it is gloo's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None: one rank, no collectives

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def _first(self) -> int:
        """The global rank of this group's first member (collectives take global ranks)."""
        return dist.get_global_rank(self.group, 0)

    def all_reduce(self, x: Tensor) -> Tensor:
        """x summed over the group, in place."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_to_first(self, x: Tensor) -> Tensor | None:
        """Every rank's x [..., n] side by side, [..., size * n], on the first rank; None elsewhere."""
        if self.group is None:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=self._first(), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_from_first(self, x: Tensor) -> Tensor:
        """The first rank's x, into x on every rank (in place)."""
        if self.group is not None:
            dist.broadcast(x, src=self._first(), group=self.group)
        return x


SINGLE = TensorParallel()
