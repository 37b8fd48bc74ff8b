"""`flexolmo plan`: how much memory one device needs to train an expert on an anchor, from its config.json alone.

The batch size, sequence length and dtype default to train-expert's own (`ExpertConfig`), so a plan without
flags is the plan of `flexolmo train-expert` without flags; the parallel flags are train-expert's too."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.core.progress import print_table
from flexolmo.training.memory_plan import GIB, PlanSettings, plan_for_anchor

PLAN_FIELDS = ("world_size", "batch_size", "seq_len", "dtype", "fsdp", "replicate_frozen",
               "activation_checkpointing", "gpu_memory_gb")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name,
                         help="per-device memory plan for training an expert (reads only config.json)",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory (only its config.json is read)")
    add_config_flags(parser, PlanSettings, PLAN_FIELDS)
    parser.set_defaults(run=run)


def _layout(settings: PlanSettings) -> str:
    if settings.fsdp:
        return "FSDP" + (", frozen weights replicated" if settings.replicate_frozen else "")
    return "DDP" if settings.world_size > 1 else "one device"


def run(args: argparse.Namespace) -> int:
    settings = PlanSettings(**config_values(args, PLAN_FIELDS))
    plan = plan_for_anchor(Path(args.anchor), settings)
    rows = [[item, f"{size / GIB:.2f}"] for item, size in plan.items.items()]
    rows.append(["total", f"{plan.total / GIB:.2f}"])
    print(f"{args.anchor}: {plan.shape.anchor_params / 1e9:.2f}B parameters, the owner's expert "
          f"{plan.shape.trainable_params / 1e9:.2f}B trainable")
    print(f"{settings.world_size} device(s), {_layout(settings)}, {settings.batch_size // settings.world_size} x "
          f"{settings.seq_len} tokens per device, {settings.dtype}"
          + (", activation checkpointing" if settings.activation_checkpointing else ""))
    print_table("memory per device", ["item", "GiB"], rows)
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"{verdict}: {plan.total / GIB:.1f} GiB of {plan.usable / GIB:.1f} GiB usable "
          f"({settings.gpu_memory_gb:g} GiB less 10% kept free)")
    return 0
