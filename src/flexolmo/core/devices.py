"""Checking a requested torch device before any work starts, so that a typo or a CPU-only torch build ends in
one line naming what is available, not in a traceback after the model has been read."""

from __future__ import annotations

from flexolmo.core.errors import DeviceError


def check_device(name: str) -> str:
    """`name` if torch can place tensors there on this machine, else a DeviceError saying what to use."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                      else "no CUDA GPU is visible")
            raise DeviceError(f"--device {name}: {reason} (torch {torch.__version__}); use --device cpu, or "
                              "install the torch build for your CUDA driver")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
        return name
    if device.type == "mps" and torch.backends.mps.is_available():
        return name
    raise DeviceError(f"--device {name}: not available here; use cpu or cuda")
