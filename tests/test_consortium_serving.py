"""The two halves of a consortium meet through one contract, the coordinator-signed active set: the service
publishes a version and issues the set, a server serves that version under per-key allow-lists, and an owner's
withdrawal through the service stops its expert being used from the server's next request on."""

from __future__ import annotations

import json

import openai
import pytest
from service_support import RunningService
from test_service_scenario import publish_and_verify, run_cli, start, submit_all

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server
from flexolmo.service.client import ConsortiumClient
from flexolmo.trust.active_set import write_active_set

PROMPT = "theorem proof lemma def return"


def ask(url: str, key: str, experts: list[str] | None = None) -> dict:
    client = openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=60)
    extra = {"experts": experts} if experts else None
    usage = client.completions.create(model="published", prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body=extra).usage.model_extra
    return usage


def test_a_server_follows_the_consortium_through_its_active_set(tmp_path, tiny_anchor, corpora, service_keys,
                                                                 service_packages, capsys):
    keys, url = service_keys, f"sqlite:///{tmp_path / 'consortium.db'}"
    service: RunningService = start(url, tiny_anchor, keys, tmp_path, capsys, corpora["public"])
    try:
        submit_all(service, service_packages, keys, capsys)
        publish_and_verify(url, keys, capsys, 1, ["code", "math"])
        version = next(tmp_path.glob("store/versions/1/published"))
        active_file = write_active_set(tmp_path / "active.json", ConsortiumClient(service.url).active_set())
        (tmp_path / "coordinator").mkdir()
        (tmp_path / "coordinator" / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
        (tmp_path / "keys.json").write_text(json.dumps({"alice": ["*"], "partner": ["code"]}))
        options = ServeOptions(keys=tmp_path / "keys.json", active_set=active_file,
                               coordinator_keys=tmp_path / "coordinator")
        with running_server(ModelServer(load_model(version), options)) as server:
            before = ask(server, "alice")
            assert before["experts"]["prompt"]["math"] > 0 and before["experts"]["prompt"]["code"] > 0
            with pytest.raises(openai.PermissionDeniedError, match="math"):
                ask(server, "partner", ["math"])
            status, out = run_cli(capsys, "withdraw", "math", "--coordinator", service.url, "--sign-key",
                                  str(keys / "math.key"))
            assert status == 0, out
            write_active_set(active_file, ConsortiumClient(service.url).active_set())
            after = ask(server, "alice")
            assert after["active_set_version"] > before["active_set_version"]
            assert after["experts"]["prompt"]["math"] == 0 and after["experts"]["prompt"]["code"] > 0
    finally:
        service.close()
