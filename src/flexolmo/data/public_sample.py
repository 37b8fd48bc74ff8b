"""The public text sample a coordinator publishes with its anchor, and the default public mix of owner training.

Why it exists: an owner's router row competes only with the frozen public row. Trained on its own text alone it
learns "prefer me" everywhere, and after the merge it takes tokens of other domains (measured: a domain close to
the public data ended 7.6% worse than the anchor). Public sequences in the owner's batches are where the public
expert must keep winning. So the coordinator ships a small sample of its public training text beside the anchor
(`flexolmo_public_sample.jsonl.gz`, written by `pretrain` and `init-router`), and `train-expert` mixes it into
half of every batch unless the owner passes `--public-share 0` or other public text with `--public-data`.

The sample is a deterministic draw: documents ranked by a salted SHA-256 of their text, the lowest first, as
many as fit in `SAMPLE_BYTES` of UTF-8 text. It streams (memory is the sample plus one document), so it works on
a public corpus of any size, and the same corpus always gives the same sample.

It is deliberately NOT part of the anchor fingerprint: it does not change what the anchor or any merged model
computes, owners may train on other public text instead, and refreshing it must not invalidate experts already
trained. What an expert actually mixed in is recorded in its manifest (file names and SHA-256), so a reviewer
can check it against the published sample.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from flexolmo.core.fileio import atomic_write_bytes, sha256_file
from flexolmo.core.progress import console
from flexolmo.data.documents import iter_documents, select_split

PUBLIC_SAMPLE_FILE = "flexolmo_public_sample.jsonl.gz"
# About 1 MB of text: roughly 0.4 MB gzipped, and over a thousand 256-token sequences, more public sequences
# than a default expert run draws.
SAMPLE_BYTES = 1_000_000
DEFAULT_PUBLIC_SHARE = 0.5
_SALT = b"flexolmo-public-sample|"


def _rank(text: str) -> bytes:
    return hashlib.sha256(_SALT + text.encode("utf-8")).digest()


def draw_sample(texts: Iterable[str], max_bytes: int = SAMPLE_BYTES) -> list[str]:
    """The lowest-ranked texts (salted SHA-256 order) that fit together in `max_bytes` of UTF-8.

    Equal to sorting every text by rank and keeping the prefix that fits, computed in one streaming pass: the
    heap holds the smallest-ranked texts whose bytes just cover the budget; a text pushed out can never come
    back, because texts of lower rank already cover the budget without it.
    """
    heap: list[tuple[bytes, int, str]] = []  # (negated rank, bytes, text): the root is the highest rank kept
    total = 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if size > max_bytes:  # could never fit; skipping it keeps one huge document from emptying the sample
            continue
        rank = _rank(text)
        negated = bytes(255 - b for b in rank)
        heapq.heappush(heap, (negated, size, text))
        total += size
        while heap and total - heap[0][1] >= max_bytes:
            total -= heapq.heappop(heap)[1]
    kept, used = [], 0
    for _, size, text in sorted(heap, key=lambda item: _rank(item[2])):
        if used + size > max_bytes:
            break
        kept.append(text)
        used += size
    return kept


def write_public_sample(target_dir: Path, data: Sequence[Path], split: str, text_field: str = "text",
                        heldout_fraction: float = 0.05, max_bytes: int = SAMPLE_BYTES) -> Path:
    """Draw the sample from the `split` of `data` and write it as `target_dir/PUBLIC_SAMPLE_FILE` (atomically)."""
    texts = (document.text for path in data
             for document in select_split(iter_documents(path, text_field), split, heldout_fraction))
    sample = draw_sample(texts, max_bytes)
    lines = "".join(json.dumps({"id": f"public-sample-{i}", "text": text}) + "\n" for i, text in enumerate(sample))
    target = Path(target_dir) / PUBLIC_SAMPLE_FILE
    atomic_write_bytes(target, gzip.compress(lines.encode("utf-8"), mtime=0))
    return target


def anchor_public_sample(anchor_dir: Path) -> Path | None:
    """The public sample published with an anchor, if any."""
    path = Path(anchor_dir) / PUBLIC_SAMPLE_FILE
    return path if path.exists() else None


def resolve_public_mix(public_data: Sequence[Path], public_share: float | None,
                       anchor_dir: Path) -> tuple[list[Path], float]:
    """The public files and share an owner's training actually uses.

    `public_share` None means "the default": half of every batch from `public_data`, or from the anchor's public
    sample when no public data is given; with no public text at all, no mixing and one warning. An explicit
    share (0 included) is kept as given.
    """
    files = list(public_data)
    if not files and (public_share is None or public_share > 0):
        sample = anchor_public_sample(anchor_dir)
        files = [sample] if sample else []
    if public_share is not None:
        return (files if public_share > 0 else []), public_share
    if files:
        return files, DEFAULT_PUBLIC_SHARE
    console.print(f"[yellow]warning:[/] no public text to mix into training (the anchor has no {PUBLIC_SAMPLE_FILE} "
                  "and no --public-data was given); your expert may take tokens of other domains once merged. "
                  "Pass --public-data PUBLIC_FILE, or --public-share 0 to silence this warning", soft_wrap=True)
    return [], 0.0


def describe_files(paths: Sequence[Path]) -> list[dict]:
    """Name and SHA-256 of each file: provenance that names public text without copying it."""
    return [{"name": Path(path).name, "sha256": sha256_file(path)} for path in paths]
