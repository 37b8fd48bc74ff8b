"""`flexolmo pretrain`: train a small dense OLMo-2 anchor and its tokenizer from scratch.

Every flag is a field of `PretrainConfig` (its model shape and optimisation included), with its default."""

from __future__ import annotations

import argparse

from flexolmo.cli.common import add_command, add_optim_flags, optim_config
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain
from flexolmo.core.progress import announce_output, print_table

PRETRAIN_FIELDS = ("data", "heldout", "out", "text_field", "heldout_fraction", "save_dtype", "eval_max_sequences")
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="train a small dense OLMo-2 anchor (and tokenizer) from scratch",
                         description=__doc__)
    add_config_flags(parser, PretrainConfig, PRETRAIN_FIELDS, required=("data", "out"))
    add_config_flags(parser.add_argument_group("model shape"), AnchorShape, SHAPE_FIELDS)
    add_optim_flags(parser, PretrainConfig.model_fields["optim"].get_default(call_default_factory=True))
    parser.set_defaults(run=run)


def pretrain_config(args: argparse.Namespace) -> PretrainConfig:
    """The `PretrainConfig` these flags describe."""
    return PretrainConfig(**config_values(args, PRETRAIN_FIELDS),
                          shape=AnchorShape(**config_values(args, SHAPE_FIELDS)), optim=optim_config(args))


def run(args: argparse.Namespace) -> int:
    config = pretrain_config(args)
    summary = pretrain(config, resume=args.resume)
    held = summary["heldout"]
    print_table("anchor", ["parameters", "final train loss", "held-out loss", "held-out bits/byte",
                           "held-out tokens"],
                [[f"{summary['parameters']:,}", summary["final_train_loss"], held["loss"], held["bits_per_byte"],
                  f"{held['tokens']:,}"]])
    announce_output("anchor", config.out)
    return 0
