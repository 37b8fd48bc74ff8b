"""One served model: what a request may use, how its prompt is checked, and how its tokens and attribution come
back from the scheduler's thread to the request's event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo.core.errors import MergeError
from flexolmo.model.anchor import ANCHOR_FAMILIES
from flexolmo.model.runtime import LoadedModel
from flexolmo.serve.access import AccessError, allowed_experts, read_keys, request_mask
from flexolmo.serve.engine import Event, GenerationRequest, Scheduler
from flexolmo.serve.follow import DEFAULT_POLL, ActiveSetFollower, ActiveState
from flexolmo.serve.metrics import ServeMetrics
from flexolmo.serve.text import StopStrings
from flexolmo.trust.record import verify_slots


@dataclass(frozen=True)
class ServeOptions:
    keys: Path | None = None
    active_set: Path | str | None = None  # a file, or the consortium service's http(s) URL
    coordinator_keys: Path | None = None
    max_batch: int = 16
    active_set_poll: float = DEFAULT_POLL  # seconds between fetches of an active-set URL


class Job:
    """A request in flight, as `n` generation requests (its choices) run side by side in the batch: the
    scheduler's thread posts their events, tagged with the choice's index, into this asyncio queue."""

    def __init__(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop, active: ActiveState):
        self.queue: asyncio.Queue[tuple[int, str, object]] = asyncio.Queue()
        self.loop = loop
        self.active = active
        self.requests = requests
        for index, request in enumerate(requests):
            request.listener = functools.partial(self._post, index)

    def _post(self, index: int, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, *event))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled = True

    async def events(self) -> AsyncIterator[tuple[int, str, object]]:
        """(choice, kind, value) up to the end of every choice, or to the first error; leaving early (a client
        gone) cancels the choices still running in the scheduler."""
        running = len(self.requests)
        try:
            while running:
                index, kind, value = await self.queue.get()
                yield index, kind, value
                if kind == "error":
                    return
                if kind != "token":
                    running -= 1
        finally:
            self.cancel()


class ModelServer:
    """A loaded merged model, its scheduler, its access rules and its metrics."""

    def __init__(self, loaded: LoadedModel, options: ServeOptions):
        if not loaded.is_moe:
            raise MergeError(f"{loaded.path} is a dense model; flexolmo serve serves merged models")
        self.loaded = loaded
        self.model_id = loaded.path.name
        self.expert_names = loaded.expert_names
        family = ANCHOR_FAMILIES[loaded.record["anchor"]["config"]["model_type"]]
        # Names are the record's; every slot is checked to hold the expert its name says, as --exclude does.
        verify_slots(loaded.path, loaded.record, self.expert_names, family.ffn_projections)
        self.keys = read_keys(options.keys, self.expert_names) if options.keys else None
        self.follower = (ActiveSetFollower(options.active_set, options.coordinator_keys, loaded.record,
                                           options.active_set_poll) if options.active_set else None)
        self.context = int(loaded.model.config.max_position_embeddings)
        tokenizer = loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Right padding is never attended to by a real token, so any id the model can embed will do; a
        # tokenizer's pad or eos may lie beyond a smaller model's vocabulary (an index error, not a pad).
        if pad is None or not 0 <= pad < int(loaded.model.config.vocab_size):
            pad = 0
        # The scheduler reads the active set at every step: a withdrawal reaches running requests too.
        self.scheduler = Scheduler(loaded.model, pad_id=pad, max_batch=options.max_batch, active=self.active_state)
        eos = tokenizer.eos_token_id
        self.stop_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.metrics = ServeMetrics()

    def startup(self) -> None:
        """Before the first request: the scheduler's thread, and the active set's first fetch and poller."""
        if self.follower is not None:
            self.follower.start()
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.stop()
        if self.follower is not None:
            self.follower.stop()

    def active_state(self) -> ActiveState:
        if self.follower is None:
            return ActiveState(tuple(True for _ in self.expert_names), None)
        return self.follower.current()

    def allowed(self, api_key: str | None) -> frozenset[str]:
        return allowed_experts(self.keys, api_key, self.expert_names)

    def mask(self, allowed: frozenset[str], requested: list[str] | None) -> tuple[torch.Tensor, ActiveState]:
        """The request's mask (key, narrowing and active set together) and the active set it was taken under."""
        active = self.active_state()
        mask = request_mask(self.expert_names, allowed, requested, active.mask)
        return torch.tensor(mask, dtype=torch.bool), active

    def encode(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise AccessError(400, f"model {self.model_id} has no chat template; use /v1/completions")
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise AccessError(400, "the prompt is empty")
        vocab = int(self.loaded.model.config.vocab_size)
        if max(ids) >= vocab:  # a tokenizer larger than the model's embedding: refuse, don't fail the batch
            raise AccessError(400, f"the prompt has token ids beyond the model's vocabulary of {vocab}")
        return list(ids)

    def max_tokens(self, prompt_length: int, asked: int | None, default: int) -> int:
        """The tokens to generate: 400 for a prompt or a total beyond the model's context."""
        room = self.context - prompt_length
        if room < 1:
            raise AccessError(400, f"the prompt is {prompt_length} tokens; model {self.model_id} has a context of "
                              f"{self.context}, so at most {self.context - 1} prompt tokens")
        if asked is None:
            return min(default, room)
        if asked < 1 or asked > room:
            raise AccessError(400, f"max_tokens must be between 1 and {room} (context {self.context} minus the "
                              f"prompt's {prompt_length} tokens), got {asked}")
        return asked

    def stop_strings(self, stop: list[str]) -> StopStrings | None:
        return StopStrings(self.loaded.tokenizer, stop) if stop else None

    def start(self, prompt_ids: list[int], mask: torch.Tensor, active: ActiveState, max_tokens: int,
              temperature: float, seed: int | None, n: int = 1, stop: StopStrings | None = None,
              top_logprobs: int | None = None) -> Job:
        """Submit the request's `n` choices, each its own row of the batch with the same mask. With a seed,
        choice i samples with seed + i, so that the choices differ and a repeated request repeats them. With
        `top_logprobs` (0..20) every token comes with its logprob and that many alternatives."""
        requests = [GenerationRequest(prompt_ids, mask, max_tokens, listener=lambda _event: None,
                                      temperature=temperature, seed=None if seed is None else seed + index,
                                      stop_ids=self.stop_ids, stop_when=stop, top_logprobs=top_logprobs)
                    for index in range(n)]
        job = Job(requests, asyncio.get_running_loop(), active)
        for request in requests:
            self.scheduler.submit(request)
        return job

    def usage(self, job: Job) -> dict:
        """OpenAI's usage, plus `experts`: each expert's share of the request's routing weight, prompt and
        completion apart (see `attribution_shares`), and the active-set version the request ran under. As in
        OpenAI's, the prompt counts once and the completion tokens of all `n` choices add up; the completion's
        routing is summed over the choices."""
        prompt_ids, first = job.requests[0].prompt_ids, job.requests[0]
        completion = sum(len(request.tokens) for request in job.requests)
        routed = [request.completion_routing for request in job.requests if request.completion_routing is not None]
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                 "total_tokens": len(prompt_ids) + completion,
                 "experts": {"prompt": attribution_shares(first.prompt_routing, self.expert_names),
                             "completion": attribution_shares(sum(routed) if routed else None, self.expert_names)},
                 "active_set_version": job.active.version}
        self.metrics.record_usage(usage)
        return usage


def attribution_shares(routing: torch.Tensor | None, names: list[str]) -> dict[str, float]:
    """Each expert's share of the kept routing weight, summed over layers and tokens and normalised to sum to 1
    (an expert masked for the request has 0); empty when no token was routed (a completion of one token)."""
    if routing is None or float(routing.sum()) == 0:
        return {}
    shares = routing / routing.sum()
    return {name: float(share) for name, share in zip(names, shares)}
