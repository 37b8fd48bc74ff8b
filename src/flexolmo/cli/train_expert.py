"""`flexolmo train-expert`: a data owner trains its expert next to the frozen anchor and writes the package."""

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
    from flexolmo.model.router_init import DP_ROUTER_INIT, ROUTER_INITS

    parser = add_command(subparsers, name, help="train an expert on your own data and write its package",
                         description=__doc__)
    parser.add_argument("--anchor", required=True, help="the coordinator's anchor directory")
    add_data_flag(parser, help="your training text files")
    parser.add_argument("--heldout", nargs="*", default=[], metavar="FILE",
                        help="held-out text files; when not given, a hash split of --data")
    parser.add_argument("--name", required=True, help="expert name (letters, digits, . _ -)")
    parser.add_argument("--out", required=True, help="package directory to write (must not exist); your own "
                                                     "report goes beside it as OUT.owner.json")
    parser.add_argument("--sign-key", type=Path, default=None,
                        help="your private key (NAME.key from `flexolmo keygen`): sign the package")
    add_data_flags(parser)
    method = parser.add_argument_group("method")
    method.add_argument("--router-init", default=None, choices=sorted([*ROUTER_INITS, DP_ROUTER_INIT]),
                        help="initialisation of your router row; when not given, mean_hidden (public under DP)")
    method.add_argument("--router-init-sequences", type=int, default=64, help="sequences averaged for the row")
    method.add_argument("--public-data", nargs="*", default=[],
                        help="public text mixed into your batches, instead of the anchor's public sample")
    method.add_argument("--public-share", type=float, default=None,
                        help="share of each batch that is public text, which teaches your router row where not to "
                             "win; unset: 0.5 when public text is available; 0 turns mixing off")
    method.add_argument("--negative-bias", action="store_true", help="learn a router bias <= 0 for the expert")
    method.add_argument("--z-loss", type=float, default=1e-3, help="router z-loss coefficient")
    method.add_argument("--eval-max-sequences", type=int, default=DEFAULT_EVAL_MAX_SEQUENCES,
                        help="held-out sequences scored before and after training (the first ones)")
    privacy = parser.add_argument_group("differential privacy (DP-SGD via Opacus)")
    privacy.add_argument("--dp-epsilon", type=float, default=None, help="train with DP-SGD to this epsilon")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="DP delta")
    privacy.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-sample clipping norm")
    privacy.add_argument("--dp-router-noise", type=float, default=4.0,
                         help="noise multiplier of the dp_mean_hidden router row")
    scale = parser.add_argument_group("several devices (launch with torchrun; see `flexolmo plan`)")
    scale.add_argument("--fsdp", action="store_true",
                       help="shard the model, gradients and optimizer state over the processes (FSDP2)")
    scale.add_argument("--replicate-frozen", action="store_true",
                       help="with --fsdp: keep a full copy of the frozen anchor weights on every device "
                       "(less communication, more memory)")
    scale.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each decoder layer in the backward pass instead of storing its activations")
    add_optim_flags(parser, steps=200, lr=1e-3, batch_size=8, seq_len=256)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from flexolmo.core.progress import announce_output, print_table
    from flexolmo.core.world import distributed_session
    from flexolmo.owner.expert import ExpertConfig, train_expert
    from flexolmo.owner.manifest import owner_report_path
    from flexolmo.owner.privacy import DPConfig
    from flexolmo.training.distributed import ParallelConfig
    from flexolmo.training.loop import OptimConfig

    config = ExpertConfig(
        anchor=Path(args.anchor), data=path_list(args.data), heldout=path_list(args.heldout), name=args.name,
        out=Path(args.out), text_field=args.text_field, router_init=args.router_init,
        router_init_sequences=args.router_init_sequences, negative_bias=args.negative_bias,
        z_loss_coef=args.z_loss, eval_max_sequences=args.eval_max_sequences,
        public_data=path_list(args.public_data), public_share=args.public_share,
        dp=DPConfig(epsilon=args.dp_epsilon, delta=args.dp_delta, max_grad_norm=args.dp_max_grad_norm,
                    router_noise_multiplier=args.dp_router_noise)
        if args.dp_epsilon is not None else None,
        optim=OptimConfig(**optim_kwargs(args)),
        parallel=ParallelConfig(fsdp=args.fsdp, replicate_frozen=args.replicate_frozen,
                                activation_checkpointing=args.activation_checkpointing),
    )
    with distributed_session(config.optim.device, always=args.fsdp) as device:
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
