"""`flexolmo`: a thin command line over the library. One module per subcommand; each parses flags, calls one
library function and prints the result. Library errors become one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Subcommand name -> module in this package; the order is the order `--help` lists them.
COMMANDS = {
    "pretrain": "pretrain",
    "import-anchor": "import_anchor",
    "init-router": "init_router",
    "train-expert": "train_expert",
    "plan": "plan",
    "keygen": "keygen",
    "inspect": "inspect",
    "sign": "sign",
    "verify": "verify",
    "merge": "merge",
    "add": "add",
    "remove": "remove",
    "history": "history",
    "select-proxy": "select_proxy",
    "tune-router": "tune_router",
    "generate": "generate",
    "serve": "serve",
    "eval": "evaluate",
    "eval-tasks": "eval_tasks",
    "audit-extraction": "audit",
    "demo": "demo",
    "data": "data",
    "coordinator": "coordinator",
    "submit": "submit",
    "withdraw": "withdraw",
    "status": "status",
}


class _OneLineHelp(argparse.HelpFormatter):
    """Wide enough that every subcommand's help fits on its own line. argparse sizes the help column from the
    top-level flags only, so the longest subcommand name is reserved up front."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=120)
        self._action_max_length = max(len(name) for name in COMMANDS) + 6


def build_parser() -> argparse.ArgumentParser:
    from flexolmo import __version__

    parser = argparse.ArgumentParser(
        prog="flexolmo",
        description="Train experts on data that cannot be shared, merge them into one FlexOlmo model, opt out.",
        formatter_class=_OneLineHelp,
    )
    parser.add_argument("--version", action="version", version=f"flexolmo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"flexolmo.cli.{module_name}")
        module.register(subparsers, name)
    parser.commands = subparsers.choices  # name -> that subcommand's parser
    return parser


def describe_validation_error(error) -> str:
    """All problems of a config at once, on one line: `--steps: must be >= 1; --lr: ...`."""
    problems = []
    for item in error.errors():
        field = "--" + str(item["loc"][-1]).replace("_", "-") if item["loc"] else "value"
        problems.append(f"{field}: {item['msg'].lower()} (got {item.get('input')!r})")
    return "; ".join(problems)


# Set before any third-party library is imported (tqdm reads its settings at import): their progress bars and
# advisory notices would interleave with flexolmo's own progress and results. A user's own setting wins.
QUIET_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # flexolmo never downloads; a task or model needing the hub fails with one line
    "TQDM_DISABLE": "1",  # the tqdm bars of transformers (loading, saving weights), lm-eval and datasets
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",  # else the tokenizers library warns when a process forks
}


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # imported before (by the caller): its bars read the setting at import
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    from pydantic import ValidationError

    from flexolmo.core.devices import check_device
    from flexolmo.core.errors import FlexOlmoError
    from flexolmo.core.fileio import storage_problem

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse hands a subcommand's unknown flags up to the top level, which would show its usage
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        return int(args.run(args) or 0)
    except FlexOlmoError as error:
        print(f"flexolmo {args.command}: error: {error}", file=sys.stderr)
        return 1
    except ValidationError as error:
        print(f"flexolmo {args.command}: error: {describe_validation_error(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        problem = storage_problem(error)  # a full or read-only disk anywhere: the user's to fix, in one line
        if problem is None:
            raise
        print(f"flexolmo {args.command}: error: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        # A training run says whether it kept a checkpoint to resume from; anything else was simply stopped.
        print(f"flexolmo {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return 130
