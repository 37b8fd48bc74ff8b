"""What every subcommand shares, defined once: how `--help` looks, and the flags that mean the same thing on
every command (`--data FILE...`, `--exclude NAME...`, `--trusted-keys DIR`, `--device`, `--dtype`,
`--text-field`, optimisation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.training.loop import OptimConfig

DTYPES = ("float32", "bfloat16")
# `--json -`: the result printed to standard output instead of written to a file.
STDOUT = "-"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """One look for every subcommand's `--help`: the description as written (examples keep their lines), the
    option help in one column, and each option's default, except where there is none to show (None, False, an
    empty list or string), so a default is never written by hand into a help string."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=120)

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if default is None or default is False or (isinstance(default, (str, list, tuple)) and not default):
            return action.help or ""
        return super()._get_help_string(action)


def add_command(subparsers, name: str, help: str, description: str | None) -> argparse.ArgumentParser:
    """A subcommand's parser, formatted like every other one."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def add_data_flag(parser, help: str, metavar: str = "FILE") -> None:
    """`--data FILE...`: text files (.jsonl, .jsonl.gz, .parquet, .txt), on every command."""
    parser.add_argument("--data", nargs="+", required=True, metavar=metavar, help=help)


def add_data_flags(parser) -> None:
    """How records of the data files are read."""
    parser.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")


def add_trusted_keys_flag(parser) -> None:
    """`--trusted-keys DIR`: one meaning on every command (`verify`, `merge`, `add`, `remove`, `tune-router`,
    `sign` and every command that runs a model): what is read must be signed by the trusted key that vouches for
    it, and a command acting on a merged model without it says so on stderr."""
    parser.add_argument("--trusted-keys", type=Path, default=None,
                        help="directory of trusted public keys (NAME.pub, coordinator.pub): a package must be "
                             "signed by the key of its own name, a merged model by coordinator.pub")


def trusted_keys(args: argparse.Namespace):
    """The `TrustedKeys` of `--trusted-keys`, or None."""
    from flexolmo.trust.signing import TrustedKeys

    return TrustedKeys(args.trusted_keys) if args.trusted_keys is not None else None


def add_exclude_flag(parser) -> None:
    """`--exclude NAME...`: experts masked by name, on every command that runs a merged model, with
    `--trusted-keys` to authenticate the model (and so its names) first."""
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME",
                        help="names of experts to mask (merged models; nothing is rewritten)")
    add_trusted_keys_flag(parser)


def add_router_bias_flag(parser) -> None:
    """`--router-bias`: on every command that runs a merged model, apply the router biases its owners trained
    (the paper's negative bias), which the merge keeps in the model's record; transformers leaves them out."""
    parser.add_argument("--router-bias", action="store_true",
                        help="apply the owners' trained router biases kept in the merged model's record "
                             "(flexolmo's runtime; transformers computes the checkpoint without them)")


def model_title(args: argparse.Namespace) -> str:
    """A results table's title: the model, with what `--exclude` and `--router-bias` changed in it."""
    return (f"{args.model}" + (f" without {', '.join(args.exclude)}" if args.exclude else "")
            + (" with its owners' router biases" if args.router_bias else ""))


def add_json_flag(parser, help: str, metavar: str = "FILE") -> None:
    """`--json FILE` and `--force`: a result file, never written over an existing one unless `--force`;
    `--json -` prints it instead."""
    parser.add_argument("--json", default=None, metavar=metavar, help=f"{help} (- prints it)")
    parser.add_argument("--force", action="store_true", help="replace the --json file when it exists")


def json_output(args: argparse.Namespace) -> Path | None:
    """Before any work: the `--json` path, refused when it exists without `--force` (or is a directory);
    `-` (standard output) as it is."""
    from flexolmo.core.fileio import check_new_file

    if args.json == STDOUT:
        return Path(STDOUT)
    return check_new_file(args.json, args.force) if args.json else None


def write_json_output(target: Path | None, payload, what: str) -> None:
    """Write the result file `json_output` checked (nothing when None) and say where it went."""
    from flexolmo.core.fileio import atomic_write_json
    from flexolmo.core.progress import announce_output

    if target == Path(STDOUT):
        print(json.dumps(payload, indent=2))
    elif target is not None:
        atomic_write_json(target, payload)
        announce_output(what, target)


def add_device_flags(parser, dtype_help: str = "dtype the model is loaded in") -> None:
    """`--device` and `--dtype`, on every command that loads a model."""
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help=dtype_help)


def torch_dtype(name: str):
    """The torch dtype named by `--dtype`."""
    import torch

    return getattr(torch, name)


# The optimisation fields every training command exposes, in `--help` order.
OPTIM_FIELDS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "min_lr_ratio",
                "weight_decay", "grad_clip", "checkpoint_every", "seed", "device", "dtype")


def add_optim_flags(parser: argparse.ArgumentParser, defaults: OptimConfig) -> None:
    """Optimisation flags generated from `OptimConfig`, with the stage's own defaults (`defaults`, the optim
    config its typed config builds when none is given), and `--resume`."""
    group = parser.add_argument_group("optimisation")
    add_config_flags(group, OptimConfig, OPTIM_FIELDS, defaults)
    group.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint of an interrupted run")


def optim_config(args: argparse.Namespace) -> OptimConfig:
    """The OptimConfig of parsed flags."""
    return OptimConfig(**config_values(args, OPTIM_FIELDS))


def path_list(values: list[str] | None) -> list[Path]:
    return [Path(value) for value in values or []]
