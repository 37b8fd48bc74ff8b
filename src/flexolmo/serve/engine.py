"""Iteration-level (continuous) batching with a per-request expert mask.

Why our own scheduler: transformers' continuous batching (`generate_batch` and its paged cache) schedules
requests by their tokens only; it has no way to carry a per-request expert mask into the model's forward, and
the mask is the whole point here. This one is deliberately small:

- One thread owns the model. Between two decode steps it admits waiting requests and drops finished or
  cancelled ones, so a long request never holds back a short one that arrives later.
- Every step runs one forward over the running requests' *whole* sequences (prompt + tokens so far),
  right-padded, with each row's mask set through `row_masks`. No KV cache: with right padding and a causal
  model, a row's real tokens never see the padding, and positions are the plain 0..n-1 a solo run uses, so
  each row computes what it computes alone with the same mask (greedy output equal to the solo run).
- The cost of that simplicity: a step costs a forward over every running token (quadratic in the length of a
  request, where a KV cache would make it linear). It is meant for small merged models on CPU and for
  correctness; per-row caches are the next step if a long context must be served fast.
- Nothing computed is kept between steps, so there is no cache that a mask or an active-set version would
  have to key: a withdrawn expert cannot leak through reused state.

Attribution: every layer's kept routing weights (top-k of the softmax over the allowed experts, not
renormalised) are summed per expert over the request's prompt tokens, and apart over its completion tokens
fed back through the model (the last completion token never is, so it has no routing of its own).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexolmo.model.moe import row_masks

log = logging.getLogger("flexolmo.serve")

# An event for a request's listener: ("token", id), ("done", finish_reason) or ("error", message).
Event = tuple[str, object]


@dataclass(eq=False)  # compared by identity: two requests are never the same one
class GenerationRequest:
    """One request as the scheduler sees it; `listener` is called from the scheduler's thread."""

    prompt_ids: list[int]
    mask: torch.Tensor  # (E,) bool: the experts this request may use
    max_tokens: int
    listener: Callable[[Event], None]
    temperature: float = 0.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    # Asked after every token with the tokens so far (e.g. `text.StopStrings`): True ends the request, "stop".
    stop_when: Callable[[list[int]], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    prompt_routing: torch.Tensor | None = None  # (E,) kept routing weight summed over layers and prompt tokens
    completion_routing: torch.Tensor | None = None
    generator: torch.Generator | None = None

    def sequence(self) -> list[int]:
        return self.prompt_ids + self.tokens


class Scheduler:
    """Runs `model` on a batch of requests, one decode step at a time, in a thread of its own."""

    def __init__(self, model: torch.nn.Module, pad_id: int, max_batch: int = 16):
        self.model = model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self._waiting: queue.Queue[GenerationRequest] = queue.Queue()
        self._running: list[GenerationRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flexolmo-scheduler", daemon=True)
        self.steps = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; requests still running or waiting are told the server is stopping."""
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        if request.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            # An unseeded request draws its seed from the OS, leaving torch's global generator alone.
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            request.generator.manual_seed(seed)
        self._waiting.put(request)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._running:  # idle: wait for a request, briefly, so that a stop is seen
                try:
                    self._running.append(self._waiting.get(timeout=0.05))
                except queue.Empty:
                    continue
            try:
                self.step()
            except Exception as error:  # a failed step must not take the server down
                log.exception("decode step failed")
                for request in self._running:
                    request.listener(("error", f"generation failed: {error}"))
                self._running = []
        while not self._waiting.empty():  # never admitted: their callers must not wait forever
            self._running.append(self._waiting.get())
        for request in self._running:
            request.listener(("error", "the server is stopping"))

    def _admit(self) -> None:
        """Move waiting requests into the batch, up to `max_batch`, without waiting."""
        while len(self._running) < self.max_batch:
            try:
                self._running.append(self._waiting.get_nowait())
            except queue.Empty:
                return

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests, then one forward over every running request and one new token for each."""
        self._admit()
        self._running = [request for request in self._running if not request.cancelled]
        if not self._running:
            return
        sequences = [request.sequence() for request in self._running]
        lengths = [len(sequence) for sequence in sequences]
        ids = torch.full((len(sequences), max(lengths)), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
        masks = torch.stack([request.mask for request in self._running])
        sink: list[torch.Tensor] = []
        with row_masks(self.model, masks.to(self.device), sink):
            logits = self.model(ids.to(self.device)).logits
        routing = torch.stack(sink).sum(dim=0).float().cpu() if sink else None  # (batch, seq, E) over layers
        finished = []
        for row, request in enumerate(self._running):
            if routing is not None:
                _attribute(request, routing[row], lengths[row])
            token = _next_token(logits[row, lengths[row] - 1], request)
            request.tokens.append(token)
            request.listener(("token", token))
            reason = _finish_reason(request, token)
            if reason:
                request.listener(("done", reason))
                finished.append(request)
        self._running = [request for request in self._running if request not in finished]
        self.steps += 1


def _attribute(request: GenerationRequest, routing: torch.Tensor, length: int) -> None:
    """Add this step's new tokens' routing: the whole prompt on its first step, then the token fed last."""
    if request.prompt_routing is None:
        request.prompt_routing = routing[:length].sum(dim=0)
        request.completion_routing = torch.zeros_like(request.prompt_routing)
    else:
        request.completion_routing += routing[length - 1]


def _next_token(logits: torch.Tensor, request: GenerationRequest) -> int:
    if request.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _finish_reason(request: GenerationRequest, token: int) -> str | None:
    if token in request.stop_ids:
        return "stop"
    if request.stop_when is not None and request.stop_when(request.tokens):
        return "stop"
    if len(request.tokens) >= request.max_tokens:
        return "length"
    return None
