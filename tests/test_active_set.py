"""The signed active set: the contract between the consortium service and every server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from flexolmo.trust.active_set import (
    ActiveExpert,
    ActiveSetError,
    ActiveSetExpired,
    new_active_set,
    read_active_set,
    sign_active_set,
    verify_active_set,
    write_active_set,
)
from flexolmo.trust.signing import TrustedKeys, generate_key_pair

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
CODE = ActiveExpert(name="code", package_sha256="a" * 64)
MATH = ActiveExpert(name="math", package_sha256="b" * 64)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    generate_key_pair("coordinator", root / "coordinator")
    generate_key_pair("code", root / "members")
    return root


def signed(keys, version=3, experts=(CODE, MATH), key="coordinator/coordinator.key", **kwargs):
    active = new_active_set(version, "f" * 16, experts, timedelta(hours=1), now=NOW, **kwargs)
    return sign_active_set(active, keys / key)


def test_a_coordinator_signed_set_verifies_and_names_its_experts(keys):
    active = verify_active_set(signed(keys), TrustedKeys(keys / "coordinator"), now=NOW)
    assert active.version == 3
    record = [{"name": "public"}, {"name": "code", "package_sha256": "a" * 64},
              {"name": "math", "package_sha256": "c" * 64}, {"name": "legal", "package_sha256": "d" * 64}]
    # math is listed with another package digest: a different expert under the same name is not active.
    assert active.expert_mask(record) == [True, True, False, False]


def test_a_member_cannot_issue_an_active_set(keys):
    with pytest.raises(ActiveSetError, match="not signed by a coordinator key"):
        verify_active_set(signed(keys, key="members/code.key"), TrustedKeys(keys / "coordinator"), now=NOW)


def test_an_edited_payload_fails_the_signature(keys):
    envelope = json.loads(signed(keys))
    payload = json.loads(__import__("base64").b64decode(envelope["payload"]))
    payload["experts"].append({"name": "legal", "package_sha256": "d" * 64})
    envelope["payload"] = __import__("base64").b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(ActiveSetError, match="not signed by a coordinator key"):
        verify_active_set(json.dumps(envelope).encode(), TrustedKeys(keys / "coordinator"), now=NOW)


def test_expired_and_replayed_sets_are_refused(keys):
    trusted = TrustedKeys(keys / "coordinator")
    with pytest.raises(ActiveSetExpired, match="expired"):
        verify_active_set(signed(keys), trusted, now=NOW + timedelta(hours=1))
    with pytest.raises(ActiveSetError, match="older than version 4"):
        verify_active_set(signed(keys, version=3), trusted, now=NOW, newer_than=4)
    assert verify_active_set(signed(keys, version=4), trusted, now=NOW, newer_than=4).version == 4


@pytest.mark.parametrize("envelope", [b"", b"[]", b"{\"payload\": 1}", b"\xff\xfe"])
def test_malformed_envelopes_are_one_line_errors(keys, envelope):
    with pytest.raises(ActiveSetError):
        verify_active_set(envelope, TrustedKeys(keys / "coordinator"), now=NOW)


def test_listing_the_public_expert_or_a_name_twice_is_refused():
    with pytest.raises(ActiveSetError, match="never listed"):
        new_active_set(1, "f", [ActiveExpert(name="public", package_sha256="a" * 64)], timedelta(hours=1))
    with pytest.raises(ActiveSetError, match="twice"):
        new_active_set(1, "f", [CODE, CODE], timedelta(hours=1))


def test_file_round_trip(keys, tmp_path):
    path = write_active_set(tmp_path / "active.json", signed(keys))
    assert read_active_set(path, TrustedKeys(keys / "coordinator"), now=NOW).experts == (CODE, MATH)
    with pytest.raises(ActiveSetError, match="cannot read"):
        read_active_set(tmp_path / "missing.json", TrustedKeys(keys / "coordinator"), now=NOW)
