"""One process, or DDP under torchrun: every process holds the whole model.

DDP averages the gradients of the trained tensors only (frozen tensors get no gradient hooks). Rank 0 writes
the checkpoint: the trained tensors (safetensors), the optimizer state and the RNG state.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from flexolmo.core.errors import CheckpointError
from flexolmo.core.fileio import atomic_write_json, save_torch
from flexolmo.core.precision import PrecisionPolicy
from flexolmo.training.distributed.base import NamedParams, enable_activation_checkpointing
from flexolmo.training.run_state import STATE_FILE, checkpoint_dir, publish_checkpoint, staging_dir

TRAINABLE_FILE = "trainable.safetensors"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ReplicatedStrategy:
    """The whole model on every process; `PrecisionPolicy` through autocast."""

    checkpoint_format = "replicated"

    def __init__(self, precision: PrecisionPolicy | None = None, activation_checkpointing: bool = False):
        self.precision = precision or PrecisionPolicy()
        self.activation_checkpointing = activation_checkpointing

    def prepare(self, model: torch.nn.Module, named_params: NamedParams, device: str
                ) -> tuple[torch.nn.Module, NamedParams]:
        self.precision.cast_parameters(model, [param for _, param in named_params])
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if _world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[torch.device(device).index]
                                            if device.startswith("cuda") else None)
        return model, list(named_params)

    def forward_context(self, device: str) -> contextlib.AbstractContextManager:
        return self.precision.autocast(device)

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def save_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer, state: dict) -> None:
        from safetensors.torch import save_file

        if _world()[0] == 0:
            staging = staging_dir(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            save_file({name: param.detach().cpu().contiguous() for name, param in named_params},
                      str(staging / TRAINABLE_FILE))
            save_torch(optimizer.state_dict(), staging / "optimizer.pt")
            save_torch(torch.get_rng_state(), staging / "rng.pt")
            atomic_write_json(staging / STATE_FILE, state)  # written last: it marks the checkpoint complete
            publish_checkpoint(run_dir)
        if _world()[1] > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from

    def load_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer) -> dict:
        from safetensors.torch import load_file

        directory = checkpoint_dir(run_dir)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
            tensors = load_file(str(directory / TRAINABLE_FILE))
            optimizer_state = torch.load(directory / "optimizer.pt", weights_only=True)
            rng_state = torch.load(directory / "rng.pt", weights_only=True)
            with torch.no_grad():
                for name, param in named_params:
                    param.copy_(tensors[name])
            optimizer.load_state_dict(optimizer_state)
        except Exception as error:  # any unreadable or mismatched piece means the checkpoint cannot be trusted
            raise CheckpointError(f"{directory}: unreadable checkpoint ({error}); delete it to start over") from None
        torch.set_rng_state(rng_state)
        return state

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.detach().cpu() if _world()[0] == 0 else None
