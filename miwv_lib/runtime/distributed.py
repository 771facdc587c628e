"""Data-parallel scoring under ``torchrun`` or ``accelerate launch``: chunks are dealt round-robin, so every batch
(and so every number) is the one a single process would compute; rank 0 merges the ranks' partial files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk_number: int) -> bool:
        return chunk_number % self.world_size == self.rank


class DistributedSetupError(RuntimeError):
    """The environment names a process group that cannot be joined (WORLD_SIZE set by hand, without torchrun)."""


def init_from_env() -> Shard:
    """Join the process group that torchrun/accelerate describe in the environment (or none)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise DistributedSetupError(f"WORLD_SIZE={text!r} is not a number of processes; unset it, or use torchrun")
    if (world_size := int(text)) == 1:
        return Shard()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" then means this rank's GPU
        try:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        except ValueError as exc:  # torch: "... MASTER_ADDR expected, but not set" and the like
            raise DistributedSetupError(f"WORLD_SIZE={world_size}, but no process group to join ({exc}); start the "
                                        "ranks with torchrun or accelerate launch, or unset WORLD_SIZE") from None
    return Shard(rank=dist.get_rank(), world_size=dist.get_world_size())


def barrier(shard: Shard) -> None:
    if shard.world_size > 1:
        dist.barrier()


def from_main(shard: Shard, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object, exceptions included)."""
    if shard.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
