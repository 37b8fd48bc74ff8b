"""The entry points of `flexolmo verify` and `flexolmo sign` for a merged model, and of `flexolmo sign` for any
artefact.

A package is verified by `package.load_package`. A merged model is verified by `verify_merged_model` (in
`model.merged_format`, beside `authenticate_merged_model`, which every command acting on a merged model runs
first), which checks what a model user can check without the packages: the record, every slot against it, the
files against the merge log, and (with trusted keys) the coordinator's signature.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexolmo.coordinator.expert_sources import PackageExpert
from flexolmo.core.errors import TrustError
from flexolmo.core.tensor_io import LazyReader
from flexolmo.model.anchor import ANCHOR_FAMILIES
from flexolmo.model.merged_format import (
    MERGED_METADATA_FILE,
    ROUTER_TUNING_KEY,
    authenticate_merged_model,
    read_merged_info,
    verify_merged_model,
)
from flexolmo.owner.package import load_package
from flexolmo.trust.history import check_unchanged
from flexolmo.trust.signing import (
    COORDINATOR_KEY_NAME,
    Signer,
    TrustedKeys,
    check_signing_key,
    key_signer,
    sign_directory,
)

__all__ = ["check_member_slot", "is_merged_model", "sign_artefact", "verify_merged_model"]


def is_merged_model(path: Path | str) -> bool:
    return (Path(path) / MERGED_METADATA_FILE).exists()


def sign_artefact(path: Path | str, key_path: Path | str, trusted_keys: TrustedKeys | None = None) -> Signer:
    """Sign in place a package (verified first, and named as the key) or a merged model (unchanged since its
    last logged operation and, with `trusted_keys`, signed by the coordinator as it is now, so that a signature
    is only ever renewed, never put on weights the coordinator did not write); returns who signed."""
    path = Path(path)
    if is_merged_model(path):
        if key_signer(key_path).name != COORDINATOR_KEY_NAME:
            raise TrustError(f"{key_path} is not the coordinator's key ({COORDINATOR_KEY_NAME}.key); only the "
                             "coordinator signs merged models, and verifiers refuse any other signer")
        authenticate_merged_model(path, trusted_keys, "sign")
        read_merged_info(path)  # a well-formed record, and never another run's staging directory
        check_unchanged(path)
    else:
        if trusted_keys is not None:
            raise TrustError(f"{path}: --trusted-keys authenticates a merged model before it is signed again; a "
                             "package is signed by its owner, who wrote it: leave --trusted-keys out")
        package = load_package(path, with_tensors=False)
        check_signing_key(key_path, package.name)
    return sign_directory(path, key_path)


def check_member_slot(model: Path | str, package_path: Path | str, trusted_keys: TrustedKeys | None = None) -> dict:
    """A member's own check that a merged model holds its expert as it handed it over: the model verifies
    (`verify_merged_model`, signature included with `trusted_keys`), the package verifies against the model's
    anchor, the model has an expert of the package's name recorded with this package's digest, and that slot's
    FFN weights are the package's, bit for bit in the model's dtype. Its router row must be the package's too,
    unless the record says the coordinator tuned the routers (then it is reported as retuned, not refused).

    The slot digests prove a slot is what the record says; only the member holds what it should say, so this
    check is the one a member runs to see that nobody swapped, scaled or renamed its expert.
    Returns {"name", "slot", "router": "as submitted" | "retuned by the coordinator"}."""
    model = Path(model)
    verify_merged_model(model, trusted_keys)
    info = read_merged_info(model)
    package = load_package(package_path, info.anchor_fingerprint, info.anchor_config, with_tensors=False,
                           trusted_keys=trusted_keys)
    if package.name not in info.expert_names:
        raise TrustError(f"{model} holds no expert named '{package.name}' (it has: {', '.join(info.expert_names)});"
                         f" see `flexolmo history {model}` for an opt-out")
    slot = info.expert_names.index(package.name)
    recorded = info.metadata["experts"][slot].get("package_sha256")
    if recorded != package.digest:
        raise TrustError(f"{model}: expert '{package.name}' was merged from another package (digest "
                         f"{str(recorded)[:12]}, yours {package.digest[:12]})")
    family = ANCHOR_FAMILIES[info.anchor_config["model_type"]]
    reader, submitted = LazyReader(model), PackageExpert(package)
    retuned = False
    for layer in range(info.anchor_config["num_hidden_layers"]):
        for proj in family.ffn_projections:
            held = reader.get(family.merged_expert.format(layer=layer, expert=slot, proj=proj))
            if not torch.equal(held, submitted.ffn(layer, proj).to(held.dtype)):
                raise TrustError(f"{model}: slot {slot} ('{package.name}') holds other {proj} weights in layer "
                                 f"{layer} than your package")
        row = reader.get(family.merged_router.format(layer=layer))[slot]
        retuned |= not torch.equal(row, submitted.router_row(layer).to(row.dtype))
    tunings = info.metadata.get(ROUTER_TUNING_KEY) or []
    if retuned and not any(isinstance(tuning, dict) and package.name in tuning.get("tuned_experts", ())
                           for tuning in tunings):
        raise TrustError(f"{model}: slot {slot} ('{package.name}') has another router row than your package, and "
                         "no router tuning in its record covered that expert")
    return {"name": package.name, "slot": slot,
            "router": "retuned by the coordinator" if retuned else "as submitted"}
