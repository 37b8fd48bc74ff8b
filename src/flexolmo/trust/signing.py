"""Key pairs and detached signatures over every file of a directory (an expert package or a merged model).

Signatures are in the OpenSSF model-signing format (`model-signing` on PyPI, the Sigstore project's library):
a Sigstore bundle in `model.sig` inside the directory, holding a DSSE envelope over an in-toto statement that
lists every file with its SHA-256, signed with an elliptic-curve key (NIST P-256). Signing and verifying run
offline: no transparency log, no certificate authority; trust comes from the public keys the verifier holds.
The same signature verifies with model-signing's own command line:
`model_signing verify key DIR --signature DIR/model.sig --public_key NAME.pub`.

A member is named by its key files: `NAME.key` (private, mode 0600) and `NAME.pub`. A verifier holds a
directory of trusted `*.pub` files and learns a signer's name from the file stem of the key that verifies.
Private keys are stored unencrypted (protected by file permissions only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import atomic_write_bytes, sha256_file

SIGNATURE_FILE = "model.sig"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The key that vouches for merged models. Which file that is, the verifier decides: it is the `coordinator.pub`
# of the verifier's own trusted-keys directory, so no member can vouch for a merged model with its own key.
COORDINATOR_KEY_NAME = "coordinator"
# The anchor's own expert: no member's key may carry its name.
RESERVED_KEY_NAMES = frozenset({"public"})


@dataclass(frozen=True)
class Signer:
    """Who signed a directory: the trusted key's name (its file stem) and its key id."""

    name: str
    key_id: str

    def as_dict(self) -> dict:
        return {"name": self.name, "key_id": self.key_id}


def _public_pem(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key) -> str:
    """SHA-256 of the PEM public key: the `hint` model-signing writes into every signature it makes."""
    return hashlib.sha256(_public_pem(public_key)).hexdigest()


def _write_new_file(target: Path, payload: bytes, mode: int) -> None:
    """Create `target` with `payload` and `mode`, atomically and never over an existing file."""
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, mode)
        os.link(staging, target)  # fails if target exists: no key is ever overwritten
    finally:
        os.unlink(staging)


def generate_key_pair(name: str, out_dir: Path | str) -> tuple[Path, Path]:
    """A new P-256 key pair as `out_dir/NAME.key` (private, 0600) and `out_dir/NAME.pub`; never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not _NAME.fullmatch(name):
        raise TrustError(f"invalid key name {name!r}: use the member's expert name (letters, digits, '.', '_', '-')")
    if name in RESERVED_KEY_NAMES:
        raise TrustError(f"'{name}' is the anchor's own expert and cannot be a member's key name; "
                         "choose another --name")
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise TrustError(f"{path} already exists: keys are never overwritten; choose another --out or --name")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_new_file(private_path, private_pem, 0o600)
        _write_new_file(public_path, _public_pem(key.public_key()), 0o644)
    except OSError as error:
        private_path.unlink(missing_ok=True)
        raise TrustError(f"cannot write keys to {out_dir}: {error.strerror or error}; choose a writable --out") \
            from None
    return private_path, public_path


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise TrustError(f"{path}: no such key file; create one with `flexolmo keygen --name NAME --out DIR`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise TrustError(f"{path}: not an unencrypted PEM private key ({str(error).splitlines()[0]}); pass the "
                         f"NAME{PRIVATE_SUFFIX} file that `flexolmo keygen` wrote") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                   "secp521r1"):
        raise TrustError(f"{path}: not a P-256/P-384/P-521 elliptic-curve key; create one with `flexolmo keygen`")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError, OSError) as error:
        raise TrustError(f"{path}: not a PEM public key ({str(error).splitlines()[0]}); every *{PUBLIC_SUFFIX} "
                         "in the trusted-keys directory must be one that `flexolmo keygen` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TrustError(f"{path}: not an elliptic-curve public key; use keys made by `flexolmo keygen`")
    return key


def key_name(key_path: Path | str) -> str:
    """The member name a key file stands for: its file stem."""
    return Path(key_path).name.removesuffix(PRIVATE_SUFFIX).removesuffix(PUBLIC_SUFFIX)


def key_signer(key_path: Path | str) -> Signer:
    """Who a private key signs as: its name and key id."""
    return Signer(key_name(key_path), key_id(load_private_key(Path(key_path)).public_key()))


def check_signing_key(key_path: Path | str, name: str) -> None:
    """Before any work: the key loads, and it is the key of `name` (a member signs only its own packages)."""
    load_private_key(Path(key_path))
    if key_name(key_path) != name:
        raise TrustError(f"{key_path} is the key of '{key_name(key_path)}', not of '{name}'; verifiers refuse a "
                         f"package signed by another member's key: sign with {name}{PRIVATE_SUFFIX}")


def sign_directory(path: Path | str, key_path: Path | str) -> Signer:
    """Sign every file of `path` (except the signature itself) with `key_path`; writes `path/model.sig`."""
    from model_signing import hashing, signing

    path, key_path = Path(path), Path(key_path)
    signer = key_signer(key_path)
    with tempfile.TemporaryDirectory() as scratch:
        signature = Path(scratch) / SIGNATURE_FILE
        try:
            signing.Config().use_elliptic_key_signer(private_key=key_path).set_hashing_config(
                hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])).sign(path, signature)
        except (ValueError, OSError) as error:
            raise TrustError(f"cannot sign {path}: {str(error).splitlines()[0]}") from None
        atomic_write_bytes(path / SIGNATURE_FILE, signature.read_bytes())
    return signer


class TrustedKeys:
    """The public keys a verifier trusts: every `*.pub` of one directory, named by file stem."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TrustError(f"{self.directory}: no such directory of trusted keys; collect every member's "
                             f"NAME{PUBLIC_SUFFIX} there")
        self.paths: dict[str, Path] = {}
        self._names_by_id: dict[str, str] = {}
        for path in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}")):
            name = key_name(path)
            identity = key_id(load_public_key(path))
            if identity in self._names_by_id:
                raise TrustError(f"{path} and {self.paths[self._names_by_id[identity]]} hold the same key; one key "
                                 "must name one member")
            self.paths[name] = path
            self._names_by_id[identity] = name
        if not self.paths:
            raise TrustError(f"{self.directory}: no *{PUBLIC_SUFFIX} files; collect every member's public key there")

    def name_of(self, identity: str) -> str | None:
        return self._names_by_id.get(identity)

    def key_id_of(self, name: str) -> str | None:
        return next((identity for identity, known in self._names_by_id.items() if known == name), None)


def _read_bundle(path: Path) -> dict:
    signature = path / SIGNATURE_FILE
    if not signature.exists():
        raise TrustError(f"{path}: not signed (no {SIGNATURE_FILE}); its author signs it with "
                         f"`flexolmo sign {path} --sign-key NAME{PRIVATE_SUFFIX}`")
    try:
        bundle = json.loads(signature.read_text())
        hint, payload = bundle["verificationMaterial"]["publicKey"]["hint"], bundle["dsseEnvelope"]["payload"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        raise TrustError(f"{signature}: not a model-signing signature bundle; sign {path} again") from None
    if not isinstance(hint, str) or not isinstance(payload, str):
        raise TrustError(f"{signature}: not a model-signing signature bundle; sign {path} again")
    return bundle


def _signed_digests(path: Path) -> dict[str, str]:
    """File name -> SHA-256 as the signature lists them (authentic only once the signature verified)."""
    bundle = _read_bundle(path)
    try:
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        return {resource["name"]: resource["digest"] for resource in statement["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError) as error:  # binascii.Error and JSONDecodeError are ValueErrors
        raise TrustError(f"{path / SIGNATURE_FILE}: its statement lists no files ({type(error).__name__}); sign "
                         f"{path} again") from None


def _describe_changes(path: Path) -> str:
    """Which files differ from what the signature lists."""
    signed = _signed_digests(path)
    current = {name: sha256_file(path / name) for name in _files_in(path)}
    changed = sorted(name for name in signed if name in current and current[name] != signed[name])
    parts = [f"changed since signing: {', '.join(changed)}"] if changed else []
    if sorted(set(current) - set(signed)):
        parts.append(f"added since signing: {', '.join(sorted(set(current) - set(signed)))}")
    if sorted(set(signed) - set(current)):
        parts.append(f"removed since signing: {', '.join(sorted(set(signed) - set(current)))}")
    return "; ".join(parts) or "the files differ"


def _files_in(path: Path) -> set[str]:
    """Every file under `path` except the signature and git's own files (model-signing never signs those)."""
    files = {item.relative_to(path).as_posix() for item in path.rglob("*") if item.is_file()}
    return {name for name in files if name != SIGNATURE_FILE and not name.split("/")[0].startswith(".git")}


def verify_directory(path: Path | str, trusted: TrustedKeys) -> Signer:
    """Check that a trusted key signed every file of `path` as it is now; return who signed it."""
    from model_signing import verifying

    path = Path(path)
    hint = _read_bundle(path)["verificationMaterial"]["publicKey"]["hint"]
    name = trusted.name_of(hint)
    if name is None:
        raise TrustError(f"{path}: signed by a key that is not in {trusted.directory} (key id {hint[:16]}...); "
                         "add the signer's public key there only if you trust it")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=trusted.paths[name]).verify(
            path, path / SIGNATURE_FILE)
    except ValueError as error:
        if "mismatch" not in str(error).lower():
            raise TrustError(f"{path}: cannot check the signature in {SIGNATURE_FILE} ({str(error).splitlines()[0]})") \
                from None
        raise TrustError(f"{path}: the signature by '{name}' does not match the files ({_describe_changes(path)}); "
                         "the directory was altered after signing") from None
    except Exception as error:  # cryptography's InvalidSignature and the bundle parser's errors share no base
        raise TrustError(f"{path}: the signature in {SIGNATURE_FILE} is invalid ({type(error).__name__}); "
                         "the signature or the directory was altered") from None
    unsigned = _files_in(path) - set(_signed_digests(path))
    if unsigned:
        raise TrustError(f"{path}: {', '.join(sorted(unsigned))} not covered by the signature; remove them or "
                         "sign again")
    return Signer(name, hint)
