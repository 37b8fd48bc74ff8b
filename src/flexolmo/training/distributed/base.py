"""The interface between the training loop and a way of spreading it over processes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.precision import PrecisionPolicy

NamedParams = list[tuple[str, torch.nn.Parameter]]


class TrainingStrategy(Protocol):
    """What `training.train` asks of a strategy. `checkpoint_format` is part of a run's identity: a checkpoint
    is only resumed by a strategy that writes the same format."""

    checkpoint_format: str
    precision: PrecisionPolicy

    def prepare(self, model: torch.nn.Module, named_params: NamedParams, device: str
                ) -> tuple[torch.nn.Module, NamedParams]:
        """Cast to the precision policy and wrap; returns the module to call and the trained parameters (which
        a sharding strategy replaces by sharded ones, under the same names)."""
        ...

    def forward_context(self, device: str) -> contextlib.AbstractContextManager: ...

    def clip_grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> None: ...

    def save_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer, state: dict) -> None: ...

    def load_checkpoint(self, run_dir: Path, model: torch.nn.Module, named_params: NamedParams,
                        optimizer: torch.optim.Optimizer) -> dict:
        """Restore the trained tensors and optimizer state in place; return the saved `state`."""
        ...

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The whole of one trained tensor on rank 0 (on the CPU), None on the other ranks. Every rank calls it
        for the same tensors in the same order."""
        ...


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer in the backward pass (transformers' own per-layer checkpointing,
    non-reentrant, which keeps FSDP2's hooks outside the recomputed region)."""
    if not hasattr(model, "activation_checkpointing_enable"):
        raise FlexOlmoError("activation checkpointing needs a transformers model; this one is "
                            f"{type(model).__name__}")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
