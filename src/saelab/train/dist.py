"""Data-parallel training over torch.distributed (torchrun): gloo on CPU, nccl on GPU (each rank on
cuda:LOCAL_RANK, its tensors there).

Each rank takes rows rank::world of every global batch. Losses are written as sums over
the rank's rows divided by global normalisers (total variance, token count), so summing
gradients across ranks gives exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from saelab.device import dist_backend


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch [batch, d] -> [~batch / world, d]."""
        return batch if self.world == 1 else batch[self.rank::self.world]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum_grads(self, params) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def from_env(device: torch.device | None = None) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process. The backend
    follows the device the tensors live on: nccl for cuda:LOCAL_RANK, gloo for the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    device = device or torch.device("cpu")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(dist_backend(device))
    return Dist(dist.get_rank(), dist.get_world_size())
