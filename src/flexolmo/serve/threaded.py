"""A server in a thread of the calling process, on a free loopback port: for tests and benchmarks, which talk
to it over real HTTP. (uvicorn installs no signal handlers outside the main thread, so stopping is ours.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from flexolmo.serve.app import create_app
from flexolmo.serve.server import ModelServer


@contextmanager
def running_server(server: ModelServer, start_timeout: float = 20) -> Iterator[str]:
    """Serve `server` on 127.0.0.1; yields its base URL, and shuts it down gracefully on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=start_timeout)
        sock.close()
