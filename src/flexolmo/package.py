"""The expert package: the only thing that leaves a data owner.

A package is a directory with two files:
- `expert.safetensors`: per layer, the trained FFN (`layers.N.{gate,up,down}_proj.weight`), the owner's router
  row (`layers.N.router.weight`, shape (1, H)) and, if trained with one, its bias (`layers.N.router.bias`).
  Nothing of the anchor's shared weights, and never pickle.
- `manifest.json`: format version, name, the anchor's fingerprint, tensor shapes, checksums, training
  hyperparameters, token count, a fingerprint of the training token stream (a hash, never text), held-out
  loss, privacy accounting, creation time and software versions.

`load_package` is the single entry point that reads a package; it always verifies it, so every command that
takes a package (verify, merge, add) applies the same checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo.errors import PackageError
from flexolmo.fileio import atomic_directory, atomic_write_json, digest_tensor, sha256_file

FORMAT = "flexolmo-expert"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "expert.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ExpertPackage:
    """A verified package: its manifest and (when loaded) its tensors by package name."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor] | None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def anchor_fingerprint(self) -> str:
        return self.manifest["anchor"]["fingerprint"]


def check_name(name: str) -> str:
    """Expert names become file and flag values; keep them plain."""
    if not NAME_PATTERN.match(name):
        raise PackageError(
            f"invalid expert name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in name order (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def write_package(out: Path, name: str, tensors: dict[str, torch.Tensor], manifest_fields: dict) -> dict:
    """Write a package atomically; returns the full manifest."""
    from safetensors.torch import save_file

    check_name(name)
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        **manifest_fields,
        "tensors": {key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
                    for key, value in sorted(tensors.items())},
        "tensors_sha256": tensors_checksum(tensors),
    }
    with atomic_directory(out) as staging:
        save_file(tensors, str(staging / TENSOR_FILE), metadata={"format": FORMAT, "name": name})
        manifest["file_sha256"] = sha256_file(staging / TENSOR_FILE)
        atomic_write_json(staging / MANIFEST_FILE, manifest)
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest of a package, with its format checked."""
    if not path.exists():
        raise PackageError(f"{path}: no such expert package; check the path")
    manifest_file = path / MANIFEST_FILE
    if not path.is_dir() or not manifest_file.exists():
        raise PackageError(f"{path}: not an expert package (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PackageError(f"{manifest_file}: corrupt manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a flexolmo expert package (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackageError(
            f"{path}: unknown package format version {version!r} (this flexolmo reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade flexolmo"
        )
    for field in ("name", "anchor", "tensors", "tensors_sha256", "file_sha256"):
        if field not in manifest:
            raise PackageError(f"{path}: manifest lacks '{field}'; the package is damaged")
    return manifest


def _diagnose_tensor_file(path: Path, manifest: dict) -> None:
    """Called when the file's bytes differ from the manifest: raise the most precise reason, one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    tensor_file = path / TENSOR_FILE
    if not tensor_file.exists():
        raise PackageError(f"{path}: {TENSOR_FILE} is missing")
    try:
        with safe_open(tensor_file, framework="pt") as handle:
            names = set(handle.keys())
            if names != set(manifest["tensors"]):
                raise PackageError(f"{tensor_file}: tensor names differ from the manifest; the package was altered")
            digest = hashlib.sha256()
            for name in sorted(names):
                tensor = handle.get_tensor(name)
                if list(tensor.shape) != manifest["tensors"][name]["shape"]:
                    raise PackageError(f"{tensor_file}: tensor {name} has shape {list(tensor.shape)}, manifest "
                                       f"says {manifest['tensors'][name]['shape']}")
                digest_tensor(digest, name, tensor)
    except (SafetensorError, OSError) as error:
        raise PackageError(f"{tensor_file}: truncated or corrupt ({error}); ask the owner to send it again") from None
    if digest.hexdigest() != manifest["tensors_sha256"]:
        raise PackageError(f"{tensor_file}: tensor contents do not match the manifest checksum; "
                           "the package was modified after training")
    raise PackageError(f"{tensor_file}: file bytes differ from the manifest; the package was altered")


def check_against_anchor(package_path: Path, manifest: dict, anchor_fingerprint: str, anchor_config: dict) -> None:
    """The package was trained on this anchor, and its shapes fit it."""
    if manifest["anchor"]["fingerprint"] != anchor_fingerprint:
        raise PackageError(
            f"{package_path}: expert '{manifest['name']}' was trained on another anchor (fingerprint "
            f"{manifest['anchor']['fingerprint'][:12]}..., this anchor is {anchor_fingerprint[:12]}...)"
        )
    layers = anchor_config["num_hidden_layers"]
    expected = {f"layers.{layers - 1}.down_proj.weight": [anchor_config["hidden_size"],
                                                           anchor_config["intermediate_size"]]}
    for name, shape in expected.items():
        if manifest["tensors"].get(name, {}).get("shape") != shape:
            raise PackageError(f"{package_path}: shapes do not fit the anchor ({name})")


def load_package(
    path: Path | str,
    anchor_fingerprint: str | None = None,
    anchor_config: dict | None = None,
    with_tensors: bool = True,
) -> ExpertPackage:
    """Read and verify a package: format, integrity of every byte, and (given an anchor) its origin.

    Integrity is checked even when `with_tensors` is False, so a package is never trusted on its manifest alone;
    the check streams the file, so verifying a package of any size takes constant memory.
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensor_file = path / TENSOR_FILE
    if not tensor_file.exists() or sha256_file(tensor_file) != manifest["file_sha256"]:
        _diagnose_tensor_file(path, manifest)
    if anchor_fingerprint is not None and anchor_config is not None:
        check_against_anchor(path, manifest, anchor_fingerprint, anchor_config)
    tensors = None
    if with_tensors:
        from safetensors.torch import load_file

        tensors = load_file(str(tensor_file))
    return ExpertPackage(path, manifest, tensors)
