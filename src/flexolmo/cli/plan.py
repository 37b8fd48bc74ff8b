"""`flexolmo plan`: how much memory one device needs to train an expert on an anchor, from its config.json alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name,
                         help="per-device memory plan for training an expert (reads only config.json)",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="anchor directory (only its config.json is read)")
    parser.add_argument("--world-size", type=int, default=1, help="processes (devices) training together")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per micro-batch over all processes, as train-expert's --batch-size")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="compute dtype, as train-expert's --dtype")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2, as train-expert's --fsdp")
    parser.add_argument("--replicate-frozen", action="store_true",
                        help="with --fsdp: frozen weights replicated on every device, not sharded")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each layer in the backward pass, as train-expert's flag")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one device in GiB")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_table
    from flexolmo.training.memory_plan import GIB, PlanSettings, plan_for_anchor

    settings = PlanSettings(world_size=args.world_size, batch_size=args.batch_size, seq_len=args.seq_len,
                            dtype=args.dtype, fsdp=args.fsdp, replicate_frozen=args.replicate_frozen,
                            activation_checkpointing=args.activation_checkpointing,
                            gpu_memory_gb=args.gpu_memory_gb)
    plan = plan_for_anchor(Path(args.anchor), settings)
    rows = [[item, f"{size / GIB:.2f}"] for item, size in plan.items.items()]
    rows.append(["total", f"{plan.total / GIB:.2f}"])
    layout = "FSDP" + (", frozen weights replicated" if settings.replicate_frozen else "") if settings.fsdp else \
        ("DDP" if settings.world_size > 1 else "one device")
    print(f"{args.anchor}: {plan.shape.anchor_params / 1e9:.2f}B parameters, the owner's expert "
          f"{plan.shape.trainable_params / 1e9:.2f}B trainable")
    print(f"{settings.world_size} device(s), {layout}, {settings.batch_size // settings.world_size} x "
          f"{settings.seq_len} tokens per device, {settings.dtype}"
          + (", activation checkpointing" if settings.activation_checkpointing else ""))
    print_table("memory per device", ["item", "GiB"], rows)
    verdict = "fits" if plan.fits else "does NOT fit"
    print(f"{verdict}: {plan.total / GIB:.1f} GiB of {plan.usable / GIB:.1f} GiB usable "
          f"({settings.gpu_memory_gb:g} GiB less 10% kept free)")
    return 0
