"""`flexolmo serve --trusted-keys`: the merged model is authenticated before the server starts (issue 25). A name
swap that anyone can make without a key (slot digests recomputed) is refused in one line and nothing serves;
the honest, coordinator-signed model serves, without the unauthenticated warning."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import httpx
import pytest
from test_serve_process import free_port, wait_healthy
from test_trust import swap_names_recomputing_digests

from flexolmo.coordinator.artefacts import sign_artefact
from flexolmo.trust.signing import generate_key_pair


@pytest.fixture(scope="module")
def signed_model(serve_merged, tmp_path_factory) -> tuple:
    """(the serving tests' merged model signed by a coordinator, the trusted-keys directory)."""
    root = tmp_path_factory.mktemp("serve-trust")
    keys = root / "keys"
    generate_key_pair("coordinator", keys / "private")
    shutil.copy(keys / "private" / "coordinator.pub", keys / "coordinator.pub")
    model = root / "merged"
    shutil.copytree(serve_merged, model)
    sign_artefact(model, keys / "private" / "coordinator.key")
    return model, keys


def serve_command(model, keys, port: int) -> list[str]:
    return [sys.executable, "-m", "flexolmo", "serve", "--model", str(model), "--port", str(port),
            "--trusted-keys", str(keys)]


def test_a_name_swap_is_refused_by_serve_in_one_line(signed_model, tmp_path):
    model, keys = signed_model
    swapped = swap_names_recomputing_digests(model, tmp_path / "swapped")
    # A process, so that a server started by mistake is a failed test (the timeout), not a hung one.
    try:
        refused = subprocess.run(serve_command(swapped, keys, free_port()), capture_output=True, text=True,
                                 timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("serve started on a tampered model")
    assert refused.returncode == 1 and not refused.stdout
    assert "does not match the files" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_the_honest_signed_model_serves_without_a_warning(signed_model):
    model, keys = signed_model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(serve_command(model, keys, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        wait_healthy(url, process)
        body = {"model": "merged", "prompt": "def return", "max_tokens": 3, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert "unauthenticated" not in log and "Finished server process" in log
