"""`flexolmo pretrain`: train a small dense OLMo-2 anchor and its tokenizer from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_data_flag,
    add_data_flags,
    add_optim_flags,
    optim_kwargs,
    path_list,
)


def register(subparsers, name: str) -> None:
    from flexolmo.evaluation.scoring import DEFAULT_EVAL_MAX_SEQUENCES

    parser = add_command(subparsers, name, help="train a small dense OLMo-2 anchor (and tokenizer) from scratch",
                         description=__doc__)
    add_data_flag(parser, help="public training text files")
    parser.add_argument("--heldout", nargs="*", default=[], metavar="FILE",
                        help="held-out text files; when not given, a hash split of --data")
    parser.add_argument("--out", required=True, help="output model directory (must not exist)")
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the written weights (bfloat16 halves the size)")
    parser.add_argument("--eval-max-sequences", type=int, default=DEFAULT_EVAL_MAX_SEQUENCES,
                        help="held-out sequences scored after training (the first ones of the held-out split)")
    add_data_flags(parser)
    shape = parser.add_argument_group("model shape")
    shape.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, special tokens included")
    shape.add_argument("--hidden-size", type=int, default=256, help="model width (d_model)")
    shape.add_argument("--layers", type=int, default=6, help="decoder layers")
    shape.add_argument("--heads", type=int, default=8, help="attention heads (must divide --hidden-size)")
    shape.add_argument("--intermediate-size", type=int, default=1024, help="SwiGLU hidden width of each FFN")
    add_optim_flags(parser, steps=1000, lr=3e-3, batch_size=16, seq_len=256, weight_decay=0.1)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain
    from flexolmo.core.progress import announce_output, print_table
    from flexolmo.training.loop import OptimConfig

    config = PretrainConfig(
        data=path_list(args.data),
        heldout=path_list(args.heldout),
        out=Path(args.out),
        text_field=args.text_field,
        save_dtype=args.save_dtype,
        eval_max_sequences=args.eval_max_sequences,
        shape=AnchorShape(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
            num_heads=args.heads, intermediate_size=args.intermediate_size,
        ),
        optim=OptimConfig(**optim_kwargs(args)),
    )
    summary = pretrain(config, resume=args.resume)
    held = summary["heldout"]
    print_table("anchor", ["parameters", "final train loss", "held-out loss", "held-out bits/byte",
                           "held-out tokens"],
                [[f"{summary['parameters']:,}", summary["final_train_loss"], held["loss"], held["bits_per_byte"],
                  f"{held['tokens']:,}"]])
    announce_output("anchor", config.out)
    return 0
