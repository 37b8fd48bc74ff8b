"""What every benchmark shares: where results go, and how they are written (atomically, so an interrupted run
never leaves a half-written results file that looks complete), and the command that produced them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexolmo.cli.common import HelpFormatter
from flexolmo.core.fileio import atomic_write_json
from flexolmo.core.progress import announce_output

RESULTS_DIR = Path(__file__).parent / "results"


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's command-line parser, formatted as every `flexolmo` command's (each option's default shown);
    every option still needs a `help`, since argparse shows no default for an option without one."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def results_file(name: str) -> Path:
    """The default results file of a benchmark: `benchmarks/results/NAME`."""
    return RESULTS_DIR / name


def command_line() -> str:
    """The command that is running, as a reader would type it from the repository root."""
    return " ".join([".venv/bin/python", *sys.argv])


def write_results(path: Path, results: dict) -> Path:
    """Write `results` as JSON at `path` (parents created), atomically, and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)
    announce_output("results", path)
    return path
