"""Data-parallel pretraining over the processes ``torchrun`` starts (gloo on CPU, nccl on CUDA).

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them (or with ``WORLD_SIZE=1``) the :class:`Group` is one process and every method
here does nothing. With them, every rank builds the same model from the same seed (and takes
rank 0's weights, to be sure), draws the same batch order, and keeps its share of each global
batch's rows: rows ``rank, rank + world, ...``, as ``DistributedSampler`` strides. Each rank
weighs its mean loss by its share of the rows before backpropagating, and the gradients are
summed across ranks, so one step is the one-process step on the global batch, up to the order
of floating-point sums. Validation sums are reduced the same way. Rank 0 alone writes the
checkpoint and logs.

We do not wrap the model in ``DistributedDataParallel``: pretraining calls the model through
:func:`models.online.rollout` as well as ``forward``, and DDP hooks its reduction on
``forward``. One flat all-reduce per step is all the models here need (they are small).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Group", "join"]


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes the checkpoint and logs progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, requested: str) -> torch.device:
        """``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) when there are several ranks."""
        device = torch.device(requested)
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (strided, as ``DistributedSampler``)."""
        return rows[self.rank :: self.world] if self.active else rows

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over the ranks (float64)."""
        if not self.active:
            return values
        buffer = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(buffer)
        return buffer.tolist()

    def each(self, value: int, device: torch.device) -> list[int]:
        """Every rank's ``value``, in rank order."""
        values = [0.0] * self.world
        values[self.rank] = value
        return [round(v) for v in self.sum(values, device)]

    def sum_gradients(self, params: list[nn.Parameter], loss: float) -> float:
        """Sum every parameter's gradient over the ranks (a missing gradient counts as zero),
        in one flat float64 buffer that also carries ``loss``; returns the summed loss."""
        if not self.active:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).double() for g in grads] + [grads[0].new_tensor([loss]).double()])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        return float(flat[-1])

    def broadcast_weights(self, model: nn.Module) -> None:
        """Every rank starts from rank 0's weights and buffers."""
        if self.active:
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def leave(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def join(requested_device: str) -> Group:
    """The group ``torchrun``'s environment describes, its process group initialised; a
    one-process group without that environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    group = Group(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = group.device(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return group
