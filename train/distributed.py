"""torchrun plumbing: process group from torchrun's env vars, rank-0 printing, collectives (no-ops in a plain run)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def setup(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """Return (rank, local_rank, world_size, device); joins NCCL (GPU) or gloo (CPU) under torchrun."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    return rank, local_rank, world, target


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (it must live on the process group's device) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small Python objects: RNG states, flags), in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
