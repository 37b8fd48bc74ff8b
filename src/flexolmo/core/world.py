"""Ranks of a distributed run: who this process is, joining and leaving the process group, and the helpers
that let rank 0 go first or share its values. The ground every layer that runs under torchrun builds on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a torch.distributed process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


@contextmanager
def distributed_session(device: str, always: bool = False) -> Iterator[str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and yield this rank's device.

    NCCL on CUDA (one GPU per rank, by LOCAL_RANK), gloo on CPU. Without torchrun this yields `device` and does
    nothing else, so every command runs unchanged in one process; `always` (FSDP, which needs a process group
    even alone) then starts a group of one.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (always and "MASTER_ADDR" in os.environ)
    if dist.is_initialized() or not (launched or always):
        yield device
        return
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if launched:
        dist.init_process_group(backend=backend)
    else:  # one process outside torchrun: an in-memory rendezvous
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it: work that writes a shared cache (tokenization) is then
    done once, and the other ranks read it instead of racing to write it too."""
    rank, world_size = world()
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


def broadcast_from_main(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Rank 0's values of `tensors` on every rank (unchanged in one process): state computed on each rank that
    must be identical before the model is sharded, since FSDP, unlike DDP, does not broadcast it."""
    if world()[1] == 1:
        return tensors
    shared = []
    for tensor in tensors:
        tensor = tensor.detach().to(device).contiguous()
        dist.broadcast(tensor, src=0)
        shared.append(tensor)
    return shared
