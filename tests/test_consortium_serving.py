"""The two halves of a consortium meet through one contract, the coordinator-signed active set: the service
publishes a version and issues the set, a server serves that version under per-key allow-lists following the
service's `GET /v1/active-set` URL, and an owner's withdrawal through the service stops its expert being used
from the server's next poll on."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from service_support import RunningService
from test_service_scenario import publish_and_verify, run_cli, start, submit_all

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server

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
        (tmp_path / "coordinator").mkdir()
        (tmp_path / "coordinator" / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
        (tmp_path / "keys.json").write_text(json.dumps({"alice": ["*"], "partner": ["code"]}))
        options = ServeOptions(keys=tmp_path / "keys.json", active_set=f"{service.url}/v1/active-set",
                               coordinator_keys=tmp_path / "coordinator", active_set_poll=0.1)
        with running_server(ModelServer(load_model(version), options)) as server:
            before = ask(server, "alice")
            assert before["experts"]["prompt"]["math"] > 0 and before["experts"]["prompt"]["code"] > 0
            with pytest.raises(openai.PermissionDeniedError, match="math"):
                ask(server, "partner", ["math"])
            status, out = run_cli(capsys, "withdraw", "math", "--coordinator", service.url, "--sign-key",
                                  str(keys / "math.key"))
            assert status == 0, out
            deadline = time.monotonic() + 20
            while (httpx.get(f"{server}/health").json()["active_set"]["version"] == before["active_set_version"]
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            after = ask(server, "alice")
            assert after["active_set_version"] > before["active_set_version"]
            assert after["experts"]["prompt"]["math"] == 0 and after["experts"]["prompt"]["code"] > 0
    finally:
        service.close()
