"""The merge log: one JSON line per operation that produced a merged model, carried from version to version.

`merge`, `add` and `remove` (and router tuning) write a new model directory; each copies the log of the model
it started from into the new directory and appends one record: the operation, when, who (the coordinator's
signing key, when it signed), the packages added by name, digest and signer, the experts removed (name and
package digest only: an opt-out leaves no manifest behind), the resulting experts and top-k, and the digests
of the model it started from and of the model it wrote. The model digest covers every file of the directory
except this log and the signature, so a log entry can name the version it produced. The log sits inside the
model directory, so the coordinator's signature covers it as well.

The log is also a signed chain, so the whole history is authenticated, not only the last state: every record
names the SHA-256 of the record before it (`previous_sha256`, over its canonical JSON), and a record written
with the coordinator's key carries the key's ECDSA signature over its own canonical JSON (`signature`). An
earlier operation therefore cannot be rewritten or dropped (say, the `remove` of an opted-out member) without
the coordinator's key, even by someone whose edited copy a later, careless operation built on. Records written
before the chain existed carry neither field and are reported as such.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import atomic_write_bytes, sha256_file
from flexolmo.core.provenance import utc_now
from flexolmo.trust.signing import (
    COORDINATOR_KEY_NAME,
    SIGNATURE_FILE,
    TrustedKeys,
    key_signer,
    load_private_key,
    load_public_key,
)

HISTORY_FILE = "flexolmo_history.jsonl"


def model_digest(path: Path | str) -> str:
    """SHA-256 over (name, SHA-256) of every file of a model directory except the log and the signature."""
    path = Path(path)
    files = sorted(item for item in path.rglob("*") if item.is_file()
                   and item.relative_to(path).as_posix() not in (HISTORY_FILE, SIGNATURE_FILE))
    digest = hashlib.sha256()
    for item in files:
        digest.update(f"{item.relative_to(path).as_posix()}|{sha256_file(item)}\n".encode())
    return digest.hexdigest()


def read_history(path: Path | str) -> list[dict]:
    """The records of a model's log, oldest first (empty when it has none)."""
    log = Path(path) / HISTORY_FILE
    if not log.exists():
        return []
    try:
        lines = log.read_text().splitlines()
    except UnicodeDecodeError:
        raise TrustError(f"{log}: not UTF-8 text; the log was altered") from None
    except OSError as error:
        raise TrustError(f"{log}: cannot read it ({error.strerror or error})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise TrustError(f"{log}:{number}: not a JSON record; the log was altered") from None
        problem = _record_problem(record)
        if problem:
            raise TrustError(f"{log}:{number}: not a merge-log record ({problem}); the log was altered")
        records.append(record)
    return records


def _record_problem(record) -> str | None:
    """What makes `record` other than a record `append_record` writes, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("operation", "when", "model_sha256"):
        if not isinstance(record.get(key), str):
            return f"no text '{key}'"
    if not isinstance(record.get("top_k"), int) or not isinstance(record.get("experts"), list):
        return "no 'top_k' and 'experts'"
    for key in ("added", "removed"):
        entries = record.get(key)
        if not isinstance(entries, list) or not all(_is_expert(entry) for entry in entries):
            return f"'{key}' is not a list of named experts"
    if not (record.get("by") is None or _is_signer(record["by"])):
        return "'by' is not a signer"
    return None


def _is_signer(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str)


def _is_expert(entry) -> bool:
    """A logged expert: a name, a package digest (None for the anchor's) and a signer or None."""
    return (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("package_sha256"), (str, type(None)))
            and (entry.get("signer") is None or _is_signer(entry["signer"])))


def opted_out(records: list[dict]) -> dict[str, dict]:
    """The experts whose owners opted out, by name, each with the `remove` record that removed it last, unless
    a later operation added that name again (with the owner's consent, `add --readmit`)."""
    out: dict[str, dict] = {}
    for record in records:
        for entry in record.get("added") or []:
            out.pop(entry.get("name"), None)
        if record.get("operation") == "remove":
            out.update({entry.get("name"): record for entry in record.get("removed") or []})
    return out


def check_unchanged(path: Path | str) -> None:
    """The model is the version its log's last record wrote: nothing was edited outside flexolmo since."""
    records = read_history(path)
    if not records:
        raise TrustError(f"{path}: has no merge log ({HISTORY_FILE}); it was not written by this flexolmo's "
                         "merge, or the log was removed")
    if model_digest(path) != records[-1]["model_sha256"]:
        raise TrustError(f"{path}: its files differ from the version its merge log recorded (last operation: "
                         f"{records[-1]['operation']} at {records[-1]['when']}); it was edited outside flexolmo")


def _canonical(record: dict, signed: bool = False) -> bytes:
    """A record as compact JSON with sorted keys: without its signature (what the signature covers), or whole."""
    body = record if signed else {key: value for key, value in record.items() if key != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_digest(record: dict) -> str:
    """SHA-256 of a whole record (its signature included): what the next record names as `previous_sha256`."""
    return hashlib.sha256(_canonical(record, signed=True)).hexdigest()


def _sign(record: dict, key_path: Path) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_private_key(key_path)
    return base64.b64encode(key.sign(_canonical(record), ec.ECDSA(hashes.SHA256()))).decode()


def append_record(staging: Path, source: Path | None, record: dict, sign_key: Path | None = None) -> dict:
    """Copy `source`'s log into the new model at `staging` and append `record`, completed with the time, the
    digests of both versions and of the previous record, and (with `sign_key`) signed by that key, which the
    record names as `by`; returns the full record."""
    previous = read_history(source) if source is not None else []
    by = key_signer(sign_key).as_dict() if sign_key is not None else record.get("by")
    full = {"operation": record["operation"], "when": utc_now(), **record, "by": by,
            "from_model_sha256": previous[-1]["model_sha256"] if previous else None,
            "model_sha256": model_digest(staging),
            "previous_sha256": record_digest(previous[-1]) if previous else None}
    if sign_key is not None:
        full["signature"] = _sign(full, sign_key)
    lines = [json.dumps(entry, sort_keys=False) for entry in [*previous, full]]
    atomic_write_bytes(staging / HISTORY_FILE, ("\n".join(lines) + "\n").encode())
    return full


@dataclass(frozen=True)
class HistoryCheck:
    """What `verify_history` found: how many records, how many signed by the coordinator, unsigned (written
    without a key) and from before the chain existed."""

    operations: int
    signed: int
    unsigned: int
    before_chain: int

    def describe(self) -> str:
        parts = [f"{self.signed} signed by the coordinator"]
        if self.unsigned:
            parts.append(f"{self.unsigned} written without a key")
        if self.before_chain:
            parts.append(f"{self.before_chain} from before signed logs")
        return f"{self.operations} logged operations ({', '.join(parts)}), chain intact"


def _check_signature(log: str, number: int, record: dict, trusted: TrustedKeys) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    by = record.get("by")
    if not _is_signer(by):
        raise TrustError(f"{log}:{number}: a signed record names no signer; the log was altered")
    if COORDINATOR_KEY_NAME not in trusted.paths:
        raise TrustError(f"{trusted.directory}: no {COORDINATOR_KEY_NAME}.pub; put the coordinator's public key "
                         "there to authenticate a merged model")
    if trusted.key_id_of(COORDINATOR_KEY_NAME) != by.get("key_id"):
        raise TrustError(f"{log}:{number}: ({record['operation']} at {record['when']}) was signed by a key that is "
                         f"not {COORDINATOR_KEY_NAME}.pub in {trusted.directory}; only the coordinator signs a merged "
                         "model's log")
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        public = load_public_key(trusted.paths[COORDINATOR_KEY_NAME])
        public.verify(signature, _canonical(record), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise TrustError(f"{log}:{number}: the coordinator's signature does not match this record "
                         f"({record['operation']} at {record['when']}); the log was altered") from None


def verify_history(path: Path | str, trusted: TrustedKeys) -> HistoryCheck:
    """Authenticate the whole log: every record names its predecessor's digest, and every record that claims
    a signer carries the coordinator's valid signature. One-line TrustError naming the record otherwise."""
    log = str(Path(path) / HISTORY_FILE)
    records = read_history(path)
    signed = unsigned = before_chain = 0
    for number, record in enumerate(records, start=1):
        if "previous_sha256" not in record:  # written before the chain existed: nothing to check it by
            if any("previous_sha256" in later for later in records[:number - 1]):
                raise TrustError(f"{log}:{number}: a record without a link follows linked ones; the log was "
                                 "altered")
            before_chain += 1
            continue
        expected = record_digest(records[number - 2]) if number > 1 else None
        if record["previous_sha256"] != expected:
            raise TrustError(f"{log}:{number}: does not follow the record before it (an earlier operation was "
                             f"rewritten, dropped or reordered); the log was altered")
        if "signature" in record:
            _check_signature(log, number, record, trusted)
            signed += 1
        elif record.get("by") is not None:
            raise TrustError(f"{log}:{number}: names a signer but carries no signature; the log was altered")
        else:
            unsigned += 1
    return HistoryCheck(len(records), signed, unsigned, before_chain)
