"""`flexolmo serve` over real HTTP with the official openai client: allow-lists, narrowing, 401/403, streaming,
batching of different masks, attribution, and bad input."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import solo_greedy, solo_routing

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server

KEYS = {"all-key": ["*"], "code-key": ["code"], "public-key": []}
PROMPTS = ["def return self", "one plus two", "the cat sat on", "print len list"]


@pytest.fixture(scope="module")
def served(serve_merged, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    server = ModelServer(load_model(serve_merged), ServeOptions(keys=keys))
    with running_server(server) as url:
        yield server, url


@pytest.fixture(scope="module")
def reference(serve_merged):
    return load_model(serve_merged)


def client(url, key="all-key"):
    return openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=30)


def complete(url, key, prompt, max_tokens=8, **extra):
    return client(url, key).completions.create(model="merged", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, extra_body=extra or None)


def ids_of(reference, tokens):
    return reference.tokenizer.decode(tokens, skip_special_tokens=True)


def test_concurrent_requests_with_different_keys_each_equal_their_solo_run(served, reference):
    _, url = served
    cases = [("all-key", PROMPTS[0], {}, []), ("code-key", PROMPTS[1], {}, ["math"]),
             ("public-key", PROMPTS[2], {}, ["code", "math"]),
             ("all-key", PROMPTS[3], {"experts": ["math"]}, ["code"]),
             ("all-key", PROMPTS[0], {}, []), ("code-key", PROMPTS[3], {"experts": []}, ["code", "math"])]
    lengths = [8, 3, 6, 8, 2, 5]
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(complete, url, key, prompt, length, **extra)
                   for (key, prompt, extra, _), length in zip(cases, lengths)]
        responses = [future.result() for future in futures]
    for (_key, prompt, _extra, exclude), length, response in zip(cases, lengths, responses):
        expected = solo_greedy(reference, prompt, exclude, length)
        assert response.choices[0].text == ids_of(reference, expected)
        assert response.usage.completion_tokens == len(expected)


def test_keys_and_narrowing_are_enforced_with_clear_errors(served):
    _, url = served
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        complete(url, "nobody", "x")
    response = httpx.post(f"{url}/v1/completions", json={"model": "merged", "prompt": "x"})
    assert response.status_code == 401 and "API key is required" in response.json()["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError, match="may not use expert.s. math"):
        complete(url, "code-key", "x", experts=["code", "math"])
    with pytest.raises(openai.BadRequestError, match="no expert.s. legal"):
        complete(url, "all-key", "x", experts=["legal"])
    narrowed = complete(url, "all-key", PROMPTS[0], experts=["code"])
    assert narrowed.usage.model_extra["experts"]["prompt"]["math"] == 0
    models = client(url, "code-key").models.list().data
    assert [model.id for model in models] == ["merged"] and models[0].model_extra["experts"] == ["public", "code"]


def test_attribution_sums_to_one_and_matches_the_routing_statistics(served, reference):
    _, url = served
    response = complete(url, "code-key", PROMPTS[0], max_tokens=6)
    usage = response.usage.model_extra
    prompt_ids = reference.tokenizer(PROMPTS[0])["input_ids"]
    completion_ids = solo_greedy(reference, PROMPTS[0], ["math"], 6)
    for part, ids in (("prompt", prompt_ids), ("completion", completion_ids[:-1])):
        shares = usage["experts"][part]
        assert sum(shares.values()) == pytest.approx(1.0) and shares["math"] == 0
        routing = solo_routing(reference, ids if part == "prompt" else prompt_ids + ids, ["math"])
        if part == "completion":
            routing = routing - solo_routing(reference, prompt_ids, ["math"])
        expected = (routing / routing.sum()).tolist()
        assert [shares[name] for name in reference.expert_names] == pytest.approx(expected, abs=1e-4)
    metrics = httpx.get(f"{url}/metrics").text
    assert 'flexolmo_expert_routed_tokens_total{expert="code",part="prompt"}' in metrics


def test_streaming_gives_the_same_text_and_usage_last(served):
    _, url = served
    plain = complete(url, "all-key", PROMPTS[1], max_tokens=8)
    chunks = list(client(url).completions.create(model="merged", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_sampling_with_the_same_seed_gives_the_same_text(served):
    _, url = served
    runs = [client(url).completions.create(model="merged", prompt=PROMPTS[2], max_tokens=8, temperature=1.0,
                                           seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_chat_needs_a_chat_template(served):
    server, url = served
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(url).chat.completions.create(model="merged", messages=[{"role": "user", "content": "hi"}])
    server.loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    try:
        with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1"):
            client(url).chat.completions.create(model="merged", max_completion_tokens=0,
                                                messages=[{"role": "user", "content": "hi"}])
        reply = client(url).chat.completions.create(model="merged", max_tokens=4, temperature=0,
                                                    messages=[{"role": "user", "content": PROMPTS[0]}])
        streamed = client(url).chat.completions.create(model="merged", max_tokens=4, temperature=0, stream=True,
                                                       messages=[{"role": "user", "content": PROMPTS[0]}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    finally:
        server.loaded.tokenizer.chat_template = None
    assert reply.choices[0].message.content == text and reply.usage.completion_tokens >= 1


def test_a_prompt_beyond_the_models_vocabulary_is_refused_and_the_server_goes_on(served):
    """A tokenizer larger than the model's embedding table: the request is a 400, not a failed batch."""
    server, url = served
    config = server.loaded.model.config
    vocab = config.vocab_size
    config.vocab_size = 3  # every real token id now lies beyond it
    try:
        with pytest.raises(openai.BadRequestError, match="beyond the model's vocabulary of 3"):
            client(url).completions.create(model="merged", prompt=PROMPTS[0], max_tokens=2)
    finally:
        config.vocab_size = vocab
    assert client(url).completions.create(model="merged", prompt=PROMPTS[0], max_tokens=2).usage.completion_tokens


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": "merged", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1"),
    ({"model": "merged", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens must be between 1"),
    ({"model": "merged", "prompt": "print " * 200}, 400, "has a context of"),
    ({"model": "merged"}, 400, "prompt: Field required"),
    ({"model": "merged", "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias: logit_bias is not supported"),
])
def test_bad_input_is_one_clear_error(served, body, status, message):
    _, url = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/completions", content=content,
                          headers={"authorization": "Bearer all-key", "content-type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]["message"]


def test_a_client_gone_mid_stream_leaves_the_others_fine(served, reference):
    server, url = served
    body = {"model": "merged", "prompt": PROMPTS[2], "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body,
                      headers={"authorization": "Bearer all-key"}) as response:
        next(response.iter_lines())  # one event, then hang up
    after = complete(url, "all-key", PROMPTS[0], max_tokens=5)
    assert after.choices[0].text == ids_of(reference, solo_greedy(reference, PROMPTS[0], [], 5))
    assert httpx.get(f"{url}/health").json()["status"] == "ok" and server.scheduler.running == 0
