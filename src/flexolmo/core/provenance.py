"""What every artefact records about how it was made: software versions, input hashes, time."""

from __future__ import annotations

import datetime
import platform
from collections.abc import Sequence
from pathlib import Path

import flexolmo
from flexolmo.core.fileio import sha256_file


def software_versions() -> dict[str, str]:
    """Versions of the packages that decide an artefact's numbers."""
    import tokenizers
    import torch
    import transformers


    return {
        "flexolmo": flexolmo.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


def input_hashes(paths: Sequence[Path | str]) -> dict[str, str]:
    """SHA-256 of each input file, keyed by the path as given."""
    return {str(path): sha256_file(path) for path in paths}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
