"""Who may use which expert, without a model: the keys file, narrowing, and the command line's checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flexolmo.core.errors import TrustError
from flexolmo.serve.access import AccessError, allowed_experts, read_keys, request_mask, requested_experts

NAMES = ["public", "code", "math"]


def test_keys_map_to_their_experts_with_public_always_on(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"a": ["*"], "b": ["code"], "c": []}))
    keys = read_keys(path, NAMES)
    assert keys == {"a": frozenset(NAMES), "b": frozenset({"public", "code"}), "c": frozenset({"public"})}
    assert allowed_experts(None, None, NAMES) == frozenset(NAMES)  # no --keys: an open server
    assert requested_experts(keys["b"], [], NAMES) == {"public"}
    assert requested_experts(keys["b"], None, NAMES) == {"public", "code"}
    with pytest.raises(AccessError, match="may not use expert.s. math") as refused:
        requested_experts(keys["b"], ["math"], NAMES)
    assert refused.value.status == 403


@pytest.mark.parametrize("api_key, status, message", [
    (None, 401, "an API key is required"), ("", 401, "an API key is required"), ("z", 401, "unknown API key")])
def test_a_missing_or_unknown_key_is_a_401(api_key, status, message):
    keys = {"b": frozenset({"public", "code"})}
    assert allowed_experts(keys, "b", NAMES) == frozenset({"public", "code"})
    with pytest.raises(AccessError, match=message) as refused:
        allowed_experts(keys, api_key, NAMES)
    assert refused.value.status == status


def test_a_name_the_model_lacks_is_a_400_even_where_the_key_could_not_use_it():
    with pytest.raises(AccessError, match=r"the model has no expert\(s\) legal \(it has: public, code, math\)") \
            as refused:
        requested_experts(frozenset({"public"}), ["legal", "math"], NAMES)
    assert refused.value.status == 400
    # The request's mask: what the key allows, narrowed, within the active set.
    assert request_mask(NAMES, frozenset(NAMES), ["math"], (True, True, True)) == (True, False, True)
    assert request_mask(NAMES, frozenset(NAMES), None, (True, True, False)) == (True, True, False)


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read the API keys"),
    ('["a"]', "must be a JSON object"),
    ('{"a": ["legal"]}', "names expert.s. legal that the model does not have"),
])
def test_a_bad_keys_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(TrustError, match=message):
        read_keys(path, NAMES)


def test_an_active_set_without_its_signer_is_refused_before_loading(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flexolmo", "serve", "--model", str(tmp_path),
                             "--active-set", str(tmp_path / "a.json")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("flexolmo serve: error: --active-set and --coordinator-keys go together: the "
                                     "set is only as good as its signer")


def test_an_active_set_poll_outside_its_bounds_is_refused_before_loading(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flexolmo", "serve", "--model", str(tmp_path),
                             "--active-set", "http://127.0.0.1:9/v1/active-set", "--coordinator-keys",
                             str(tmp_path), "--active-set-poll", "0"], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "flexolmo serve: error: --active-set-poll must be between 0.1 and 300.0 seconds"
