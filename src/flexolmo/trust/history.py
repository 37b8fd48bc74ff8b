"""The merge log: one JSON line per operation that produced a merged model, carried from version to version.

`merge`, `add` and `remove` (and router tuning) write a new model directory; each copies the log of the model
it started from into the new directory and appends one record: the operation, when, who (the coordinator's
signing key, when it signed), the packages added by name, digest and signer, the experts removed (name and
package digest only: an opt-out leaves no manifest behind), the resulting experts and top-k, and the digests
of the model it started from and of the model it wrote. The model digest covers every file of the directory
except this log and the signature, so a log entry can name the version it produced. The log sits inside the
model directory, so the coordinator's signature covers it as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import atomic_write_bytes, sha256_file
from flexolmo.core.provenance import utc_now
from flexolmo.trust.signing import SIGNATURE_FILE

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


def append_record(staging: Path, source: Path | None, record: dict) -> dict:
    """Copy `source`'s log into the new model at `staging` and append `record`, completed with the time and
    the digests of both versions; returns the full record."""
    previous = read_history(source) if source is not None else []
    full = {"operation": record["operation"], "when": utc_now(), **record,
            "from_model_sha256": previous[-1]["model_sha256"] if previous else None,
            "model_sha256": model_digest(staging)}
    lines = [json.dumps(entry, sort_keys=False) for entry in [*previous, full]]
    atomic_write_bytes(staging / HISTORY_FILE, ("\n".join(lines) + "\n").encode())
    return full
