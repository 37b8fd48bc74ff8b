"""The command line: every subcommand listed, thin over the library, errors as one line."""

from __future__ import annotations

import subprocess
import sys

from flexolmo.cli import COMMANDS, main


def test_help_lists_every_command_with_one_line(capsys):
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    lines = capsys.readouterr().out.splitlines()
    for command in COMMANDS:
        matching = [line for line in lines if line.strip().startswith(command + " ")]
        assert len(matching) == 1 and len(matching[0].split(command, 1)[1].strip()) > 10, command


def test_library_errors_become_one_line_and_exit_1(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flexolmo", "eval", "--model", str(tmp_path / "nowhere"),
                             "--data", "x=y.jsonl"], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"flexolmo eval: error: {tmp_path / 'nowhere'}: no such directory; check the path"]
