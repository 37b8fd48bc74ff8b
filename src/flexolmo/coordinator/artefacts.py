"""The entry points of `flexolmo verify` and `flexolmo sign` for a merged model, and of `flexolmo sign` for any
artefact.

A package is verified by `package.load_package`. A merged model is verified by `verify_merged_model`, which
checks what a model user can check without the packages: the record, every slot against it, the files against
the merge log, and (with trusted keys) the coordinator's signature.
"""

from __future__ import annotations

from pathlib import Path

from flexolmo.core.errors import TrustError
from flexolmo.model.anchor import ANCHOR_FAMILIES
from flexolmo.model.merged_format import MERGED_METADATA_FILE, read_merged_info
from flexolmo.owner.package import load_package
from flexolmo.trust.history import check_unchanged, read_history
from flexolmo.trust.record import verify_slots
from flexolmo.trust.signing import (
    COORDINATOR_KEY_NAME,
    Signer,
    TrustedKeys,
    check_signing_key,
    key_signer,
    sign_directory,
    verify_directory,
)


def is_merged_model(path: Path | str) -> bool:
    return (Path(path) / MERGED_METADATA_FILE).exists()


def verify_merged_model(path: Path | str, trusted_keys: TrustedKeys | None = None) -> dict:
    """Check a merged model: its record is well formed, every slot holds the weights its record names, its
    files are the version its merge log last wrote, and (with `trusted_keys`) a trusted key signed every file
    and each member's recorded signer key is the trusted key of that name.
    Returns {"experts": [...], "signer": Signer or None, "operations": number of logged operations}."""
    path = Path(path)
    info = read_merged_info(path)
    check_unchanged(path)
    family = ANCHOR_FAMILIES[info.anchor_config["model_type"]]
    verify_slots(path, info.metadata, info.expert_names, family.ffn_projections)
    signer = None
    if trusted_keys is not None:
        signer = verify_directory(path, trusted_keys)
        if signer.name != COORDINATOR_KEY_NAME:
            raise TrustError(f"{path}: signed by '{signer.name}', not by the coordinator ({COORDINATOR_KEY_NAME}.pub in "
                             f"{trusted_keys.directory}); only the coordinator's key vouches for a merged model")
        for entry in info.metadata["experts"]:
            recorded = entry.get("signer")
            if recorded and trusted_keys.key_id_of(recorded["name"]) != recorded["key_id"]:
                raise TrustError(f"{path}: expert '{entry['name']}' was merged as signed by a key that is not the "
                                 f"trusted key of '{recorded['name']}' in {trusted_keys.directory}")
    return {"experts": info.metadata["experts"], "signer": signer, "operations": len(read_history(path))}


def sign_artefact(path: Path | str, key_path: Path | str) -> Signer:
    """Sign in place a package (verified first, and named as the key) or a merged model (unchanged since its
    last logged operation); returns who signed."""
    path = Path(path)
    if is_merged_model(path):
        if key_signer(key_path).name != COORDINATOR_KEY_NAME:
            raise TrustError(f"{key_path} is not the coordinator's key ({COORDINATOR_KEY_NAME}.key); only the "
                             "coordinator signs merged models, and verifiers refuse any other signer")
        check_unchanged(path)
    else:
        package = load_package(path, with_tensors=False)
        check_signing_key(key_path, package.name)
    return sign_directory(path, key_path)
