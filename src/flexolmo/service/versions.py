"""Publishing numbered model versions: the merge of the admitted, active experts, with a signed in-toto
attestation and a model card, published atomically.

A version number is reserved first, in its own transaction: the `versions` table's primary key (the number)
and its unique `inputs_sha256` (anchor and input digests) make two processes publishing at once either take
different numbers for different inputs or refuse the second merge of the same inputs. The merge is then
written into a staging directory and renamed into place, so a crash leaves no half-published version;
a reservation whose merge failed is released, and one left by a killed process can be cleared with
`release_stale`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flexolmo.coordinator.artefacts import verify_merged_model
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import TrustError
from flexolmo.service.audit import append_event, now_iso
from flexolmo.service.database import get_setting, in_transaction
from flexolmo.service.envelopes import INTOTO_TYPE, sign_json, verify_json
from flexolmo.service.errors import Conflict
from flexolmo.service.model_card import model_card
from flexolmo.service.models import Version
from flexolmo.service.registry import active_submissions
from flexolmo.trust.history import append_record, model_digest, read_history
from flexolmo.trust.signing import TrustedKeys, sign_directory

ATTESTATION_FILE = "attestation.intoto.json"
STALE_AFTER = timedelta(hours=1)


def inputs_digest(anchor_fingerprint: str, experts: list[dict]) -> str:
    return hashlib.sha256(json.dumps({"anchor": anchor_fingerprint, "experts": experts},
                                     sort_keys=True).encode()).hexdigest()


def _reserve_once(session: Session) -> tuple[Version, list[Path], dict]:
    rows = active_submissions(session)
    if not rows:
        raise Conflict("no admitted, active expert to publish")
    experts = [{"name": r.member, "package_sha256": r.package_sha256} for r in rows]
    digest = inputs_digest(get_setting(session, "anchor_fingerprint"), experts)
    existing = session.scalar(select(Version).where(Version.inputs_sha256 == digest))
    if existing is not None:
        hint = "; if its publisher was killed, publish with --release-stale" if existing.status == "publishing" else ""
        raise Conflict(f"these experts were already published as version {existing.number} ({existing.status}){hint}")
    number = (session.scalar(select(func.max(Version.number))) or 0) + 1
    version = Version(number=number, inputs_sha256=digest, experts=json.dumps(experts), status="publishing",
                      created_at=now_iso())
    session.add(version)
    settings = {key: get_setting(session, key) for key in ("anchor", "store", "coordinator_key",
                                                           "anchor_fingerprint")}
    return version, [Path(r.stored_path) for r in rows], settings


def reserve(engine: Engine) -> tuple[int, list[dict], list[Path], dict]:
    """Take the next version number for the current inputs; a collision with another process is retried."""
    def take(session: Session) -> tuple[int, list[dict], list[Path], dict]:
        version, paths, settings = _reserve_once(session)
        return version.number, json.loads(version.experts), paths, settings

    return in_transaction(engine, take)


def attestation(number: int, settings: dict, experts: list[dict], output: str) -> dict:
    """The in-toto statement: subject the merged model, materials the anchor and every input package."""
    return {"_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": f"flexolmo-version-{number}", "digest": {"sha256": output}}],
            "predicateType": "https://flexolmo.dev/consortium-version/v1",
            "predicate": {"version": number, "anchor": {"fingerprint": settings["anchor_fingerprint"]},
                          "inputs": [{"name": e["name"], "digest": {"sha256": e["package_sha256"]}}
                                     for e in experts],
                          "builder": "flexolmo coordinator publish", "published_at": now_iso()}}


def _build(number: int, experts: list[dict], paths: list[Path], settings: dict, top_k: int) -> tuple[Path, str]:
    store, key = Path(settings["store"]), Path(settings["coordinator_key"])
    staging, final = store / "versions" / f".{number}.staging", store / "versions" / str(number)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = staging / "model"
    merge(Path(settings["anchor"]), paths, model, top_k=min(top_k, len(paths) + 1),
          trust=CoordinatorTrust(sign_key=key))
    output = model_digest(model)
    statement = attestation(number, settings, experts, output)
    (model / ATTESTATION_FILE).write_text(json.dumps(sign_json(statement, INTOTO_TYPE, key), indent=1))
    (model / "README.md").write_text(model_card(number, experts, paths, statement))
    # The card and attestation are logged as one more operation and signed, so the model still verifies.
    append_record(model, model, {"operation": "publish", "version": number, "output_sha256": output})
    sign_directory(model, key)
    model.rename(staging / "published")
    staging.rename(final)
    return final / "published", output


def publish(engine: Engine, top_k: int = 2) -> dict:
    """Publish the next version; returns its row as a dict. A failure releases the reservation."""
    number, experts, paths, settings = reserve(engine)
    try:
        path, output = _build(number, experts, paths, settings, top_k)
    except BaseException:
        shutil.rmtree(Path(settings["store"]) / "versions" / f".{number}.staging", ignore_errors=True)
        in_transaction(engine, lambda session: session.delete(session.get(Version, number)))
        raise
    def finish(session: Session) -> None:
        version = session.get(Version, number)
        version.status, version.path, version.output_sha256 = "published", str(path), output
        append_event(session, "version-published", "coordinator",
                     {"version": number, "experts": experts, "output_sha256": output})

    in_transaction(engine, finish)
    return {"number": number, "path": str(path), "output_sha256": output, "experts": experts}


def release_stale(engine: Engine, older_than: timedelta = STALE_AFTER) -> list[int]:
    """Release reservations left by a killed publisher, so their inputs can be published again."""
    cutoff = (datetime.now(timezone.utc) - older_than).isoformat()
    with Session(engine) as session, session.begin():
        stale = session.scalars(select(Version).where(Version.status == "publishing",
                                                      Version.created_at < cutoff)).all()
        for version in stale:
            shutil.rmtree(Path(get_setting(session, "store")) / "versions" / f".{version.number}.staging",
                          ignore_errors=True)
            append_event(session, "reservation-released", "coordinator", {"version": version.number})
            session.delete(version)
        return [version.number for version in stale]


def verify_version(model: Path, coordinator_public_key: Path) -> dict:
    """Check a published version as a user would: the coordinator signed every file, the merged model is the
    one its log recorded, the attestation is the coordinator's and names this model's digest and inputs.
    Returns the attested statement."""
    with tempfile.TemporaryDirectory() as keys:
        shutil.copy(coordinator_public_key, Path(keys) / Path(coordinator_public_key).name)
        checked = verify_merged_model(model, TrustedKeys(keys))
    statement = verify_json(json.loads((model / ATTESTATION_FILE).read_text()), INTOTO_TYPE, coordinator_public_key)
    records = read_history(model)
    merged = records[-2]["model_sha256"] if len(records) >= 2 and records[-1]["operation"] == "publish" else None
    if statement["subject"][0]["digest"]["sha256"] != merged:
        raise TrustError(f"{model}: the attestation names output {statement['subject'][0]['digest']['sha256'][:16]}"
                         f"..., not the merged model its log records")
    attested = {i["name"]: i["digest"]["sha256"] for i in statement["predicate"]["inputs"]}
    merged_inputs = {e["name"]: e.get("package_sha256") for e in checked["experts"] if e["name"] != "public"}
    if attested != merged_inputs:
        raise TrustError(f"{model}: the attestation's inputs {sorted(attested)} are not the merged experts "
                         f"{sorted(merged_inputs)}")
    return statement
