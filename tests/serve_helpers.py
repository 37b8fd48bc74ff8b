"""What the serving tests share: a tiny merged model, a real uvicorn server on a free loopback port, and the
reference each response is checked against (the same model run alone, with the whole-model exclusion)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn

from flexolmo.model.moe import decoder_layers
from flexolmo.model.runtime import LoadedModel
from flexolmo.serve.app import create_app
from flexolmo.serve.server import ModelServer


@contextmanager
def running_server(server: ModelServer) -> Iterator[str]:
    """Serve `server` on 127.0.0.1 in a thread; yields its base URL, and stops it (gracefully) on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(server), log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
        sock.close()


@torch.no_grad()
def solo_greedy(loaded: LoadedModel, prompt: str, exclude: list[str], max_tokens: int) -> list[int]:
    """Greedy tokens of the prompt run alone with `exclude` masked for the whole model (no KV cache)."""
    loaded.exclude(exclude)
    try:
        ids = loaded.tokenizer(prompt)["input_ids"]
        out: list[int] = []
        while len(out) < max_tokens:
            token = int(loaded.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
            if token == loaded.tokenizer.eos_token_id:
                break
        return out
    finally:
        loaded.exclude([])


@torch.no_grad()
def solo_routing(loaded: LoadedModel, ids: list[int], exclude: list[str]) -> torch.Tensor:
    """Each expert's kept routing weight summed over layers and tokens, from each layer's router input."""
    loaded.exclude(exclude)
    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
               for layer in decoder_layers(loaded.model)]
    try:
        loaded.model(torch.tensor([ids]))
        blocks = [layer.mlp for layer in decoder_layers(loaded.model)]
        return sum(block.routing_weights(hidden)[0].sum(dim=(0, 1)) for block, hidden in zip(blocks, inputs))
    finally:
        for handle in handles:
            handle.remove()
        loaded.exclude([])
