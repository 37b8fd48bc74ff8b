"""The entry points of `flexolmo verify` and `flexolmo sign` for a merged model, and of `flexolmo sign` for any
artefact.

A package is verified by `package.load_package`. A merged model is verified by `verify_merged_model` (in
`model.merged_format`, beside `authenticate_merged_model`, which every command acting on a merged model runs
first), which checks what a model user can check without the packages: the record, every slot against it, the
files against the merge log, and (with trusted keys) the coordinator's signature.
"""

from __future__ import annotations

from pathlib import Path

from flexolmo.core.errors import TrustError
from flexolmo.model.merged_format import (
    MERGED_METADATA_FILE,
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

__all__ = ["is_merged_model", "sign_artefact", "verify_merged_model"]


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
