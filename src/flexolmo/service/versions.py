"""Publishing numbered model versions: the merge of the admitted, active experts, with a signed in-toto
attestation and a model card, published atomically.

A version number is reserved first, in its own transaction: the `versions` table's primary key (the number)
and its unique `inputs_sha256` (anchor and input digests) make two processes publishing at once either take
different numbers for different inputs or refuse the second merge of the same inputs. The merge is then
written into a staging directory under the local work directory (the input packages fetched from the store
and checked against their digests) and renamed into place, so a crash leaves no half-published version. A
reservation whose merge failed is released at once; one left by a killed publisher holds a lease it no longer
renews (`jobs.Heartbeat`), and the next publisher releases it, and its staging directory, once that lease has
run out, then publishes those inputs again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from flexolmo.coordinator.artefacts import verify_merged_model
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import TrustError
from flexolmo.service.audit import append_event, now_iso
from flexolmo.service.database import get_setting, in_transaction
from flexolmo.service.envelopes import INTOTO_TYPE, sign_json, verify_json
from flexolmo.service.errors import Conflict
from flexolmo.service.jobs import Heartbeat, LeaseLost, lease_time
from flexolmo.service.model_card import model_card
from flexolmo.service.models import Version
from flexolmo.service.registry import active_submissions
from flexolmo.service.storage import configured, work_dir
from flexolmo.service.settings import DEFAULT_TOP_K, LEASE
from flexolmo.service.store import fetch_package
from flexolmo.trust.history import append_record, model_digest, read_history
from flexolmo.trust.signing import TrustedKeys, sign_directory

ATTESTATION_FILE = "attestation.intoto.json"
STALE_AFTER = timedelta(hours=1)


def inputs_digest(anchor_fingerprint: str, experts: list[dict]) -> str:
    return hashlib.sha256(json.dumps({"anchor": anchor_fingerprint, "experts": experts},
                                     sort_keys=True).encode()).hexdigest()


def _release(session: Session, version: Version, work: Path, why: str) -> None:
    shutil.rmtree(work / "versions" / f".{version.number}.staging", ignore_errors=True)
    append_event(session, "reservation-released", "coordinator", {"version": version.number, "reason": why})
    session.delete(version)
    session.flush()


def _clear_dead(session: Session, work: Path) -> list[int]:
    """Release reservations whose publisher's lease ran out: it was killed mid-merge (or lost the database)."""
    dead = session.scalars(select(Version).where(Version.status == "publishing",
                                                 Version.lease_until < lease_time())).all()
    for version in dead:
        _release(session, version, work, "its publisher stopped renewing its lease")
    return [version.number for version in dead]


def _reserve_once(session: Session, lease: timedelta) -> tuple[Version, list[str], dict]:
    work = work_dir(session)
    _clear_dead(session, work)
    rows = active_submissions(session)
    if not rows:
        raise Conflict("no admitted, active expert to publish")
    experts = [{"name": r.member, "package_sha256": r.package_sha256} for r in rows]
    digest = inputs_digest(get_setting(session, "anchor_fingerprint"), experts)
    existing = session.scalar(select(Version).where(Version.inputs_sha256 == digest))
    if existing is not None:
        hint = ""
        if existing.status == "publishing":
            hint = (f" by a publisher that is still working (its lease runs until {existing.lease_until})"
                    if existing.lease_until else "; if its publisher was killed, publish with --release-stale")
        raise Conflict(f"these experts were already published as version {existing.number} ({existing.status})"
                       f"{hint}")
    number = (session.scalar(select(func.max(Version.number))) or 0) + 1
    version = Version(number=number, inputs_sha256=digest, experts=json.dumps(experts), status="publishing",
                      created_at=now_iso(), lease_until=lease_time(lease))
    session.add(version)
    settings = {key: get_setting(session, key) for key in ("anchor", "coordinator_key", "anchor_fingerprint")}
    declarations = {r.member: json.loads(r.declaration or "{}") for r in rows}
    return version, [r.package_sha256 for r in rows], {**settings, "work_dir": str(work),
                                                        "declarations": declarations}


def reserve(engine: Engine, lease: timedelta = LEASE) -> tuple[int, list[dict], list[str], dict]:
    """Take the next version number for the current inputs; a collision with another process is retried."""
    def take(session: Session) -> tuple[int, list[dict], list[str], dict]:
        version, digests, settings = _reserve_once(session, lease)
        return version.number, json.loads(version.experts), digests, settings

    return in_transaction(engine, take)


def _fetch_inputs(engine: Engine, digests: list[str], work: Path) -> list[Path]:
    """The input packages as local, digest-checked directories (downloaded to the cache from an S3 store)."""
    with Session(engine) as session:
        store, _ = configured(session)
    return [fetch_package(store, digest, work / "cache") for digest in digests]


def _input(expert: dict, declared: dict) -> dict:
    """An input package as an in-toto resource descriptor; its owner's declaration as annotations."""
    descriptor = {"name": expert["name"], "digest": {"sha256": expert["package_sha256"]}}
    if declared:
        descriptor["annotations"] = dict(declared)
    return descriptor


def attestation(number: int, settings: dict, experts: list[dict], output: str) -> dict:
    """The in-toto statement: subject the merged model, materials the anchor and every input package (with the
    licence and data description its owner declared)."""
    return {"_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": f"flexolmo-version-{number}", "digest": {"sha256": output}}],
            "predicateType": "https://flexolmo.dev/consortium-version/v1",
            "predicate": {"version": number, "anchor": {"fingerprint": settings["anchor_fingerprint"]},
                          "inputs": [_input(e, settings.get("declarations", {}).get(e["name"], {}))
                                     for e in experts],
                          "builder": "flexolmo coordinator publish", "published_at": now_iso()}}


def _build(number: int, experts: list[dict], paths: list[Path], settings: dict, top_k: int) -> tuple[Path, str]:
    work, key = Path(settings["work_dir"]), Path(settings["coordinator_key"])
    staging, final = work / "versions" / f".{number}.staging", work / "versions" / str(number)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = staging / "model"
    merge(Path(settings["anchor"]), paths, model, top_k=min(top_k, len(paths) + 1),
          trust=CoordinatorTrust(sign_key=key))
    output = model_digest(model)
    statement = attestation(number, settings, experts, output)
    (model / ATTESTATION_FILE).write_text(json.dumps(sign_json(statement, INTOTO_TYPE, key), indent=1))
    (model / "README.md").write_text(model_card(number, experts, paths, statement, settings["declarations"]))
    # The card and attestation are logged as one more operation and signed, so the model still verifies. It
    # changes no expert: the record carries the merge's experts and top-k, and adds or removes none.
    merged = read_history(model)[-1]
    append_record(model, model, {"operation": "publish", "version": number, "output_sha256": output,
                                 "top_k": merged["top_k"], "experts": merged["experts"], "added": [], "removed": []},
                  sign_key=key)
    sign_directory(model, key)
    model.rename(staging / "published")
    staging.rename(final)
    return final / "published", output


def _renew(number: int):
    def renew(session: Session, until: str) -> bool:
        return session.execute(update(Version).where(Version.number == number, Version.status == "publishing")
                               .values(lease_until=until)).rowcount == 1
    return renew


def publish(engine: Engine, top_k: int = DEFAULT_TOP_K, lease: timedelta = LEASE) -> dict:
    """Publish the next version; returns its row as a dict. A failure releases the reservation; a killed
    publisher's reservation is released by the next publisher once its lease has run out."""
    number, experts, digests, settings = reserve(engine, lease)
    work = Path(settings["work_dir"])
    try:
        with Heartbeat(engine, _renew(number), lease):
            path, output = _build(number, experts, _fetch_inputs(engine, digests, work), settings, top_k)
    except BaseException:
        shutil.rmtree(work / "versions" / f".{number}.staging", ignore_errors=True)
        in_transaction(engine, lambda session: session.execute(delete(Version).where(Version.number == number,
                                                                                    Version.status == "publishing")))
        raise

    def finish(session: Session) -> None:
        version = session.get(Version, number)
        if version is None or version.status != "publishing":
            raise LeaseLost(f"version {number}'s reservation was released while it was merged (its lease ran out); "
                            f"{path} is not published")
        version.status, version.path, version.output_sha256 = "published", str(path), output
        version.lease_until = None
        append_event(session, "version-published", "coordinator",
                     {"version": number, "experts": experts, "output_sha256": output})

    in_transaction(engine, finish)
    return {"number": number, "path": str(path), "output_sha256": output, "experts": experts}


def release_stale(engine: Engine, older_than: timedelta = STALE_AFTER) -> list[int]:
    """Release reservations left by a killed publisher, so their inputs can be published again: those whose
    lease ran out, and any reserved more than `older_than` ago."""
    cutoff = (datetime.now(timezone.utc) - older_than).isoformat()
    with Session(engine) as session, session.begin():
        work = work_dir(session)
        released = _clear_dead(session, work)
        for version in session.scalars(select(Version).where(Version.status == "publishing",
                                                             Version.created_at < cutoff)).all():
            _release(session, version, work, f"reserved more than {older_than} ago")
            released.append(version.number)
        return sorted(released)


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
