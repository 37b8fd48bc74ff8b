"""How the one training loop (`training.train`) spreads over processes: a strategy object it plugs in.

- `ReplicatedStrategy`: one process, or DDP under torchrun: every process holds the whole model, gradients of
  the trained tensors are averaged; rank 0 writes checkpoints (safetensors + optimizer state).
- `FullyShardedStrategy` (`--fsdp`): FSDP2 (`torch.distributed.fsdp.fully_shard`), each decoder layer a unit
  and then the root; the trained tensors, their gradients and AdamW state are sharded over the processes, and
  so are the frozen anchor weights unless `replicate_frozen`. Checkpoints go through
  `torch.distributed.checkpoint`: every rank writes its own shards, no rank gathers the model.

Both apply the same `precision.PrecisionPolicy` and, optionally, activation checkpointing per decoder layer.
The loop calls the strategy at fixed points (prepare, forward context, gradient clipping, checkpoint save and
load, gathering a trained tensor for the package); everything else (data order, schedule, accumulation, hooks)
stays the loop's.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from flexolmo.core.precision import PrecisionPolicy
from flexolmo.training.distributed.base import TrainingStrategy, enable_activation_checkpointing
from flexolmo.training.distributed.fsdp import FullyShardedStrategy
from flexolmo.training.distributed.replicated import ReplicatedStrategy

__all__ = ["FullyShardedStrategy", "ParallelConfig", "ReplicatedStrategy", "TrainingStrategy",
           "enable_activation_checkpointing", "make_strategy"]


class ParallelConfig(BaseModel):
    """How training is spread over devices; none of it changes the trained tensors (beyond float rounding)."""

    fsdp: bool = Field(False, description="shard the model, gradients and optimizer state with FSDP2")
    replicate_frozen: bool = Field(False, description="under FSDP, keep a full copy of the frozen anchor weights "
                                   "on every device instead of sharding them (less communication, more memory)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder layer's activations in the "
                                           "backward pass instead of keeping them")


def make_strategy(parallel: ParallelConfig, dtype: str) -> TrainingStrategy:
    """The strategy for these settings, with the precision policy of `--dtype`."""
    precision = PrecisionPolicy.from_name(dtype)
    if parallel.fsdp:
        return FullyShardedStrategy(precision, parallel.activation_checkpointing, parallel.replicate_frozen)
    return ReplicatedStrategy(precision, parallel.activation_checkpointing)
