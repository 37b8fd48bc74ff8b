"""Iteration-level (continuous) batching with a per-request expert mask and a KV cache per request.

Why our own scheduler: transformers' continuous batching (`generate_batch` and its paged cache) schedules
requests by their tokens only; it has no way to carry a per-request expert mask into the model's forward, and
the mask is the whole point here. This one is deliberately small:

- One thread owns the model. Between two decode steps it admits waiting requests and drops finished or
  cancelled ones, so a long request never holds back a short one that arrives later.
- A step gives every running request one token, in at most two forwards, each row with its own mask set
  through `row_masks`: a *prefill* over the whole sequences (prompt + tokens so far) of the requests that
  have no cache yet, right-padded and with the plain positions 0..n-1 of a solo run (with a causal model a
  row's real tokens never see the right padding), and a *decode* of one token per row for the others, over
  their caches batched left-padded with an attention mask and each row's own position ids
  (`kvcache.DecodeBatch`). Each row so computes what it computes alone with its mask (greedy output equal to
  the solo run), at a cost per step linear in a request's length, not quadratic.
- Every cache is one request's own, computed with its own mask, and carries the key it was computed under:
  the request's mask as narrowed by the active set, and the active set's version (`CacheKey`). The active
  set is read at every step; when the key changes (an expert withdrawn, the server failing closed, or any new
  version, even one that leaves this request's experts as they were) the request's cache is dropped and
  recomputed from its whole sequence under the new key in that same step, so from that step on nothing
  computed with a withdrawn expert is used. A running request never gains an expert: its mask is the one it
  was admitted with, narrowed by the active set (an expert re-admitted applies from the next request on).

Attribution: every layer's kept routing weights (top-k of the softmax over the allowed experts, renormalised
where the model's format does) are summed per expert over the request's prompt tokens, and apart over its
completion tokens fed back through the model (the last completion token never is, so it has no routing of its
own). Each position counts once, from the first forward that fed it: a recompute after a withdrawal feeds the
prompt again and counts only the token that was new to it, so the tokens computed before the withdrawal stay
credited to the experts that computed them.

Logprobs: a request that asks for them gets with each token the log-softmax of the logits that token was picked
from (greedy or sampled, before the temperature), in the same forward and under the request's own mask, so
they are what its solo run with the same exclusions computes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from transformers import DynamicCache

from flexolmo.model.moe import row_masks
from flexolmo.serve.kvcache import DecodeBatch, Rows, cache_kwarg, cache_rows

log = logging.getLogger("flexolmo.serve")

# An event for a request's listener: ("token", Token), ("done", finish_reason) or ("error", message).
Event = tuple[str, object]

# OpenAI's most alternatives per token (chat's `top_logprobs`; legacy completions allow 5).
MAX_TOP_LOGPROBS = 20


class Token(NamedTuple):
    """A generated token; for a request that asked for logprobs, also its log-probability and the `top` most
    likely tokens' (id, log-probability), most likely first. Both come from the log-softmax of the very logits
    the token was picked from (before any temperature), under the request's own expert mask."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class ActiveExperts(Protocol):
    """What the active set allows now (`follow.ActiveState` is one): a mask over the experts and a version."""

    mask: tuple[bool, ...]
    version: int | None


class CacheKey(NamedTuple):
    """What a request's cache was computed under: the active set's version and the request's mask then."""

    version: int | None
    mask: tuple[bool, ...]


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
    top_logprobs: int | None = None  # None: no logprobs; else the alternatives reported per token (0..20)
    # Asked after every token with the tokens so far (e.g. `text.StopStrings`): True ends the request, "stop".
    stop_when: Callable[[list[int]], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    prompt_routing: torch.Tensor | None = None  # (E,) kept routing weight summed over layers and prompt tokens
    completion_routing: torch.Tensor | None = None
    generator: torch.Generator | None = None
    cache_key: CacheKey | None = None  # set while the scheduler holds a cache for this request
    recomputed: int = 0  # how many times its cache was dropped for a new key and recomputed
    attributed: int = 0  # positions of `sequence()` whose routing is counted already

    def sequence(self) -> list[int]:
        return self.prompt_ids + self.tokens


class Scheduler:
    """Runs `model` on a batch of requests, one decode step at a time, in a thread of its own. `active` (called
    once per step) says what the active set allows; without it every expert is allowed, version None."""

    def __init__(self, model: torch.nn.Module, pad_id: int, max_batch: int = 16,
                 active: Callable[[], ActiveExperts] | None = None):
        self.model = model
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.active = active
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        self._waiting: queue.Queue[GenerationRequest] = queue.Queue()
        self._running: list[GenerationRequest] = []
        self._prefilled: dict[GenerationRequest, Rows] = {}  # caches made this step, not yet in a batch
        self._batch: DecodeBatch | None = None
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

    def cached(self, request: GenerationRequest) -> Rows | None:
        """The cache the scheduler holds for `request` (views), or None: for tests and inspection."""
        if request in self._prefilled:
            return self._prefilled[request]
        if self._batch is not None and any(other is request for other in self._batch.requests):
            return self._batch.row(request)
        return None

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
                self._drop_caches()
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

    def _drop_caches(self) -> None:
        for request in self._running:
            request.cache_key = None
        self._prefilled = {}
        self._batch = None

    def _keyed(self) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
        """The running requests split by their cache under the active set now: (to prefill, to decode). A
        request whose key changed is counted in `recomputed` and goes to prefill; one left with no expert at all
        is ended with an error (the server never admits one: the public expert is always on)."""
        state = self.active() if self.active is not None else None
        allowed = torch.ones_like(self._running[0].mask) if state is None else torch.tensor(state.mask)
        version = None if state is None else state.version
        fresh, cached, recomputed = [], [], 0
        for request in list(self._running):
            key = CacheKey(version, tuple((request.mask & allowed).tolist()))
            if not any(key.mask):
                request.listener(("error", "none of the request's experts is in the active set"))
                self._running.remove(request)
            elif request.cache_key == key:
                cached.append(request)
            else:
                if request.cache_key is not None:
                    request.recomputed += 1
                    recomputed += 1
                request.cache_key = key
                fresh.append(request)
        if recomputed:
            log.info("active set version %s: recomputing %d running request(s) under their new masks", version,
                     recomputed)
        return fresh, cached

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests, then one new token for every running request: a prefill for those without a
        cache under the current key, a decode over the cached others."""
        self._admit()
        self._running = [request for request in self._running if not request.cancelled]
        if not self._running:
            self._drop_caches()
            return
        fresh, cached = self._keyed()
        # Caches prefilled last step for requests gone since (cancelled, finished, re-keyed) are dropped.
        self._prefilled = {request: rows for request, rows in self._prefilled.items() if request in cached}
        logits: dict[GenerationRequest, torch.Tensor] = {}
        if cached:  # first: the batch copies caches out of the old one, and must not see this step's prefills
            logits.update(self._decode(cached))
        if fresh:
            logits.update(self._prefill(fresh))
        finished = []
        for request in self._running:
            token = _next_token(logits[request], request)
            request.tokens.append(token)
            request.listener(("token", _token(logits[request], token, request.top_logprobs)))
            reason = _finish_reason(request, token)
            if reason:
                request.listener(("done", reason))
                finished.append(request)
        self._running = [request for request in self._running if request not in finished]
        if not self._running:
            self._drop_caches()
        self.steps += 1

    def _forward(self, masks: list[tuple[bool, ...]], **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, routing (batch, seq, E) summed over layers, or None for a model without routing)."""
        sink: list[torch.Tensor] = []
        with row_masks(self.model, torch.tensor(masks, device=self.device), sink):
            logits = self.model(**inputs, use_cache=True).logits
        return logits, torch.stack(sink).sum(dim=0).float().cpu() if sink else None

    def _prefill(self, requests: list[GenerationRequest]) -> dict[GenerationRequest, torch.Tensor]:
        """One forward over the whole sequences of `requests`, right-padded; keeps each one's cache."""
        sequences = [request.sequence() for request in requests]
        lengths = [len(sequence) for sequence in sequences]
        ids = torch.full((len(sequences), max(lengths)), self.pad_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
        cache = DynamicCache()
        logits, routing = self._forward([request.cache_key.mask for request in requests],
                                        input_ids=ids.to(self.device), **{self._cache_kwarg: cache})
        out = {}
        for row, (request, length) in enumerate(zip(requests, lengths)):
            self._prefilled[request] = cache_rows(cache, row, 0, length)  # the right padding left out
            if routing is not None:
                _attribute(request, routing[row, :length], 0)
            out[request] = logits[row, length - 1]
        return out

    def _decode(self, requests: list[GenerationRequest]) -> dict[GenerationRequest, torch.Tensor]:
        """One forward of each request's last token over its cache, the caches batched left-padded."""
        batch = self._batch
        same_rows = batch is not None and len(batch.requests) == len(requests) and all(
            old is new for old, new in zip(batch.requests, requests))
        if not same_rows or self._prefilled:
            # The rows changed: a new batch of last step's prefills and the old batch's rows that are still
            # valid. A request re-keyed since has a prefill, taken first, so its old row is left behind.
            rows = [self._prefilled.pop(request) if request in self._prefilled else batch.row(request)
                    for request in requests]
            batch = self._batch = DecodeBatch(requests, rows)
        self._prefilled = {}
        for request, length in zip(requests, batch.lengths):
            assert length == len(request.sequence()) - 1, "a cache must cover all but the last token"
        inputs = batch.inputs([request.tokens[-1] for request in requests], self.device)
        logits, routing = self._forward([request.cache_key.mask for request in requests],
                                        **inputs, **{self._cache_kwarg: batch.cache})
        out = {}
        for row, (request, length) in enumerate(zip(requests, batch.lengths)):
            if routing is not None:
                _attribute(request, routing[row], length)
            out[request] = logits[row, -1]
        batch.advance()
        return out


def _attribute(request: GenerationRequest, routing: torch.Tensor, start: int) -> None:
    """Add the routing (positions, E) of the request's positions from `start` on that no forward fed before:
    those in the prompt to its prompt routing, the others to its completion routing."""
    if request.prompt_routing is None:
        request.prompt_routing = torch.zeros(routing.shape[-1])
        request.completion_routing = torch.zeros(routing.shape[-1])
    end = start + routing.shape[0]
    first = max(start, request.attributed)
    prompt = len(request.prompt_ids)
    request.prompt_routing += routing[first - start : max(first, min(end, prompt)) - start].sum(dim=0)
    request.completion_routing += routing[max(first, prompt) - start : end - start].sum(dim=0)
    request.attributed = max(request.attributed, end)


def _next_token(logits: torch.Tensor, request: GenerationRequest) -> int:
    if request.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=request.generator))


def _token(logits: torch.Tensor, token: int, top: int | None) -> Token:
    """The token as its listener gets it, with its logprobs when asked for (`top` alternatives)."""
    if top is None:
        return Token(token)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
    return Token(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist())))


def _finish_reason(request: GenerationRequest, token: int) -> str | None:
    if token in request.stop_ids:
        return "stop"
    if request.stop_when is not None and request.stop_when(request.tokens):
        return "stop"
    if len(request.tokens) >= request.max_tokens:
        return "length"
    return None
