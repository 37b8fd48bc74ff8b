"""The model card of a published version prints each member's licence and data description as the member
declared them with its signed upload (`flexolmo submit --licence --data-description`), "not declared" for a
member that gave none; the coordinator-signed attestation carries the same declarations, the audit log
records them, and a declaration that is not short plain text is refused before anything is uploaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_support import RunningService

from flexolmo.cli import main
from flexolmo.core.errors import ServiceError
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.envelopes import INTOTO_TYPE, verify_json
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.store import pack_directory
from flexolmo.service.versions import publish, verify_version

DATA = "Python from our own repositories | permissive licences only"


def test_the_card_and_attestation_carry_each_members_declared_licence_and_data(
        tmp_path, tiny_anchor, service_keys, service_packages, capsys):
    engine = open_engine(f"sqlite:///{tmp_path / 'db'}")
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, tiny_anchor, tmp_path / "store", service_keys / "coordinator.key"))
    for name in ("code", "math"):
        in_transaction(engine, lambda s, n=name: add_member(s, n, service_keys / f"{n}.pub"))
    service = RunningService(engine)
    try:
        assert main(["submit", str(service_packages["code"]), "--coordinator", service.url, "--sign-key",
                     str(service_keys / "code.key"), "--licence", "Apache-2.0", "--data-description", DATA]) == 0
        out = capsys.readouterr().out
        assert json.loads(out)["declaration"] == {"licence": "Apache-2.0", "data": DATA}
        math = ConsortiumClient(service.url, service_keys / "math.key")
        with pytest.raises(ServiceError, match="licence must be text of at most 100 characters"):
            math.upload(pack_directory(service_packages["math"]), declaration={"licence": "x" * 101})
        with pytest.raises(ServiceError, match="a declaration holds only licence, data"):
            math.upload(pack_directory(service_packages["math"]), declaration={"price": "free"})
        assert math.submit(service_packages["math"])["status"] == "admitted"  # nothing declared
        log = ConsortiumClient(service.url).get("/v1/status")
    finally:
        service.close()
    assert [s["declaration"] for s in log["submissions"]] == [{"licence": "Apache-2.0", "data": DATA}, {}]

    version = Path(publish(engine)["path"])
    card = (version / "README.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in card.splitlines()
            if line.startswith(("| code", "| math"))}
    assert "| Apache-2.0 | Python from our own repositories \\| permissive licences only |" in rows["code"]
    assert "| not declared | not declared |" in rows["math"]
    statement = verify_version(version, service_keys / "coordinator.pub")
    attested = verify_json(json.loads((version / "attestation.intoto.json").read_text()), INTOTO_TYPE,
                           service_keys / "coordinator.pub")
    assert attested == statement
    inputs = {i["name"]: i.get("annotations") for i in statement["predicate"]["inputs"]}
    assert inputs == {"code": {"licence": "Apache-2.0", "data": DATA}, "math": None}
    assert '"licence": "Apache-2.0"' in card  # the statement printed in the card holds it too
