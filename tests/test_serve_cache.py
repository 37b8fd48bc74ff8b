"""The scheduler's KV cache: every request's cache is what its own sequence computes alone with its own mask,
whatever joins or leaves the batch around it; a change of the active set (a withdrawal, or any new version)
drops a running request's cache and recomputes it under the new mask from the next step; attribution counts
each position once."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import solo_greedy, solo_routing
from test_families import FAMILY_CONFIGS, SHAPE
from transformers import DynamicCache

from flexolmo.model.moe import convert_to_moe, decoder_layers, row_masks, set_active_experts
from flexolmo.model.runtime import load_model
from flexolmo.serve.engine import CacheKey, GenerationRequest, Scheduler
from flexolmo.serve.follow import ActiveState
from flexolmo.serve.kvcache import cache_kwarg

ALL = {"public", "code", "math"}


@pytest.fixture(scope="module")
def loaded(serve_merged):
    return load_model(serve_merged)


def mask_of(loaded, allowed):
    return torch.tensor([name in allowed for name in loaded.expert_names])


def request(loaded, prompt, allowed, max_tokens):
    events: list = []
    return GenerationRequest(loaded.tokenizer(prompt)["input_ids"], mask_of(loaded, allowed), max_tokens,
                             events.append, stop_ids=frozenset([loaded.tokenizer.eos_token_id]))


def computed_alone(loaded, ids, allowed) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values of `ids` run alone (batch 1, no padding) with `allowed` only."""
    return keys_and_values(loaded.model, ids, mask_of(loaded, allowed))


@torch.no_grad()
def keys_and_values(model, ids, mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = DynamicCache()
    with row_masks(model, mask.unsqueeze(0)):
        model(torch.tensor([ids]), use_cache=True, **{cache_kwarg(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def largest_difference(rows, other) -> float:
    return max(float((mine - theirs).abs().max()) for pair, pair_other in zip(rows, other)
               for mine, theirs in zip(pair, pair_other))


@torch.no_grad()
def greedy_from(loaded, ids, exclude, max_tokens):
    """Greedy continuation of `ids` alone, recomputed from scratch every token, with `exclude` masked."""
    loaded.exclude(exclude)
    try:
        out: list[int] = []
        while len(out) < max_tokens:
            out.append(int(loaded.model(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == loaded.tokenizer.eos_token_id:
                break
        return out
    finally:
        loaded.exclude([])


def run(scheduler):
    while scheduler.running or scheduler.waiting:
        scheduler.step()


def test_requests_joining_and_leaving_a_left_padded_batch_each_equal_their_solo_run(loaded):
    scheduler = Scheduler(loaded.model, pad_id=0, max_batch=8)
    plan = [  # (step it arrives at, prompt, experts, max tokens)
        (0, "the cat sat on the mat and then", ALL, 14),
        (0, "def", {"public", "code"}, 5),
        (2, "theorem proof lemma", {"public", "math"}, 9),
        (3, "return x", {"public"}, 3),
        (5, "the proof of the theorem is", {"public", "code"}, 8),
    ]
    requests = [(step, prompt, allowed, request(loaded, prompt, allowed, tokens))
                for step, prompt, allowed, tokens in plan]
    cancelled = request(loaded, "the cat", ALL, 20)
    scheduler.submit(cancelled)
    widths = set()
    for step in range(40):
        for arrives, _prompt, _allowed, each in requests:
            if arrives == step:
                scheduler.submit(each)
        if step == 4:
            cancelled.cancelled = True
        scheduler.step()
        if scheduler._batch is not None:
            widths.add(scheduler._batch.width - min(scheduler._batch.lengths))
    assert not scheduler.running and not scheduler.waiting
    assert max(widths) > 0  # rows of different lengths did share a left-padded batch
    for _step, prompt, allowed, each in requests:
        assert each.tokens == solo_greedy(loaded, prompt, sorted(ALL - allowed), each.max_tokens)
        assert each.recomputed == 0
    assert 1 <= len(cancelled.tokens) <= 5


def test_a_running_requests_cache_is_its_own_sequence_computed_alone_with_its_mask(loaded):
    scheduler = Scheduler(loaded.model, pad_id=0)
    long = request(loaded, "the cat sat on the mat and the dog", ALL, 10)
    short = request(loaded, "def", {"public", "code"}, 10)
    scheduler.submit(long)
    scheduler.submit(short)
    for _ in range(4):
        scheduler.step()
    for each, allowed in ((long, ALL), (short, {"public", "code"})):
        cached = scheduler.cached(each)
        assert cached[0][0].shape[-2] == len(each.sequence()) - 1  # all but the last token, no padding
        assert largest_difference(cached, computed_alone(loaded, each.sequence()[:-1], allowed)) <= 1e-5
    # Same prompt, two masks: two caches, each its own mask's.
    other = request(loaded, "the cat sat on the mat and the dog", {"public", "math"}, 10)
    scheduler.submit(other)
    scheduler.step()
    scheduler.step()
    assert largest_difference(scheduler.cached(other),
                              computed_alone(loaded, other.sequence()[:-1], {"public", "math"})) <= 1e-5
    prompt = len(other.prompt_ids)
    mine, theirs = ([(keys[..., :prompt, :], values[..., :prompt, :]) for keys, values in scheduler.cached(one)]
                    for one in (other, long))
    assert largest_difference(mine, theirs) > 1e-4


def test_a_withdrawal_mid_request_recomputes_the_cache_under_the_new_mask_from_the_next_step(loaded):
    state = {"now": ActiveState((True, True, True), 1)}
    scheduler = Scheduler(loaded.model, pad_id=0, active=lambda: state["now"])
    prompt = "theorem proof lemma def return"
    using_math = request(loaded, prompt, ALL, 12)
    without_math = request(loaded, "the cat sat", {"public", "code"}, 12)
    scheduler.submit(using_math)
    scheduler.submit(without_math)
    for _ in range(4):
        scheduler.step()
    before = len(using_math.tokens)
    prompt_routing = using_math.prompt_routing.clone()
    completion_routing = using_math.completion_routing.clone()
    math = loaded.expert_names.index("math")
    assert prompt_routing[math] > 0 and completion_routing[math] > 0

    state["now"] = ActiveState((True, True, False), 2)  # math opts out
    scheduler.step()
    assert using_math.cache_key == CacheKey(2, (True, True, False)) and using_math.recomputed == 1
    # A new version recomputes even a request whose experts it leaves as they were: the key holds the version.
    assert without_math.cache_key == CacheKey(2, (True, True, False)) and without_math.recomputed == 1
    # The cache now is the sequence computed without math, not the one computed with it.
    cached = scheduler.cached(using_math)
    sequence = using_math.sequence()[:-1]
    assert largest_difference(cached, computed_alone(loaded, sequence, {"public", "code"})) <= 1e-5
    assert largest_difference(cached, computed_alone(loaded, sequence, ALL)) > 1e-4
    # The recompute fed the prompt again: counted once. The one token new to the model is a completion's.
    assert torch.equal(using_math.prompt_routing, prompt_routing)
    assert using_math.completion_routing[math] == completion_routing[math]
    scheduler.step()  # both rows were recomputed: the next decode batch is theirs anew, not the old one reused
    assert largest_difference(scheduler.cached(using_math),
                              computed_alone(loaded, using_math.sequence()[:-1], {"public", "code"})) <= 1e-5
    run(scheduler)

    assert using_math.completion_routing[math] == completion_routing[math]  # math got nothing after the switch
    assert using_math.recomputed == 1
    first = solo_greedy(loaded, prompt, [], before)
    assert using_math.tokens[:before] == first
    rest = greedy_from(loaded, using_math.prompt_ids + first, ["math"], using_math.max_tokens - before)
    assert using_math.tokens[before:] == rest
    assert without_math.tokens == solo_greedy(loaded, "the cat sat", ["math"], 12)


def test_failing_closed_mid_request_leaves_the_public_expert_only(loaded):
    state = {"now": ActiveState((True, True, True), 3)}
    scheduler = Scheduler(loaded.model, pad_id=0, active=lambda: state["now"])
    each = request(loaded, "def return x", ALL, 8)
    scheduler.submit(each)
    scheduler.step()
    scheduler.step()
    state["now"] = ActiveState((True, False, False), 3, failed_closed="expired")  # same version, public only
    completion = each.completion_routing.clone()
    run(scheduler)
    assert each.recomputed == 1 and each.cache_key == CacheKey(3, (True, False, False))
    added = dict(zip(loaded.expert_names, (each.completion_routing - completion).tolist()))
    assert added == {"public": pytest.approx(added["public"]), "code": 0.0, "math": 0.0} and added["public"] > 0
    assert each.tokens[2:] == greedy_from(loaded, each.prompt_ids + each.tokens[:2], ["code", "math"], 6)


def test_attribution_with_the_cache_equals_the_routing_of_the_sequence_alone(loaded):
    scheduler = Scheduler(loaded.model, pad_id=0)
    each = request(loaded, "theorem proof lemma", {"public", "math"}, 6)
    other = request(loaded, "the cat sat on the mat", ALL, 9)
    scheduler.submit(other)
    scheduler.step()
    scheduler.submit(each)
    run(scheduler)
    for one, allowed in ((each, {"public", "math"}), (other, ALL)):
        exclude = sorted(ALL - allowed)
        prompt = solo_routing(loaded, one.prompt_ids, exclude)
        whole = solo_routing(loaded, one.prompt_ids + one.tokens[:-1], exclude)
        assert torch.allclose(one.prompt_routing, prompt, atol=1e-4)
        assert torch.allclose(one.completion_routing, whole - prompt, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_every_anchor_family_decodes_with_the_cache_as_it_does_alone(model_type):
    """Left padding, the attention mask and per-row position ids through each family's own attention (Llama-3
    RoPE scaling, q/k/v biases, per-head norms, a sliding window): each row's greedy tokens equal its solo run,
    recomputed from scratch with its mask set for the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SHAPE, **FAMILY_CONFIGS[model_type])
    dense = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in dense.parameters():
            param.normal_(0.0, 0.2, generator=generator)
    rows = [torch.randn(4, SHAPE["hidden_size"], generator=generator) for _ in decoder_layers(dense)]
    model = convert_to_moe(dense, rows, 4, top_k=2).eval()
    with torch.no_grad():
        for layer in decoder_layers(model):
            for expert in list(layer.mlp.experts)[1:]:
                for param in expert.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    masks = [[True, True, True, True], [True, False, True, False], [True, False, False, False],
             [True, True, False, True]]
    prompts = [torch.randint(0, 300, (length,), generator=generator).tolist() for length in (17, 3, 9, 1)]
    scheduler = Scheduler(model, pad_id=0)
    requests = [GenerationRequest(prompt, torch.tensor(mask), 10, lambda _event: None)
                for prompt, mask in zip(prompts, masks)]
    for each in requests:
        scheduler.submit(each)
        scheduler.step()  # each joins a step later than the one before: caches of different lengths
    scheduler.step()
    for each in requests:  # every row's cache, unpadded, is its sequence computed alone: positions included
        assert largest_difference(scheduler.cached(each), keys_and_values(model, each.sequence()[:-1],
                                                                          each.mask)) <= 1e-5
    run(scheduler)
    for each, mask in zip(requests, masks):
        set_active_experts(model, mask)
        try:
            with torch.no_grad():
                alone: list[int] = []
                for _ in range(10):
                    alone.append(int(model(torch.tensor([each.prompt_ids + alone])).logits[0, -1].argmax()))
        finally:
            set_active_experts(model, [True] * 4)
        assert each.tokens == alone
