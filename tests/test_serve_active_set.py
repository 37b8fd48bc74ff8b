"""Live opt-out: the server follows the coordinator's signed active set without a restart, from a file or from a
URL, and fails closed to the public expert on a set it cannot trust (or, from a URL, once the last set it could
fetch has expired)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from flexolmo.core.errors import TrustError
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.runtime import load_model
from flexolmo.serve.follow import MAX_ENVELOPE_BYTES, ActiveSetFollower
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server
from flexolmo.trust.active_set import ActiveExpert, new_active_set, sign_active_set, write_active_set
from flexolmo.trust.signing import generate_key_pair

PROMPT = "theorem proof lemma def return"


@pytest.fixture(scope="module")
def setup(serve_merged, tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    generate_key_pair("coordinator", root / "coordinator")
    generate_key_pair("member", root / "member")
    info = read_merged_info(serve_merged)
    experts = {entry["name"]: ActiveExpert(name=entry["name"], package_sha256=entry["package_sha256"])
               for entry in info.metadata["experts"] if entry["name"] != "public"}
    return root, info.anchor_fingerprint, experts


def publish(setup, version, names, key="coordinator/coordinator.key", now=None, lifetime=timedelta(hours=1)):
    root, fingerprint, experts = setup
    active = new_active_set(version, fingerprint, [experts[name] for name in names], lifetime, now=now)
    write_active_set(root / "active.json", sign_active_set(active, root / key))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FileServer:
    """A plain HTTP server on 127.0.0.1 serving a directory (the signed set as a static file), stoppable and
    restartable on the same port: a stand-in for the consortium service's `GET /v1/active-set`."""

    def __init__(self, directory, port=0):
        handler = functools.partial(_Quiet, directory=str(directory))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_for(url, predicate, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if predicate(health):
            return health
        time.sleep(0.05)
    raise AssertionError(f"/health never got there: {health}")


def ask(url, max_tokens=3):
    client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0, timeout=30)
    usage = client.completions.create(model="merged", prompt=PROMPT, max_tokens=max_tokens,
                                      temperature=0).usage.model_extra
    return usage["experts"]["prompt"], usage["active_set_version"]


def test_a_withdrawn_expert_is_masked_from_the_next_request_and_bad_sets_fail_closed(serve_merged, setup):
    root = setup[0]
    publish(setup, 1, ["code", "math"])
    options = ServeOptions(active_set=root / "active.json", coordinator_keys=root / "coordinator")
    with running_server(ModelServer(load_model(serve_merged), options)) as url:
        shares, version = ask(url)
        assert version == 1 and shares["math"] > 0 and shares["code"] > 0
        in_flight = threading.Thread(target=ask, args=(url, 30))
        in_flight.start()
        publish(setup, 2, ["code"])  # math opts out while a request is running
        shares, version = ask(url)
        assert version == 2 and shares["math"] == 0 and shares["code"] > 0
        in_flight.join(timeout=60)
        assert httpx.get(f"{url}/health").json()["active_set"]["state"] == "ok"

        past = datetime.now(timezone.utc) - timedelta(hours=2)
        for bad, reason in (({"version": 1, "names": ["code", "math"]}, "older than version 2"),
                            ({"version": 3, "names": ["code", "math"], "key": "member/member.key"}, "not signed"),
                            ({"version": 3, "names": ["code"], "now": past}, "expired")):
            publish(setup, **bad)
            shares, _ = ask(url)
            assert shares == {"public": pytest.approx(1.0), "code": 0.0, "math": 0.0}
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "failed_closed" and reason in health["active_set"]["reason"]
            assert "flexolmo_failed_closed 1.0" in httpx.get(f"{url}/metrics").text

        publish(setup, 4, ["math"])
        shares, version = ask(url)
        assert version == 4 and shares["code"] == 0 and shares["math"] > 0
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_server_follows_an_active_set_url_and_fails_closed_only_once_the_last_set_expires(serve_merged, setup,
                                                                                          caplog):
    root = setup[0]
    publish(setup, 5, ["code", "math"])
    files = FileServer(root)
    source = f"http://127.0.0.1:{files.port}/active.json"
    options = ServeOptions(active_set=source, coordinator_keys=root / "coordinator", active_set_poll=0.1)
    caplog.set_level(logging.INFO, logger="flexolmo.serve")
    try:
        with running_server(ModelServer(load_model(serve_merged), options)) as url:
            shares, version = ask(url)  # the first fetch happened before the server took requests
            assert version == 5 and shares["math"] > 0
            assert httpx.get(f"{url}/health").json()["active_set"]["source"] == source

            publish(setup, 6, ["code"])  # math opts out at the service
            wait_for(url, lambda health: health["active_set"]["version"] == 6)
            shares, version = ask(url)
            assert version == 6 and shares["math"] == 0 and shares["code"] > 0

            publish(setup, 5, ["code", "math"])  # a replayed set is refused exactly as from a file
            health = wait_for(url, lambda health: health["status"] == "failed_closed")
            assert "older than version 6" in health["active_set"]["reason"]
            assert ask(url)[0] == {"public": pytest.approx(1.0), "code": 0.0, "math": 0.0}

            # The service goes away: the last set it served stays in force until it expires, then no longer.
            publish(setup, 7, ["math"], lifetime=timedelta(seconds=8))
            wait_for(url, lambda health: health["active_set"]["version"] == 7 and health["status"] == "ok")
            files.close()
            health = wait_for(url, lambda health: health["active_set"]["fetch_error"] is not None)
            assert health["status"] == "ok" and "cannot fetch" in health["active_set"]["fetch_error"]
            shares, version = ask(url)
            assert version == 7 and shares["math"] > 0 and shares["code"] == 0
            health = wait_for(url, lambda health: health["status"] == "failed_closed")
            assert "expired" in health["active_set"]["reason"]
            assert ask(url)[0] == {"public": pytest.approx(1.0), "code": 0.0, "math": 0.0}

            publish(setup, 8, ["code", "math"])  # back, with a fresh set
            files = FileServer(root, files.port)
            wait_for(url, lambda health: health["status"] == "ok" and health["active_set"]["version"] == 8)
            assert ask(url)[1] == 8
    finally:
        files.close()
    logged = caplog.text
    assert f"active set version 6 accepted from {source}: serving public, code" in logged
    assert "failing closed: serving the public expert only" in logged and "keeping version 7" in logged


def test_an_answer_that_is_no_active_set_is_a_fetch_error_and_the_interval_is_bounded(serve_merged, setup,
                                                                                    tmp_path):
    root = setup[0]
    info = read_merged_info(serve_merged)
    record = {"experts": info.metadata["experts"], "anchor": {"fingerprint": info.anchor_fingerprint}}
    with pytest.raises(TrustError, match="between 0.1 and 300"):
        ActiveSetFollower("http://127.0.0.1:1/x", root / "coordinator", record, poll_interval=0.01)
    (tmp_path / "huge.json").write_bytes(b" " * (MAX_ENVELOPE_BYTES + 1))
    files = FileServer(tmp_path)
    try:
        for name, error in (("huge.json", "over 1048576 bytes"), ("missing.json", "HTTP 404")):
            follower = ActiveSetFollower(f"http://127.0.0.1:{files.port}/{name}", root / "coordinator", record)
            follower.start()
            state = follower.current()
            follower.stop()
            assert state.failed_closed == "no active set read yet" and error in state.fetch_error
            assert state.mask == (True, False, False)  # public only
    finally:
        files.close()
