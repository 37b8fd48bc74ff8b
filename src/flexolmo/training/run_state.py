"""A training run's work directory (`<out>.ckpt/`): what it holds, whether it may be resumed, and cleaning up.

Rules, the same for every stage that trains:
- A checkpoint is complete when its `state.json` exists. It is written into a staging directory and then
  swapped in with two renames (the previous checkpoint is moved aside first and deleted last), so a run killed
  at any instant, even between the renames, leaves one complete checkpoint to resume from.
- A checkpoint records the run's identity: every setting that decides the trained tensors and the identity of
  the data (file hashes, tokenizer, anchor fingerprint). `--resume` with any difference is refused in one line
  that names what differs; settings that do not change the result (device, checkpoint interval, activation
  checkpointing) are not part of it.
- Without `--resume`, a directory holding a checkpoint is refused (never silently reused); a directory without
  one is the leftover of a run killed before its first checkpoint, and is removed (it would be stale).
- A run that fails or is interrupted before its first checkpoint leaves nothing behind, and is told to start
  again without `--resume`; one that has a checkpoint keeps it and is told to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from flexolmo.core.errors import CheckpointError
from flexolmo.core.fileio import storage_problem
from flexolmo.core.world import is_main_process

CHECKPOINT_DIRNAME = "checkpoint"
STATE_FILE = "state.json"
_PREVIOUS = CHECKPOINT_DIRNAME + ".previous"
_STAGING = CHECKPOINT_DIRNAME + ".staging"


def work_dir_for(out: Path) -> Path:
    """Where a run writing `out` keeps its work in progress."""
    return out.with_name(out.name + ".ckpt")


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The directory of the latest complete checkpoint, or None. A run killed between the two renames of
    `publish_checkpoint` left it under the previous name."""
    for name in (CHECKPOINT_DIRNAME, _PREVIOUS):
        if (run_dir / name / STATE_FILE).exists():
            return run_dir / name
    return None


def staging_dir(run_dir: Path) -> Path:
    """The one staging directory of a run (every rank of a sharded checkpoint writes into the same one)."""
    return run_dir / _STAGING


def publish_checkpoint(run_dir: Path) -> None:
    """Swap the staging directory in as the checkpoint, keeping a complete checkpoint on disk at every instant."""
    target, previous = run_dir / CHECKPOINT_DIRNAME, run_dir / _PREVIOUS
    if (target / STATE_FILE).exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staging_dir(run_dir), target)
    shutil.rmtree(previous, ignore_errors=True)


def read_state(run_dir: Path) -> dict | None:
    """The state of the latest complete checkpoint (step, losses, identity, ...), or None."""
    directory = checkpoint_dir(run_dir)
    if directory is None:
        return None
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{directory}: unreadable checkpoint ({error}); delete it to start over") from None


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _show(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """`name ("a" then, "b" now)` for every setting or input that differs between two run identities."""
    old, new = _flatten(recorded), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            differences.append(f"{key} ({_show(old.get(key))} then, {_show(new.get(key))} now)")
    return differences


def check_identity(run_dir: Path, state: dict, identity: dict, only_given: bool = False) -> None:
    """Refuse to resume a checkpoint written by a run with other settings or other data. `only_given` compares
    only the parts `identity` has (a caller checking its own part early, before the model is loaded)."""
    if "identity" not in state:
        raise CheckpointError(f"{run_dir}: the checkpoint records no run identity (an older flexolmo wrote it); "
                              "delete it to start over")
    recorded = state["identity"]
    if only_given:
        recorded = {key: value for key, value in recorded.items() if key in identity}
    differences = identity_differences(recorded, identity)
    if differences:
        raise CheckpointError(f"{run_dir}: cannot resume, this run differs from the checkpoint's in "
                              f"{'; '.join(differences)}; rerun with the same settings and data, or delete "
                              f"{run_dir} to start over")


def check_work_dir(run_dir: Path, resume: bool) -> None:
    """Before anything is loaded: refuse a fresh start over a checkpoint, and a resume with nothing to resume."""
    has_checkpoint = checkpoint_dir(run_dir) is not None
    if resume and not has_checkpoint:
        raise CheckpointError(f"nothing to resume: no checkpoint at {run_dir}; run the command without --resume")
    if not resume and has_checkpoint:
        raise CheckpointError(f"{run_dir}: a checkpoint of an earlier run exists; pass --resume to continue it, "
                              "or delete it to start over")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:

    return is_main_process()


def resume_hint(run_dir: Path, what: str = "interrupted") -> str:
    """What to do after `what` stopped the run, depending on whether a checkpoint was kept."""
    state = read_state(run_dir) if run_dir.exists() else None
    if state is None:
        return f"{what} before the first checkpoint; nothing was kept: rerun the command without --resume"
    return (f"{what}; {run_dir} keeps the checkpoint of step {state['step']}: rerun the same command with "
            "--resume to continue")


@contextlib.contextmanager
def work_directory(run_dir: Path, resume: bool) -> Iterator[Path]:
    """The run's work directory for the duration of the block; a failure before the first checkpoint removes
    it, and an interruption says whether `--resume` applies. Under torchrun, rank 0 alone creates and removes."""
    check_work_dir(run_dir, resume)
    _barrier()  # every rank has looked before rank 0 changes anything
    if _is_main():
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # killed before its first checkpoint: stale, and nothing in it can be resumed
        run_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    try:
        yield run_dir
    except BaseException as error:
        if _is_main():
            shutil.rmtree(staging_dir(run_dir), ignore_errors=True)  # a half-written checkpoint: never resumed
            if checkpoint_dir(run_dir) is None:
                shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(resume_hint(run_dir)) from None
        problem = storage_problem(error)
        if problem is not None:  # a full disk at a checkpoint loses nothing: the previous one is still whole
            raise CheckpointError(resume_hint(run_dir, problem)) from None
        raise
