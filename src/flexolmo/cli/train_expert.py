"""`flexolmo train-expert`: a data owner trains its expert next to the frozen anchor and writes the package."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_data_flags, add_optim_flags, optim_kwargs, path_list


def register(subparsers, name: str) -> None:
    from flexolmo.router_init import DP_ROUTER_INIT, ROUTER_INITS

    parser = subparsers.add_parser(name, help="train an expert on your own data and write its package",
                                   description=__doc__)
    parser.add_argument("--anchor", required=True, help="the coordinator's anchor directory")
    parser.add_argument("--data", nargs="+", required=True, help="your training text files")
    parser.add_argument("--heldout", nargs="*", default=[], help="held-out files (default: hash split of --data)")
    parser.add_argument("--name", required=True, help="expert name (letters, digits, . _ -)")
    parser.add_argument("--out", required=True, help="package directory to write (must not exist)")
    add_data_flags(parser)
    method = parser.add_argument_group("method")
    method.add_argument("--router-init", default=None, choices=sorted([*ROUTER_INITS, DP_ROUTER_INIT]),
                        help="initialisation of your router row (default: mean_hidden; public under DP)")
    method.add_argument("--router-init-sequences", type=int, default=64, help="sequences averaged for the row")
    method.add_argument("--public-data", nargs="*", default=[],
                        help="public text mixed into your batches, instead of the anchor's public sample")
    method.add_argument("--public-share", type=float, default=None,
                        help="share of each batch that is public text, which teaches your router row where not to "
                             "win; unset: 0.5 when public text is available; 0 turns mixing off")
    method.add_argument("--negative-bias", action="store_true", help="learn a router bias <= 0 for the expert")
    method.add_argument("--z-loss", type=float, default=1e-3, help="router z-loss coefficient")
    method.add_argument("--eval-max-sequences", type=int, default=None, help="cap on held-out sequences scored")
    privacy = parser.add_argument_group("differential privacy (DP-SGD via Opacus)")
    privacy.add_argument("--dp-epsilon", type=float, default=None, help="train with DP-SGD to this epsilon")
    privacy.add_argument("--dp-delta", type=float, default=1e-5, help="DP delta (default 1e-5)")
    privacy.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-sample clipping norm")
    privacy.add_argument("--dp-router-noise", type=float, default=4.0,
                         help="noise multiplier of the dp_mean_hidden router row (default 4.0)")
    add_optim_flags(parser, steps=200, lr=1e-3, batch_size=8, seq_len=256)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.expert import ExpertConfig, train_expert
    from flexolmo.privacy import DPConfig
    from flexolmo.progress import print_table
    from flexolmo.training import OptimConfig, distributed_session

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
    )
    with distributed_session(config.optim.device) as device:
        config.optim.device = device
        manifest = train_expert(config, resume=args.resume)
    if not manifest:  # a torchrun rank other than 0: rank 0 reports
        return 0
    training = manifest["training"]
    print_table(f"expert {manifest['name']}", ["package", "tokens", "seconds", "held-out loss before",
                                                "held-out loss after", "bits/byte after"],
                [[str(config.out), f"{training['tokens']:,}", f"{training['seconds']:.0f}",
                  training["heldout_loss_before"], training["heldout_loss_after"],
                  training["heldout_bits_per_byte_after"]]])
    return 0
