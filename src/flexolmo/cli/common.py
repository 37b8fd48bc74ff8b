"""Flags that several subcommands share, defined once."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_optim_flags(
    parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int, seq_len: int, weight_decay: float = 0.0
) -> None:
    """Optimisation flags, mirroring `flexolmo.training.OptimConfig`."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help="sequences per micro-batch, over all processes under torchrun")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training sequence")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (warmup, then cosine)")
    group.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 10%% of steps)")
    group.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    group.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    group.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    group.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    group.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="compute dtype; bfloat16 is mixed precision (float32 master weights and optimizer "
                       "state, bf16 matmuls, frozen weights stored in bf16)")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")


def optim_kwargs(args: argparse.Namespace) -> dict:
    """The OptimConfig fields from parsed flags."""
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    return dict(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup_steps=warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, dtype=args.dtype,
    )


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text (default: text)")


def path_list(values: list[str] | None) -> list[Path]:
    return [Path(value) for value in values or []]
