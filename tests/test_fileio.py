"""Atomic writes: what they leave behind, and with which permissions."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from conftest import tiny_optim

from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_directory, atomic_write_bytes, atomic_write_json
from flexolmo.owner.expert import ExpertConfig, train_expert


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of everything under it."""
    return {str(path.relative_to(root.parent)): stat.S_IMODE(path.stat().st_mode)
            for path in [root, *root.rglob("*")]}


def test_package_and_merged_model_are_readable_by_others_under_umask_022(tiny_anchor, corpora, tmp_path):
    with umask(0o022):
        package = tmp_path / "code.expert"
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=package,
                                  optim=tiny_optim(steps=2, checkpoint_every=1)))
        merge(tiny_anchor, [package], tmp_path / "merged", top_k=2)
    for root in (package, tmp_path / "merged"):
        found = modes(root)
        assert len(found) >= 3  # the directory and at least two files
        for name, mode in found.items():
            expected = 0o755 if (tmp_path / name).is_dir() else 0o644
            assert mode == expected, f"{name}: {oct(mode)}, expected {oct(expected)}"


def test_atomic_writes_follow_the_umask_and_private_files_stay_private(tmp_path):
    with umask(0o027):
        atomic_write_json(tmp_path / "shared.json", {"a": 1})
        atomic_write_bytes(tmp_path / "owner.key", b"secret", private=True)
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "file").write_text("x")
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "owner.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "owner.key", "shared.json"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("interrupted")
    (tmp_path / "blocked").mkdir()
    with pytest.raises(FlexOlmoError, match="cannot write"):
        atomic_write_bytes(tmp_path / "blocked", b"x")  # a directory is in the way: the rename fails
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blocked"]


def test_a_results_table_sent_to_a_file_or_pipe_keeps_every_cell_whole(capsys):
    """Written to a log (stdout not a terminal), a table wider than 80 columns must not fold its cells into
    slivers (it did: method names split over six lines, numbers over two)."""
    from flexolmo.core.progress import print_table

    columns = ["method", *[f"domain number {i}" for i in range(10)]]
    print_table("wide", columns, [["flexolmo_owner_tokens_matched", *[1.23456789] * 10]])
    row = next(line for line in capsys.readouterr().out.splitlines() if "flexolmo" in line)
    assert "flexolmo_owner_tokens_matched" in row and row.count("1.2346") == 10
