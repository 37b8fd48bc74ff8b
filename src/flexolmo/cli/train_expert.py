"""`flexolmo train-expert`: a data owner trains its expert next to the frozen anchor and writes the package.

Every flag below is a field of `ExpertConfig` (or of its optimisation, privacy and parallel configs), with the
config's own default and description."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexolmo.cli.common import add_command, add_optim_flags, optim_config
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.core.progress import announce_output, print_table
from flexolmo.core.world import distributed_session
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.manifest import owner_report_path
from flexolmo.owner.privacy import DPConfig
from flexolmo.training.distributed import ParallelConfig

EXPERT_FIELDS = ("anchor", "data", "heldout", "name", "out", "text_field", "heldout_fraction")
METHOD_FIELDS = ("router_init", "router_init_sequences", "router_lr_scale", "public_data", "public_share",
                 "negative_bias", "negative_bias_start", "z_loss_coef", "eval_max_sequences")
DP_FIELDS = ("epsilon", "delta", "max_grad_norm", "router_noise_multiplier")
PARALLEL_FIELDS = ("fsdp", "replicate_frozen", "activation_checkpointing")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="train an expert on your own data and write its package",
                         description=__doc__)
    add_config_flags(parser, ExpertConfig, EXPERT_FIELDS, required=("anchor", "data", "name", "out"))
    parser.add_argument("--sign-key", type=Path, default=None,
                        help="your private key (NAME.key from `flexolmo keygen`): sign the package")
    add_config_flags(parser.add_argument_group("method"), ExpertConfig, METHOD_FIELDS)
    add_config_flags(parser.add_argument_group("differential privacy (DP-SGD via Opacus; on with --dp-epsilon)"),
                     DPConfig, DP_FIELDS, prefix="dp_")
    add_config_flags(parser.add_argument_group("several devices (launch with torchrun; see `flexolmo plan`)"),
                     ParallelConfig, PARALLEL_FIELDS)
    add_optim_flags(parser, ExpertConfig.model_fields["optim"].get_default(call_default_factory=True))
    parser.set_defaults(run=run)


def expert_config(args: argparse.Namespace) -> ExpertConfig:
    """The `ExpertConfig` these flags describe."""
    dp = DPConfig(**config_values(args, DP_FIELDS, prefix="dp_")) if args.dp_epsilon is not None else None
    return ExpertConfig(**config_values(args, EXPERT_FIELDS), **config_values(args, METHOD_FIELDS), dp=dp,
                        optim=optim_config(args), parallel=ParallelConfig(**config_values(args, PARALLEL_FIELDS)))


def run(args: argparse.Namespace) -> int:
    config = expert_config(args)
    with distributed_session(config.optim.device, always=config.parallel.fsdp) as device:
        config.optim.device = device
        manifest = train_expert(config, resume=args.resume, sign_key=args.sign_key)
    if not manifest:  # a torchrun rank other than 0: rank 0 reports
        return 0
    report = json.loads(owner_report_path(config.out).read_text())
    training = report["training"]
    print_table(f"expert {manifest['name']}", ["tokens", "seconds", "held-out loss before", "held-out loss after",
                                                "bits/byte after"],
                [[f"{training['tokens']:,}", f"{training['seconds']:.0f}", training["heldout_loss_before"],
                  training["heldout_loss_after"], training["heldout_bits_per_byte_after"]]])
    announce_output("expert package (send it to the coordinator)", config.out)
    announce_output("your report (keep it: it is not part of the package)", owner_report_path(config.out))
    return 0
