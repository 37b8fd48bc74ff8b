"""What every subcommand shares, defined once: how `--help` looks, and the flags that mean the same thing on
every command (`--data FILE...`, `--exclude NAME...`, `--device`, `--dtype`, `--text-field`, optimisation)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """One look for every subcommand's `--help`: the description as written (examples keep their lines), the
    option help in one column, and each option's default, except where there is none to show (None, False, an
    empty list or string), so a default is never written by hand into a help string."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=120)

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or (isinstance(default, (str, list, tuple)) and not default):
            return action.help or ""
        return super()._get_help_string(action)


def add_command(subparsers, name: str, help: str, description: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser, formatted like every other one."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def add_data_flag(parser, help: str, metavar: str = "FILE") -> None:
    """`--data FILE...`: text files (.jsonl, .jsonl.gz, .parquet, .txt), on every command."""
    parser.add_argument("--data", nargs="+", required=True, metavar=metavar, help=help)


def add_data_flags(parser) -> None:
    """How records of the data files are read."""
    parser.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")


def add_exclude_flag(parser) -> None:
    """`--exclude NAME...`: experts masked by name, on every command that runs a merged model."""
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                        help="names of experts to mask (merged models; nothing is rewritten)")


def add_device_flags(parser, dtype_help: str = "dtype the model is loaded in") -> None:
    """`--device` and `--dtype`, on every command that loads a model."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help=dtype_help)


def torch_dtype(name: str):
    """The torch dtype named by `--dtype`."""
    import torch

    return getattr(torch, name)


def add_optim_flags(
    parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int, seq_len: int, weight_decay: float = 0.0
) -> None:
    """Optimisation flags, mirroring `flexolmo.training.loop.OptimConfig`."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help="sequences per micro-batch, over all processes under torchrun")
    group.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training sequence")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (warmup, then cosine)")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warmup steps; when not given, 10%% of --steps")
    group.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    group.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    group.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    group.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    add_device_flags(group, dtype_help="compute dtype; bfloat16 is mixed precision (float32 master weights and "
                     "optimizer state, bf16 matmuls, frozen weights stored in bf16)")
    group.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")


def optim_kwargs(args: argparse.Namespace) -> dict:
    """The OptimConfig fields from parsed flags."""
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10)
    return dict(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
        lr=args.lr, warmup_steps=warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, dtype=args.dtype,
    )


def path_list(values: list[str] | None) -> list[Path]:
    return [Path(value) for value in values or []]
