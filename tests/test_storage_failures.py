"""A full or read-only disk, for real: a small tmpfs is mounted for each test (root may mount; elsewhere the test
is skipped and says why). Each failure is one line saying what and where, nothing half-written is left, and a
training run keeps its last complete checkpoint and resumes from it once there is space again."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from flexolmo.cli import main
from flexolmo.training import run_state


@pytest.fixture
def small_disk(tmp_path) -> Path:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write one file until the filesystem has no byte left."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * chunk)
    return filler


def one_error_line(capsys) -> str:
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if ": error: " in line]  # progress bars share stderr
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def train_argv(tiny_anchor, corpora, out: Path) -> list[str]:
    return ["train-expert", "--anchor", str(tiny_anchor), "--data", str(corpora["math"]), "--name", "math",
            "--steps", "6", "--seq-len", "32", "--batch-size", "4", "--checkpoint-every", "2", "--out", str(out)]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_finishes(tiny_anchor, corpora, small_disk,
                                                                            monkeypatch, capsys):
    from flexolmo.training.distributed import replicated

    published = []
    publish = replicated.publish_checkpoint

    def publish_then_fill(run_dir: Path) -> None:  # another process takes the rest of the disk
        publish(run_dir)
        published.append(run_dir)
        if len(published) == 1:
            fill(small_disk)

    monkeypatch.setattr(replicated, "publish_checkpoint", publish_then_fill)
    out = small_disk / "math"
    argv = train_argv(tiny_anchor, corpora, out)
    assert main(argv) == 1
    line = one_error_line(capsys)
    run_dir = run_state.work_dir_for(out)
    state = json.loads((run_state.checkpoint_dir(run_dir) / run_state.STATE_FILE).read_text())
    assert 0 < state["step"] < 6
    assert "disk full" in line and f"keeps the checkpoint of step {state['step']}" in line and "--resume" in line
    assert not out.exists() and not run_state.staging_dir(run_dir).exists()  # nothing half-written is left
    (small_disk / "filler").unlink()
    monkeypatch.setattr(replicated, "publish_checkpoint", publish)
    assert main([*argv, "--resume"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["training"]["losses"]) == 6


def test_a_full_disk_before_the_first_checkpoint_keeps_nothing_and_says_so(tiny_anchor, corpora, small_disk, capsys):
    (small_disk / "room").mkdir()
    fill(small_disk)
    out = small_disk / "room" / "math"
    assert main(train_argv(tiny_anchor, corpora, out)) == 1
    line = one_error_line(capsys)
    assert "disk full" in line and "nothing was kept" in line and "without --resume" in line
    assert list((small_disk / "room").iterdir()) == []


def test_a_read_only_disk_is_one_line_for_every_writer(tiny_anchor, corpora, serve_merged, small_disk, capsys):
    (small_disk / "existing").mkdir()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True,
                             check=False)
    assert remount.returncode == 0, remount.stderr
    commands = [
        train_argv(tiny_anchor, corpora, small_disk / "existing" / "math"),
        ["remove", "--model", str(serve_merged), "--exclude", "code", "--out", str(small_disk / "existing" / "o")],
        ["eval", "--model", str(tiny_anchor), "--data", f"code={corpora['code']}", "--max-sequences", "2",
         "--seq-len", "32", "--json", str(small_disk / "existing" / "scores.json")],
        ["keygen", "--name", "code", "--out", str(small_disk / "existing" / "keys")],
    ]
    for argv in commands:
        assert main(argv) == 1, argv
        line = one_error_line(capsys)
        assert "read-only" in line.lower() and str(small_disk / "existing") in line, (argv, line)
    assert list((small_disk / "existing").iterdir()) == []
