"""Multi-process training with torch.distributed: who am I, and the few collective operations we need.

``unetlab run FILE --nproc-per-node N`` relaunches itself with ``torch.distributed.run``; multi-node jobs
call ``torchrun ... -m unetlab run FILE`` directly. Backend: nccl on GPUs, gloo on CPUs. Rank 0 alone
talks to MLflow, writes checkpoints and validates; the others train their shard of every batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistContext", "current"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs, checkpoints and validates."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local process on CUDA; the given device otherwise."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def current() -> DistContext:
    """The context from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return DistContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))


def init(context: DistContext, device: torch.device) -> None:
    """Join the process group: nccl when the runs train on CUDA, gloo otherwise (CPU processes)."""
    if not context.enabled:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend=backend)


def shutdown(context: DistContext) -> None:
    """Leave the process group."""
    if context.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
