"""The scheduler without HTTP: requests join and leave the running batch between steps, a short request that
arrives late is not held back by a long one, and each request's tokens equal its solo run."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import solo_greedy

from flexolmo.model.runtime import load_model
from flexolmo.serve.engine import GenerationRequest, Scheduler


@pytest.fixture(scope="module")
def loaded(serve_merged):
    return load_model(serve_merged)


def request(loaded, prompt, allowed, max_tokens, events):
    mask = torch.tensor([name in allowed for name in loaded.expert_names])
    return GenerationRequest(loaded.tokenizer(prompt)["input_ids"], mask, max_tokens, events.append,
                             stop_ids=frozenset([loaded.tokenizer.eos_token_id]))


def test_a_late_short_request_joins_the_batch_and_leaves_before_the_long_one(loaded):
    scheduler = Scheduler(loaded.model, pad_id=0, max_batch=4)
    long_events, short_events = [], []
    long = request(loaded, "the cat sat on", {"public", "code", "math"}, 12, long_events)
    short = request(loaded, "theorem proof", {"public", "math"}, 3, short_events)
    scheduler.submit(long)
    for _ in range(3):
        scheduler.step()
    scheduler.submit(short)
    long_tokens_when_short_done = None
    while scheduler.running or scheduler.waiting:
        scheduler.step()
        if short_events[-1:] == [("done", "length")] and long_tokens_when_short_done is None:
            long_tokens_when_short_done = len(long.tokens)
    assert long_tokens_when_short_done == 6 < len(long.tokens)  # joined after 3 steps, left after 3 more
    assert long.tokens == solo_greedy(loaded, "the cat sat on", [], 12)
    assert short.tokens == solo_greedy(loaded, "theorem proof", ["code"], 3)
    assert long_events[-1][0] == short_events[-1][0] == "done"


def test_a_cancelled_request_leaves_at_the_next_step(loaded):
    scheduler = Scheduler(loaded.model, pad_id=0)
    events: list = []
    gone = request(loaded, "the cat", {"public"}, 20, events)
    scheduler.submit(gone)
    scheduler.step()
    gone.cancelled = True
    scheduler.step()
    assert scheduler.running == 0 and len(gone.tokens) == 1
