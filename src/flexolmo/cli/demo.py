"""`flexolmo demo`: five owners train experts apart, the coordinator merges them, every baseline is measured,
and each expert is withdrawn in turn; prints the table and writes report.md, results.json and plots."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers, name: str) -> None:
    parser = subparsers.add_parser(name, help="run the whole FlexOlmo story on the shipped anchor and corpora",
                                   description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3-minute smoke run (numbers not meaningful)")
    parser.add_argument("--out", default=None, help="output directory (default runs/demo or runs/demo-quick)")
    parser.add_argument("--data-dir", default=None, help="shipped data directory (default: data/demo)")
    parser.add_argument("--expert-steps", type=int, default=None, help="override steps per expert")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.demo import DemoConfig, run_demo

    overrides = {key: value for key, value in {
        "out": Path(args.out) if args.out else None,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "expert_steps": args.expert_steps,
    }.items() if value is not None}
    config = DemoConfig.quick_run(**overrides) if args.quick else DemoConfig(**overrides)
    run_demo(config)
    print(f"report: {config.out / 'report.md'}")
    return 0
