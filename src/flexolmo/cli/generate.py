"""`flexolmo generate`: continue a prompt with any model flexolmo writes, optionally without some experts."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="generate text from a model", description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (dense or merged)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--exclude", nargs="*", default=[], help="experts to mask (merged models)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.runtime import generate_text, load_model

    loaded = load_model(Path(args.model), exclude=args.exclude, device=args.device)
    print(generate_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.seed))
    return 0
