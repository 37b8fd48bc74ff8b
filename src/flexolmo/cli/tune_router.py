"""`flexolmo tune-router`: the coordinator trains only the router rows of a merged model on the owners' proxies.

Proxy hashes are resolved against your public text; every router row (the public one included) is trained on
proxy documents mixed with public text at the model's own top-k; every other tensor is copied bit for bit into
the new checkpoint, which records what tuned it. Interrupted? Rerun the same command with --resume. Every flag
but the trust flags is a field of `TuneConfig`, with its default.
"""

from __future__ import annotations

import argparse

from flexolmo.cli.common import add_command, add_optim_flags, optim_config
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.cli.trust_flags import add_coordinator_flags, coordinator_trust
from flexolmo.coordinator.router_tuning import TuneConfig, tune_router
from flexolmo.core.progress import announce_output, print_table

TUNE_FIELDS = ("model", "public", "proxies", "out", "public_share", "z_loss_coef", "text_field")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="tune a merged model's router rows on the owners' proxy documents",
                         description=__doc__)
    add_config_flags(parser, TuneConfig, TUNE_FIELDS, required=("model", "public", "proxies", "out"))
    add_coordinator_flags(parser, joining=False)
    add_optim_flags(parser, TuneConfig.model_fields["optim"].get_default(call_default_factory=True))
    parser.set_defaults(run=run)


def tune_config(args: argparse.Namespace) -> TuneConfig:
    """The `TuneConfig` these flags describe."""
    return TuneConfig(**config_values(args, TUNE_FIELDS), optim=optim_config(args))


def run(args: argparse.Namespace) -> int:
    config = tune_config(args)
    metadata = tune_router(config, resume=args.resume, trust=coordinator_trust(args))
    record = metadata["router_tuning"][-1]
    print_table(f"router tuning of {config.model}", ["experts", "proxy documents", "steps", "first loss",
                                                     "last loss"],
                [[", ".join(record["tuned_experts"]), record["proxy_documents"], record["optim"]["steps"],
                  record["losses"][0], record["losses"][-1]]])
    announce_output("tuned model", config.out)
    return 0
