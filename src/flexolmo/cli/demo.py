"""`flexolmo demo`: five owners train experts apart, the coordinator merges them and tunes the router where
validation text says it helps, every merging baseline is measured, and each expert is withdrawn in turn; prints
the table and writes report.md, results.json and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_device_flags
from flexolmo.cli.config_flags import add_config_flags
from flexolmo.experiments.demo_config import DemoConfig

# The switches that are `DemoConfig` fields. --out, --data-dir and --expert-steps stay declared here: their
# defaults depend on --quick (`DemoConfig.quick_run`), which one flag default cannot say.
DEMO_FIELDS = ("quick", "ablation")


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="run the whole FlexOlmo story on the shipped anchor and corpora",
                         description=__doc__)
    add_config_flags(parser, DemoConfig, DEMO_FIELDS)
    parser.add_argument("--out", default=None,
                        help="output directory; when not given, runs/demo (runs/demo-quick with --quick)")
    parser.add_argument("--data-dir", default=None, help="shipped data directory; when not given, data/demo")
    parser.add_argument("--expert-steps", type=int, default=None,
                        help="optimizer steps per expert; when not given, the demo's own (60, or 3 with --quick)")
    add_device_flags(parser, dtype_help="dtype every model trains and runs in")
    parser.set_defaults(run=run)


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The `DemoConfig` the parsed flags describe: the quick run's own sizes with --quick."""
    overrides = {key: value for key, value in {
        "out": Path(args.out) if args.out else None,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "expert_steps": args.expert_steps,
    }.items() if value is not None}
    overrides.update(device=args.device, dtype=args.dtype, ablation=args.ablation)
    return DemoConfig.quick_run(**overrides) if args.quick else DemoConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import announce_output
    from flexolmo.experiments.demo import run_demo

    config = demo_config(args)
    run_demo(config)
    announce_output("report", config.out / "report.md")
    announce_output("results", config.out / "results.json")
    return 0
