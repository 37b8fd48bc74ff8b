"""`flexolmo tune-router`: the coordinator trains only the router rows of a merged model on the owners' proxies.

Proxy hashes are resolved against your public text; every router row (the public one included) is trained on
proxy documents mixed with public text at the model's own top-k; every other tensor is copied bit for bit into
the new checkpoint, which records what tuned it. Interrupted? Rerun the same command with --resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_data_flags, add_optim_flags, optim_kwargs, path_list
from flexolmo.cli.trust_flags import add_coordinator_flags, coordinator_trust


def register(subparsers, name: str) -> None:
    from flexolmo.coordinator.router_tuning import DEFAULT_LR, DEFAULT_STEPS

    parser = add_command(subparsers, name, help="tune a merged model's router rows on the owners' proxy documents",
                                   description=__doc__)
    parser.add_argument("--model", required=True, help="merged model directory")
    parser.add_argument("--public-data", nargs="+", required=True, metavar="FILE",
                        help="your public text: the proxies are looked up in it and it fills part of every batch")
    parser.add_argument("--proxies", nargs="+", required=True, help="the owners' proxy files (select-proxy)")
    parser.add_argument("--out", required=True, help="tuned model directory to write (must not exist)")
    parser.add_argument("--public-share", type=float, default=0.5,
                        help="share of each batch that is public text; the rest is proxy text")
    parser.add_argument("--z-loss", type=float, default=1e-3, help="router z-loss coefficient")
    add_data_flags(parser)
    add_coordinator_flags(parser, joining=False)
    add_optim_flags(parser, steps=DEFAULT_STEPS, lr=DEFAULT_LR, batch_size=8, seq_len=256)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.router_tuning import TuneConfig, tune_router
    from flexolmo.core.progress import announce_output, print_table
    from flexolmo.training.loop import OptimConfig

    config = TuneConfig(model=Path(args.model), public=path_list(args.public_data), proxies=path_list(args.proxies),
                        out=Path(args.out), public_share=args.public_share, z_loss_coef=args.z_loss,
                        text_field=args.text_field, optim=OptimConfig(**optim_kwargs(args)))
    metadata = tune_router(config, resume=args.resume, trust=coordinator_trust(args))
    record = metadata["router_tuning"][-1]
    print_table(f"router tuning of {config.model}", ["experts", "proxy documents", "steps", "first loss",
                                                     "last loss"],
                [[", ".join(record["tuned_experts"]), record["proxy_documents"], record["optim"]["steps"],
                  record["losses"][0], record["losses"][-1]]])
    announce_output("tuned model", config.out)
    return 0
