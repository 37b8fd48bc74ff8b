"""The expert package: the only thing that leaves a data owner.

A package is a directory with two files, and a third once signed:
- `expert.safetensors`: per layer, the trained FFN (`layers.N.{gate,up,down}_proj.weight`), the owner's router
  row (`layers.N.router.weight`, shape (1, H)) and, if trained with one, its bias (`layers.N.router.bias`).
  Nothing of the anchor's shared weights, and never pickle.
- `manifest.json`: the typed record of `flexolmo.owner.manifest` (name, anchor fingerprint, tensor shapes and
  checksums, training summary as far as privacy allows, privacy accounting, versions).
- `model.sig`: the owner's signature over both files (`flexolmo.trust.signing`).

`load_package` is the single entry point that reads a package, and it verifies all of it before returning, in
this order: the manifest's types; that the directory holds nothing else; the signature, when the caller
trusts keys; the safetensors header (parsed before any checksum is believed, so a pickle is refused however
its checksums were forged); every expected tensor present for the anchor and no other, each of the right
shape and a floating dtype; the header's name equal to the manifest's; the file and tensor checksums; every
value finite and every router bias at or below zero; the anchor's fingerprint and shape; and a DP claim's epsilon
against its own parameters.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from flexolmo.core.errors import PackageError, TrustError
from flexolmo.core.fileio import (
    atomic_directory,
    atomic_write_json,
    check_not_staging,
    digest_tensor,
    sha256_file,
)
from flexolmo.core.weights import PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER, parse
from flexolmo.model.anchor import ANCHOR_FAMILIES, FINGERPRINT_SCHEME
from flexolmo.owner.manifest import FORMAT, FORMAT_VERSION, NAME_REGEX, ExpertManifest, describe_validation
from flexolmo.owner.privacy import spent_epsilon
from flexolmo.trust.signing import (
    COORDINATOR_KEY_NAME,
    SIGNATURE_FILE,
    Signer,
    TrustedKeys,
    sign_directory,
    verify_directory,
)

MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "expert.safetensors"
PACKAGE_FILES = (MANIFEST_FILE, TENSOR_FILE, SIGNATURE_FILE)
# FFN projection -> its weight's shape as (rows, columns) in terms of the hidden (H) and intermediate (I) sizes.
_PROJECTION_SHAPES = {"gate_proj": ("I", "H"), "up_proj": ("I", "H"), "down_proj": ("H", "I")}


@dataclass
class ExpertPackage:
    """A verified package: its manifest, digest, signer (when keys were trusted) and (when loaded) tensors."""

    path: Path
    manifest: dict
    tensors: dict[str, torch.Tensor] | None
    digest: str
    signer: Signer | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def anchor_fingerprint(self) -> str:
        return self.manifest["anchor"]["fingerprint"]


def check_name(name: str) -> str:
    """Expert names become file and flag values; keep them plain. `public` is the anchor's own expert."""
    if not re.fullmatch(NAME_REGEX, name):  # fullmatch: `$` would let a trailing newline through
        raise PackageError(
            f"invalid expert name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name == "public":
        raise PackageError("the name 'public' is reserved for the anchor's own expert; choose another --name")
    if name == COORDINATOR_KEY_NAME:
        raise PackageError(f"the name '{name}' is the coordinator's key; an expert must not share it; choose "
                           "another --name")
    return name


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in name order (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def package_digest(path: Path | str) -> str:
    """SHA-256 naming a package by content: over the SHA-256 of its manifest and of its tensor file."""
    path = Path(path)
    files = {name: sha256_file(path / name) for name in (MANIFEST_FILE, TENSOR_FILE)}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def expected_tensors(anchor: dict, projections: tuple[str, ...], with_bias: bool) -> dict[str, list[int]]:
    """Every tensor a package for this anchor holds, with its shape: `anchor` has num_hidden_layers,
    hidden_size and intermediate_size."""
    sizes = {"H": anchor["hidden_size"], "I": anchor["intermediate_size"]}
    expected = {}
    for layer in range(anchor["num_hidden_layers"]):
        for proj in projections:
            rows, columns = _PROJECTION_SHAPES[proj]
            expected[PACKAGE_FFN.format(layer=layer, proj=proj)] = [sizes[rows], sizes[columns]]
        expected[PACKAGE_ROUTER.format(layer=layer)] = [1, sizes["H"]]
        if with_bias:
            expected[PACKAGE_BIAS.format(layer=layer)] = [1]
    return expected


def _projections(model_type: str, path: Path) -> tuple[str, ...]:

    family = ANCHOR_FAMILIES.get(model_type)
    if family is None:
        raise PackageError(f"{path}: trained on a '{model_type}' anchor, which this flexolmo does not support "
                           f"(supported: {', '.join(sorted(ANCHOR_FAMILIES))})")
    return family.ffn_projections


def write_package(out: Path, name: str, tensors: dict[str, torch.Tensor], manifest_fields: dict,
                  sign_key: Path | None = None) -> dict:
    """Write a package atomically (signed with `sign_key` when given); returns the full manifest."""
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
        try:
            ExpertManifest.model_validate(manifest)
        except ValidationError as error:  # a bug of the writer: never ship a package that readers refuse
            raise PackageError(f"refusing to write an invalid manifest ({describe_validation(error)})") from None
        atomic_write_json(staging / MANIFEST_FILE, manifest)
        if sign_key is not None:
            sign_directory(staging, sign_key)
    return manifest


def read_manifest(path: Path) -> dict:
    """The manifest of a package, type-checked field by field; one line naming the first problems otherwise."""
    if not path.exists():
        raise PackageError(f"{path}: no such expert package; check the path")
    manifest_file = path / MANIFEST_FILE
    if not path.is_dir() or not manifest_file.exists():
        raise PackageError(f"{path}: not an expert package (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PackageError(f"{manifest_file}: corrupt manifest ({error})") from None
    except OSError as error:
        raise PackageError(f"{manifest_file}: cannot read it ({error.strerror or error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PackageError(f"{path}: not a flexolmo expert package (format {found!r})")
    version = manifest.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise PackageError(f"{path}: package format version {version} is from an older flexolmo (this one reads "
                           f"{FORMAT_VERSION}); ask the owner to train and package it again")
    if version != FORMAT_VERSION:
        raise PackageError(f"{path}: unknown package format version {version!r} (this flexolmo reads "
                           f"{FORMAT_VERSION}); upgrade flexolmo")
    try:
        ExpertManifest.model_validate(manifest)
    except ValidationError as error:
        raise PackageError(f"{manifest_file}: malformed manifest ({describe_validation(error)})") from None
    return manifest


def _check_files(path: Path) -> None:
    if not (path / TENSOR_FILE).is_file():
        raise PackageError(f"{path}: {TENSOR_FILE} is missing")
    extra = sorted(item.name for item in path.iterdir() if item.name not in PACKAGE_FILES)
    if extra:
        raise PackageError(f"{path}: unexpected {', '.join(extra)}; a package holds only "
                           f"{', '.join(PACKAGE_FILES)}")


def _authenticate(path: Path, manifest: dict, trusted_keys: TrustedKeys) -> Signer:
    """The package's signature verifies under a trusted key, and that key is the expert's own name."""
    signer = verify_directory(path, trusted_keys)
    if signer.name != manifest["name"]:
        raise TrustError(f"{path}: package '{manifest['name']}' is signed by '{signer.name}'; a member may only "
                         "sign packages under its own name")
    return signer


def _check_header(tensor_file: Path, manifest: dict) -> None:
    """The safetensors header, parsed by safetensors itself, against the manifest and the expected layout."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(tensor_file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            found = {name: (list(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                     for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise PackageError(f"{tensor_file}: not a safetensors file, or truncated or corrupt ({error}); ask the "
                           "owner to send it again") from None
    if metadata.get("format") != FORMAT or metadata.get("name") != manifest["name"]:
        raise PackageError(f"{tensor_file}: its header names expert {metadata.get('name')!r}, the manifest "
                           f"'{manifest['name']}'; the weights belong to another package")
    anchor = manifest["anchor"]
    with_bias = PACKAGE_BIAS.format(layer=0) in found
    expected = expected_tensors(anchor, _projections(anchor["model_type"], tensor_file.parent), with_bias)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        detail = "; ".join(part for part in (f"missing {', '.join(missing[:3])}" if missing else "",
                                             f"unexpected {', '.join(extra[:3])}" if extra else "") if part)
        raise PackageError(f"{tensor_file}: tensors do not fit a {anchor['num_hidden_layers']}-layer expert "
                           f"({detail})")
    dtype_names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for name, (shape, dtype) in sorted(found.items()):
        if shape != expected[name]:
            raise PackageError(f"{tensor_file}: tensor {name} has shape {shape}, the anchor needs {expected[name]}")
        if dtype not in dtype_names:
            raise PackageError(f"{tensor_file}: tensor {name} has dtype {dtype}; experts hold floating weights")
        recorded = manifest["tensors"].get(name, {})
        if recorded.get("shape") != shape or recorded.get("dtype") != dtype_names[dtype]:
            raise PackageError(f"{tensor_file}: tensor {name} is {dtype_names[dtype]} {shape}, the manifest says "
                               f"{recorded.get('dtype')} {recorded.get('shape')}; the package was altered")
    if set(manifest["tensors"]) != set(found):
        raise PackageError(f"{tensor_file}: the manifest lists other tensors than the file holds; the package "
                           "was altered")


def _check_contents(tensor_file: Path, manifest: dict, keep: bool) -> dict[str, torch.Tensor] | None:
    """Checksums and finiteness, one tensor at a time; returns the tensors when `keep`."""
    from safetensors import safe_open

    digest, kept = hashlib.sha256(), {}
    with safe_open(tensor_file, framework="pt") as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name)
            if not bool(torch.isfinite(tensor).all()):
                raise PackageError(f"{tensor_file}: tensor {name} holds NaN or infinite values; such an expert "
                                   "would break every model it joins")
            _check_bias_sign(tensor_file, name, tensor)
            digest_tensor(digest, name, tensor)
            if keep:
                kept[name] = tensor
    if digest.hexdigest() != manifest["tensors_sha256"]:
        raise PackageError(f"{tensor_file}: tensor contents do not match the manifest checksum; the package was "
                           "modified after training")
    if sha256_file(tensor_file) != manifest["file_sha256"]:
        raise PackageError(f"{tensor_file}: file bytes differ from the manifest's file_sha256; the package was "
                           "altered")
    return kept if keep else None


def _check_bias_sign(tensor_file: Path, name: str, tensor: torch.Tensor) -> None:
    """A router bias is the method's negative bias, which training keeps at or below zero: it can only lower its
    own expert's share. A positive one would take routing weight, and the credit paid by it, from every other
    expert wherever a runtime applies the kept biases (`--router-bias`)."""
    if parse(PACKAGE_BIAS, name) is not None and bool((tensor > 0).any()):
        raise PackageError(f"{tensor_file}: tensor {name} is a positive router bias ({float(tensor.max()):g}); "
                           "training keeps it at or below zero, so the package was not made by train-expert")


def check_against_anchor(package_path: Path, manifest: dict, anchor_fingerprint: str, anchor_config: dict) -> None:
    """The package was trained on this anchor, and its recorded shape is the anchor's. A package whose
    fingerprint was computed by another scheme (an older flexolmo's, without the tokenizer) cannot show it was
    trained with this anchor's tokenizer: it is refused with that reason, and its owner trains it again."""
    scheme = manifest["anchor"].get("fingerprint_scheme", 1)
    if scheme != FINGERPRINT_SCHEME:
        raise PackageError(f"{package_path}: expert '{manifest['name']}' records an anchor fingerprint of scheme "
                           f"{scheme}, which did not cover the tokenizer (this flexolmo's is scheme "
                           f"{FINGERPRINT_SCHEME}); ask the owner to train and package it again on this anchor")
    if manifest["anchor"]["fingerprint"] != anchor_fingerprint:
        raise PackageError(
            f"{package_path}: expert '{manifest['name']}' was trained on another anchor (fingerprint "
            f"{manifest['anchor']['fingerprint'][:12]}..., this anchor is {anchor_fingerprint[:12]}...)"
        )
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size"):
        if manifest["anchor"][key] != anchor_config.get(key):
            raise PackageError(f"{package_path}: the manifest's anchor has {key} {manifest['anchor'][key]}, this "
                               f"anchor {anchor_config.get(key)}; shapes do not fit the anchor")


def check_dp_claim(package_path: Path, manifest: dict) -> None:
    """A DP record's epsilon is what its own mechanism parameters spend, and its steps are the training's."""

    dp = manifest["privacy"]["dp"]
    if dp is None:
        return
    steps = manifest["training"]["config"].get("optim", {}).get("steps")
    if steps != dp["steps"]:
        raise PackageError(f"{package_path}: the DP record counts {dp['steps']} steps, the training config "
                           f"{steps}; the privacy claim does not describe this training")
    releases = [tuple(release) for release in dp["prior_releases"]] + \
        [(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])]
    with warnings.catch_warnings():  # the accountant's notes on its order range say nothing about the claim
        warnings.simplefilter("ignore")
        recomputed = spent_epsilon(releases, dp["delta"])
    if abs(recomputed - dp["epsilon"]) > 1e-3 * max(1.0, recomputed):
        raise PackageError(f"{package_path}: the DP record claims epsilon {dp['epsilon']:.4g}, but its noise "
                           f"multiplier, sample rate and steps spend {recomputed:.4g}; the privacy claim is false")


def _read_files(path: Path) -> dict:
    """The manifest of the package at `path`, once it is no staging directory and holds exactly its files."""
    check_not_staging(path)
    manifest = read_manifest(path)
    _check_files(path)
    return manifest


def authenticate_package(path: Path | str, trusted_keys: TrustedKeys) -> Signer:
    """Who signed the package at `path` (its files checked first): a trusted key of the expert's own name, or a
    one-line TrustError. `load_package` with `trusted_keys` does this too, before verifying the contents."""
    path = Path(path)
    return _authenticate(path, _read_files(path), trusted_keys)


def load_package(
    path: Path | str,
    anchor_fingerprint: str | None = None,
    anchor_config: dict | None = None,
    with_tensors: bool = True,
    trusted_keys: TrustedKeys | None = None,
) -> ExpertPackage:
    """Read and verify all of a package (see the module docstring); with `trusted_keys`, also who signed it.

    Verification streams the tensor file one tensor at a time, so it takes one tensor of memory when
    `with_tensors` is False; a package is never trusted on its manifest alone.
    """
    path = Path(path)
    manifest = _read_files(path)
    signer = _authenticate(path, manifest, trusted_keys) if trusted_keys is not None else None
    tensor_file = path / TENSOR_FILE
    _check_header(tensor_file, manifest)
    tensors = _check_contents(tensor_file, manifest, keep=with_tensors)
    if anchor_fingerprint is not None and anchor_config is not None:
        check_against_anchor(path, manifest, anchor_fingerprint, anchor_config)
    check_dp_claim(path, manifest)
    return ExpertPackage(path, manifest, tensors, package_digest(path), signer)
