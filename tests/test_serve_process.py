"""`flexolmo serve` as a process: it starts from the command line (saying in one line that, without
--trusted-keys, the model is unauthenticated, and applying the owners' router biases with --router-bias), and
SIGTERM lets the requests in flight finish before it exits."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 90, log: Path | None = None) -> None:
    """Until `url`/health answers 200; else fail with the server's output: its piped output, or the end of `log`,
    the file it writes to."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    output = process.communicate(timeout=5) if log is None else log.read_text()[-3000:]
    raise AssertionError(f"the server did not come up: {output}")


def test_sigterm_finishes_the_request_in_flight_then_exits(serve_merged_biased):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "flexolmo", "serve", "--model", str(serve_merged_biased),
                                "--port", str(port), "--router-bias"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, process)
        assert httpx.get(f"{url}/health").json()["router_bias"] == ["code"]
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "merged", "prompt": "def return", "max_tokens": 110, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    events.append(line)
                    started.set()

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(30)
        process.send_signal(signal.SIGTERM)
        at_signal = list(events)
        client.join(timeout=60)
        # uvicorn re-raises the signal once it has shut down gracefully, so the exit status says SIGTERM.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        log = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "data: [DONE]" not in at_signal and len(events) > len(at_signal)  # it was in flight, and went on
    assert "Finished server process" in log and [line for line in events if line][-1] == "data: [DONE]"
    # Started without --trusted-keys: one line says that the expert names are whoever wrote the files'.
    warnings = [line for line in log.splitlines() if "unauthenticated (no --trusted-keys)" in line]
    assert len(warnings) == 1 and "serve acts on" in warnings[0]
    assert any('"finish_reason": "length"' in line or '"finish_reason": "stop"' in line for line in events)
