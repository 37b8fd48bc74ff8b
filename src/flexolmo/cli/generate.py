"""`flexolmo generate`: continue a prompt with any model flexolmo writes, optionally without some experts.

Prints the prompt, then the continuation, each under its own label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_device_flags,
    add_exclude_flag,
    add_router_bias_flag,
    torch_dtype,
    trusted_keys,
)
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.model.runtime import GenerationSettings

GENERATION_FIELDS = ("max_new_tokens", "temperature", "seed")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="generate text from a model", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    add_exclude_flag(parser)
    add_router_bias_flag(parser)
    add_config_flags(parser, GenerationSettings, GENERATION_FIELDS)
    add_device_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_generation
    from flexolmo.model.runtime import generate_text, load_model

    loaded = load_model(Path(args.model), exclude=args.exclude, dtype=torch_dtype(args.dtype), device=args.device,
                        router_bias=args.router_bias, trusted_keys=trusted_keys(args))
    continuation = generate_text(loaded, args.prompt, generation_settings(args))
    print_generation(args.prompt, continuation)
    return 0


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The `GenerationSettings` the parsed flags describe."""
    return GenerationSettings(**config_values(args, GENERATION_FIELDS))
