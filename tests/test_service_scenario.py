"""A whole consortium on one machine, through the commands a newcomer types: the service, three owners submit
(one hostile package refused with its reason), version 1 published and verified, one owner withdraws and the
active set drops it at once, version 2 published without it, the log verifies, and an edited row is found.
Run on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from service_support import RunningService, database_url

from flexolmo.cli import main
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import open_engine
from flexolmo.service.envelopes import RECEIPT_TYPE, verify_json
from flexolmo.trust.active_set import verify_active_set
from flexolmo.trust.signing import TrustedKeys


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def coordinator_keys(keys, tmp_path) -> TrustedKeys:
    directory = tmp_path / "coordinator-keys"
    directory.mkdir()
    (directory / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
    return TrustedKeys(directory)


def start(url: str, anchor, keys, tmp_path, capsys, probe) -> RunningService:
    assert run_cli(capsys, "coordinator", "init", "--anchor", str(anchor), "--sign-key", str(keys / "coordinator.key"),
                   "--db", url, "--store", str(tmp_path / "store"), "--probe-data", str(probe))[0] == 0
    for name in ("code", "math", "hostile"):
        assert run_cli(capsys, "coordinator", "add-member", name, "--public-key", str(keys / f"{name}.pub"),
                       "--db", url)[0] == 0
    return RunningService(open_engine(url))


def submit_all(service, packages, keys, capsys) -> None:
    for name in ("code", "math"):
        declared = ["--licence", "Apache-2.0", "--data-description", "Python we wrote"] if name == "code" else []
        status, out = run_cli(capsys, "submit", str(packages[name]), "--coordinator", service.url,
                              "--sign-key", str(keys / f"{name}.key"), *declared)
        assert status == 0 and '"status": "admitted"' in out, out
    status, out = run_cli(capsys, "submit", str(packages["hostile"]), "--coordinator", service.url,
                          "--sign-key", str(keys / "hostile.key"))
    assert status == 1 and "router rows are" in out and "above the limit" in out, out


def publish_and_verify(url: str, keys, capsys, number: int, experts: list[str]) -> None:
    status, out = run_cli(capsys, "coordinator", "publish", "--db", url)
    assert status == 0, out
    published = json.JSONDecoder().raw_decode(out)[0]  # stdout first; merge progress follows on stderr
    assert published["number"] == number and [e["name"] for e in published["experts"]] == experts
    assert "| code | " in (card := (Path(published["path"]) / "README.md").read_text())
    assert "| Apache-2.0 | Python we wrote |" in card
    status, out = run_cli(capsys, "coordinator", "verify", published["path"],
                          "--public-key", str(keys / "coordinator.pub"))
    assert status == 0 and f"version {number} verified" in out, out


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_consortium_admits_publishes_honours_an_opt_out_and_keeps_a_verifiable_log(
        kind, request, tmp_path, tiny_anchor, corpora, service_keys, service_packages, capsys):
    url, keys = database_url(kind, request, tmp_path), service_keys
    service = start(url, tiny_anchor, keys, tmp_path, capsys, corpora["public"])
    try:
        submit_all(service, service_packages, keys, capsys)
        state = ConsortiumClient(service.url).status()
        assert [(s["member"], s["status"]) for s in state["submissions"]] == [
            ("code", "admitted"), ("math", "admitted"), ("hostile", "refused")]
        hostile = state["submissions"][2]["report"]
        assert "skipped" not in hostile["probe"], hostile["probe"]
        assert hostile["verdicts"][0]["public_top_share"] > 0.5
        assert not list((tmp_path / "store").glob(".upload-*"))  # the refusal left nothing but its record
        assert len(list((tmp_path / "store" / "packages").iterdir())) == 2
        publish_and_verify(url, keys, capsys, 1, ["code", "math"])

        status, out = run_cli(capsys, "withdraw", "math", "--coordinator", service.url, "--sign-key",
                              str(keys / "math.key"), "--receipt", str(tmp_path / "receipt.json"))
        assert status == 0, out
        receipt = verify_json(json.loads((tmp_path / "receipt.json").read_text()), RECEIPT_TYPE,
                              keys / "coordinator.pub")
        active = verify_active_set(ConsortiumClient(service.url).active_set(), coordinator_keys(keys, tmp_path))
        assert active.version == receipt["unused_from_active_set_version"]
        assert [e.name for e in active.experts] == ["code"] and [e.name for e in active.withdrawn] == ["math"]
        assert receipt["versions_withdrawn"] == [1]
        publish_and_verify(url, keys, capsys, 2, ["code"])
        assert [(v["number"], v["status"]) for v in ConsortiumClient(service.url).status()["versions"]] == [
            (1, "withdrawn"), (2, "published")]
        status, out = run_cli(capsys, "status", "--coordinator", service.url)
        assert status == 0 and "withdrawn" in out
    finally:
        service.close()
    status, out = run_cli(capsys, "coordinator", "log", "--verify", "--export", str(tmp_path / "log.jsonl"),
                          "--db", url)
    assert status == 0 and "audit log intact" in out, out
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for kind_ in ("member-added", "admission-result", "version-published", "withdrawal", "active-set-issued"):
        assert kind_ in kinds
    if kind == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
            connection.execute("UPDATE audit_log SET actor = 'code' WHERE kind = 'withdrawal'")
        status, out = run_cli(capsys, "coordinator", "log", "--verify", "--db", url)
        assert status == 1 and "was edited" in out, out
