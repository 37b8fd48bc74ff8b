"""The merged model's record of its experts, and the check that its names still point at the right weights.

`flexolmo_experts.json` lists the experts in slot order. Each entry records, besides the name:
- `slot_sha256`: a digest of the expert's slot as written into the merged checkpoint (every FFN tensor and the
  router row of every layer) bound to the expert's name, so that a name moved to another slot, or a slot's
  weights swapped, no longer matches;
- for an owner's expert: `package_sha256` (the package by content), `signer` (the trusted key that signed the
  package, when the coordinator merged with `--trusted-keys`) and the package's manifest.

`--exclude NAME` and `remove` resolve names through this record and check the named slots against their digests
before acting on them, so an opt-out cannot silently hit another member's expert. The record itself is
authenticated by the coordinator's signature over the whole directory (`flexolmo verify MODEL --trusted-keys`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import digest_tensor
from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import MERGED_EXPERT, MERGED_ROUTER, parse

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _part(key: str, tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256()
    digest_tensor(digest, key, tensor)
    return digest.digest()


def slot_digest(name: str, parts: dict[str, bytes]) -> str:
    """The digest of one expert slot: its name and the digest of each of its tensors, by position-free key."""
    digest = hashlib.sha256(f"flexolmo-slot|{name}|".encode())
    for key in sorted(parts):
        digest.update(key.encode() + b"|" + parts[key])
    return digest.hexdigest()


class SlotRecorder:
    """Wraps a `ShardedWriter`: writes through it and digests each expert slot's tensors as they pass."""

    def __init__(self, writer):
        self.writer = writer
        self._parts: dict[int, dict[str, bytes]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)
        expert = parse(MERGED_EXPERT, name)
        if expert is not None:
            key = f"layers.{expert['layer']}.{expert['proj']}"
            self._parts.setdefault(expert["expert"], {})[key] = _part(key, tensor)
            return
        router = parse(MERGED_ROUTER, name)
        if router is not None:
            for index, row in enumerate(tensor):
                key = f"layers.{router['layer']}.router"
                self._parts.setdefault(index, {})[key] = _part(key, row)

    def finish(self) -> list[str]:
        return self.writer.finish()

    def digests(self, names: Sequence[str]) -> list[str]:
        """Slot digests of the experts written, in slot order, bound to `names`."""
        return [slot_digest(name, self._parts.get(index, {})) for index, name in enumerate(names)]


def read_slot_digest(reader: LazyReader, index: int, name: str, layers: int, projections: Sequence[str]) -> str:
    """The digest of slot `index` of a merged checkpoint, read one tensor at a time, as if it held `name`."""
    parts = {}
    for layer in range(layers):
        for proj in projections:
            key = f"layers.{layer}.{proj}"
            parts[key] = _part(key, reader.get(MERGED_EXPERT.format(layer=layer, expert=index, proj=proj)))
        key = f"layers.{layer}.router"
        parts[key] = _part(key, reader.get(MERGED_ROUTER.format(layer=layer))[index])
    return slot_digest(name, parts)


def check_record(path: Path, metadata: dict) -> None:
    """The record's shape: unique names, a digest per slot, and each manifest under its own name."""
    names = [entry.get("name") for entry in metadata["experts"]]
    if len(set(names)) != len(names) or not all(isinstance(name, str) for name in names):
        raise TrustError(f"{path}: flexolmo_experts.json names an expert twice or not at all; it was altered")
    for index, entry in enumerate(metadata["experts"]):
        if not _HEX64.fullmatch(str(entry.get("slot_sha256", ""))):
            raise TrustError(f"{path}: expert slot {index} ('{entry['name']}') has no slot digest; it was altered")
        manifest = entry.get("manifest")
        if manifest is not None and not isinstance(manifest, dict):
            raise TrustError(f"{path}: slot {index} ('{entry['name']}') carries a manifest that is not an object; "
                             "flexolmo_experts.json was altered")
        if manifest is not None and manifest.get("name") != entry["name"]:
            raise TrustError(f"{path}: slot {index} is recorded as '{entry['name']}' but carries the manifest of "
                             f"'{manifest.get('name')}'; flexolmo_experts.json was altered")


def verify_slots(path: Path | str, metadata: dict, names: Sequence[str], projections: Sequence[str]) -> None:
    """Check that each named expert's slot holds the weights its record says, under that name."""
    path = Path(path)
    reader = LazyReader(path)
    layers = metadata["anchor"]["config"]["num_hidden_layers"]
    slots = {entry["name"]: index for index, entry in enumerate(metadata["experts"])}
    for name in names:
        index = slots[name]
        if read_slot_digest(reader, index, name, layers, projections) != metadata["experts"][index]["slot_sha256"]:
            raise TrustError(f"{path}: slot {index}, recorded as expert '{name}', does not hold that expert's "
                             "weights (slot digest mismatch); flexolmo_experts.json or the weights were altered, "
                             "so its names cannot be trusted")


def expert_entry(package) -> dict:
    """The record of an owner's expert taken from a verified `ExpertPackage`."""
    return {"name": package.name, "source": "package", "package_sha256": package.digest,
            "signer": package.signer.as_dict() if package.signer else None, "manifest": package.manifest}

