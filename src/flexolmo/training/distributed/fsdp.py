"""`--fsdp`: FSDP2 sharding of the owner's model, with sharded checkpoints.

Each decoder layer is one FSDP unit, then the root (embeddings, final norm, LM head): in the forward and
backward pass a process gathers one layer's weights at a time (and prefetches the next), so its memory holds
1/N of the model plus about two layers. The trained tensors (the owner's expert and router row), their
gradients and their AdamW state are sharded 1/N; so are the frozen anchor weights, unless `replicate_frozen`
keeps a full copy of them on every process (they are never updated, so they need no gradient reduction; this
trades their memory for the communication of gathering them twice per step).

The public and owner router rows are separate parameters, so sharding never mixes a frozen row with a trained
one (gradient masking of one shared tensor would not survive sharding, and AdamW's weight decay would still
move a masked row).

Mixed precision is `precision.PrecisionPolicy` as FSDP2's `MixedPrecisionPolicy`: master weights float32,
gathered weights cast to bf16 for compute, gradients reduce-scattered in float32.

Checkpoints: `torch.distributed.checkpoint` writes each rank's shards of the trained tensors and the optimizer
state into one staging directory (no rank gathers anything), rank 0 adds the run state and swaps it in. DCP
reshards on load, so a run may resume with another number of processes. Across nodes, the work directory
must be on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from flexolmo.core.errors import CheckpointError, FlexOlmoError
from flexolmo.core.fileio import atomic_write_json
from flexolmo.core.precision import PrecisionPolicy
from flexolmo.model.moe import decoder_layers
from flexolmo.training.distributed.base import NamedParams, enable_activation_checkpointing
from flexolmo.training.run_state import (
    STATE_FILE,
    checkpoint_dir,
    publish_checkpoint,
    read_state,
    staging_dir,
)


class FullyShardedStrategy:
    """FSDP2 over every process of the torchrun job (one process also works: the NCCL path on one GPU)."""

    checkpoint_format = "sharded"

    def __init__(self, precision: PrecisionPolicy | None = None, activation_checkpointing: bool = False,
                 replicate_frozen: bool = False):
        self.precision = precision or PrecisionPolicy()
        self.activation_checkpointing = activation_checkpointing
        self.replicate_frozen = replicate_frozen

    def prepare(self, model: torch.nn.Module, named_params: NamedParams, device: str
                ) -> tuple[torch.nn.Module, NamedParams]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if torch.__version__ < "2.7":
            raise FlexOlmoError(f"--fsdp needs torch >= 2.7 (FSDP2's fully_shard with ignored_params); this is "
                                f"torch {torch.__version__}: upgrade torch or train without --fsdp")
        if not dist.is_initialized():
            raise FlexOlmoError("--fsdp needs a torch.distributed process group; launch with torchrun")
        trained = {id(param) for _, param in named_params}
        self.precision.cast_parameters(model, [param for _, param in named_params])
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)  # before sharding, so FSDP's hooks stay outside the recompute
        frozen = {param for param in model.parameters() if id(param) not in trained}
        ignored = frozen if self.replicate_frozen else None
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        policy = self.precision.fsdp_policy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored)
        fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
        with torch.no_grad():  # FSDP moves what it shards to the device; the replicated frozen weights move here
            for param in ignored or ():
                param.data = param.data.to(device)
            for buffer in model.buffers():
                buffer.data = buffer.data.to(device)
        names = {name for name, _ in named_params}
        return model, [(name, param) for name, param in model.named_parameters() if name in names]

    def forward_context(self, device: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 casts the gathered weights itself

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm of sharded gradients is reduced over ranks

    @staticmethod
    def _state_dict(model: torch.nn.Module, named_params: NamedParams, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {"trainable": dict(named_params), "optimizer": get_optimizer_state_dict(model, optimizer)}

    def save_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        staging = staging_dir(run_dir)
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._state_dict(model, named_params, optimizer), checkpoint_id=str(staging))
        if dist.get_rank() == 0:  # dcp.save returns once every rank's shards and the metadata are written
            atomic_write_json(staging / STATE_FILE, state)
            publish_checkpoint(run_dir)
        dist.barrier()

    def load_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        directory = checkpoint_dir(run_dir)
        state = read_state(run_dir)
        loaded = self._state_dict(model, named_params, optimizer)
        try:
            dcp.load(loaded, checkpoint_id=str(directory))  # in place, each rank reading its own shards
            set_optimizer_state_dict(model, optimizer, loaded["optimizer"])
        except Exception as error:  # any unreadable or mismatched piece means the checkpoint cannot be trusted
            raise CheckpointError(f"{directory}: unreadable sharded checkpoint ({error}); delete it to start "
                                  "over") from None
        return state

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        return full.detach().cpu() if dist.get_rank() == 0 else None
