"""Mixed precision: one policy that every training path (one process, DDP, FSDP2) applies the same way.

`--dtype bfloat16` means standard mixed precision, not bf16 parameters:
- trainable parameters (the master weights) and their AdamW state stay float32, so an update smaller than
  bf16's resolution (about 1/256 of a weight's size) still lands; updating bf16 weights in place lost it
  (at lr 1e-4, one step left 54% of an expert's weights bit-unchanged);
- matrix multiplications run in bf16: `torch.autocast` in one process and under DDP, FSDP2's
  `MixedPrecisionPolicy(param_dtype=bf16)` under `--fsdp` (it casts the gathered weights once per layer);
- gradients are reduced across processes in float32;
- frozen weights (the anchor's shared tensors, the public expert and router row) are stored in bf16: they are
  never updated, and a bf16 matmul rounds them to bf16 anyway, so storing them in float32 only costs memory.

`--dtype float32` is plain float32 everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from flexolmo.core.errors import FlexOlmoError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a `--dtype` value, or a one-line error listing the accepted ones."""
    if name not in DTYPES:
        raise FlexOlmoError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which dtype each kind of tensor lives and computes in."""

    compute: torch.dtype = torch.float32
    master: torch.dtype = torch.float32  # trainable weights and optimizer state
    reduce: torch.dtype = torch.float32  # gradients while they are averaged across processes

    @classmethod
    def from_name(cls, name: str) -> PrecisionPolicy:
        return cls(compute=dtype_from_name(name))

    @property
    def frozen(self) -> torch.dtype:
        """Frozen weights are stored in the compute dtype."""
        return self.compute

    @property
    def mixed(self) -> bool:
        return self.compute != self.master

    @torch.no_grad()
    def cast_parameters(self, model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter]) -> None:
        """Trainable parameters to the master dtype, every other floating-point parameter to the frozen dtype.

        Casts in place (`param.data`), so references held by callers stay valid."""
        trainable_ids = {id(param) for param in trainable}
        for param in model.parameters():
            if not param.is_floating_point():
                continue
            target = self.master if id(param) in trainable_ids else self.frozen
            if param.dtype != target:
                param.data = param.data.to(target)

    def autocast(self, device: str) -> contextlib.AbstractContextManager:
        """The forward-pass context of the one-process and DDP paths: bf16 autocast, or nothing in float32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self.compute)

    def fsdp_policy(self):
        """The same policy for FSDP2: gathered weights cast to the compute dtype, gradients reduced in float32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute if self.mixed else None, reduce_dtype=self.reduce)
