"""A member checks its own expert inside a merged model (issue 25): `verify MODEL --packages MINE` passes only
when the slot of its name holds its package's weights bit for bit, and its router row unless the record's
router tuning covered it. Slot digests are unkeyed, so without the coordinator's signature only this check,
run by the one party that holds the package, tells that a slot was swapped under its name."""

from __future__ import annotations

import json

import pytest
import torch
from test_trust import keys, signed, swap_names_recomputing_digests  # noqa: F401 (fixtures)

from flexolmo.cli import main
from flexolmo.coordinator.artefacts import check_member_slot, verify_merged_model
from flexolmo.coordinator.merge import merge, remove_experts, replace_router_rows
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import TrustError
from flexolmo.model.merged_format import MERGED_METADATA_FILE
from flexolmo.trust.history import HISTORY_FILE, model_digest, read_history
from flexolmo.trust.signing import TrustedKeys


@pytest.fixture(scope="module")
def merged(signed, keys, tiny_anchor, tmp_path_factory):  # noqa: F811
    trust = CoordinatorTrust(trusted_keys=TrustedKeys(keys), sign_key=keys / "private" / "coordinator.key")
    model = tmp_path_factory.mktemp("member") / "merged"
    merge(tiny_anchor, [signed["code"], signed["math"]], model, top_k=2, trust=trust)
    return model


def test_each_member_finds_its_own_expert_as_submitted(merged, signed, keys, capsys):  # noqa: F811
    trusted = TrustedKeys(keys)
    assert check_member_slot(merged, signed["code"], trusted) == {"name": "code", "slot": 1, "router": "as submitted"}
    assert check_member_slot(merged, signed["math"], trusted)["slot"] == 2
    assert main(["verify", str(merged), "--trusted-keys", str(keys), "--packages", str(signed["math"])]) == 0
    assert "math is slot 2 of" in capsys.readouterr().out


def test_a_slot_swapped_under_a_members_name_is_found_without_any_key(merged, signed, tmp_path):  # noqa: F811
    swapped = swap_names_recomputing_digests(merged, tmp_path / "swapped")
    verify_merged_model(swapped)  # unkeyed digests recomputed: the model alone looks fine
    with pytest.raises(TrustError, match="slot 1 \\('math'\\) holds other gate_proj weights in layer 0"):
        check_member_slot(swapped, signed["math"])
    record = json.loads((swapped / MERGED_METADATA_FILE).read_text())
    assert record["experts"][1]["package_sha256"] != record["experts"][2]["package_sha256"]


def test_a_record_naming_another_package_is_refused(merged, signed, tmp_path):  # noqa: F811
    from test_trust import copy

    edited = copy(merged, tmp_path / "edited")
    record = json.loads((edited / MERGED_METADATA_FILE).read_text())
    record["experts"][1]["package_sha256"] = "0" * 64
    (edited / MERGED_METADATA_FILE).write_text(json.dumps(record))
    log = read_history(edited)
    log[-1]["model_sha256"] = model_digest(edited)  # what anyone can recompute
    (edited / HISTORY_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    with pytest.raises(TrustError, match="was merged from another package"):
        check_member_slot(edited, signed["code"])


def test_router_rows_may_differ_only_where_a_recorded_tuning_covered_them(merged, signed, tmp_path):  # noqa: F811
    config = json.loads((merged / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, config["hidden_size"], generator=generator) for _ in range(config["num_hidden_layers"])]
    tuned = replace_router_rows(merged, rows, tmp_path / "tuned", {"tuned_experts": ["public", "code", "math"]})
    assert tuned and check_member_slot(tmp_path / "tuned", signed["code"])["router"] == "retuned by the coordinator"
    replace_router_rows(merged, rows, tmp_path / "public-tuned", {"tuned_experts": ["public"]})
    with pytest.raises(TrustError, match="no router tuning in its record covered that expert"):
        check_member_slot(tmp_path / "public-tuned", signed["code"])


def test_an_opted_out_member_is_told_so_in_one_line(merged, signed, tmp_path, capsys):  # noqa: F811
    remove_experts(merged, ["code"], tmp_path / "without-code")
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "without-code"), "--packages", str(signed["code"])]) == 1
    error = capsys.readouterr().err
    assert "holds no expert named 'code' (it has: public, math)" in error and len(error.strip().splitlines()) == 1
