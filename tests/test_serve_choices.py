"""`stop` and `n` with the official openai client against a real server: a stop string ends the completion just
before it (streamed too, with nothing of the stop string handed out), at the very token that completed it; `n`
gives n choices, each its own row of the batch; fields the server does not implement are one clear 400."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_helpers import solo_greedy

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.text import StopStrings, TextStream
from flexolmo.serve.threaded import running_server

PROMPT = "def return self print"


@pytest.fixture(scope="module")
def served(serve_merged):
    server = ModelServer(load_model(serve_merged), ServeOptions())
    with running_server(server) as url:
        yield server, openai.OpenAI(api_key="any", base_url=f"{url}/v1", max_retries=0, timeout=60), url


@pytest.fixture(scope="module")
def greedy(served):
    """The prompt's greedy tokens alone, their text, and a stop string that first occurs inside that text."""
    server = served[0]
    tokens = solo_greedy(server.loaded, PROMPT, [], 16)
    text = server.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    start = next(index for index in range(1, len(text) - 2) if text.find(text[index:index + 2]) == index)
    return tokens, text, text[start:start + 2], start


def decoded(server, tokens):
    return server.loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_stop_string_ends_the_completion_before_it_at_the_token_that_completed_it(served, greedy):
    server, client, _ = served
    tokens, text, stop, start = greedy
    response = client.completions.create(model="merged", prompt=PROMPT, max_tokens=16, temperature=0,
                                         stop=[stop, "never-in-this-text"])
    choice = response.choices[0]
    assert choice.text == text[:start] and choice.finish_reason == "stop"
    needed = next(count for count in range(1, len(tokens) + 1) if stop in decoded(server, tokens[:count]))
    assert response.usage.completion_tokens == needed

    streamed = list(client.completions.create(model="merged", prompt=PROMPT, max_tokens=16, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == text[:start]
    assert streamed[-1].choices[0].finish_reason == "stop" and streamed[-1].usage.completion_tokens == needed

    unmatched = client.completions.create(model="merged", prompt=PROMPT, max_tokens=16, temperature=0,
                                          stop="never-in-this-text")
    assert unmatched.choices[0].text == text and unmatched.usage.completion_tokens == len(tokens)


def test_n_choices_are_rows_of_the_batch(served, greedy):
    _, client, _ = served
    _, text, _, _ = greedy
    response = client.completions.create(model="merged", prompt=PROMPT, max_tokens=16, temperature=0, n=3)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.text for choice in response.choices] == [text] * 3  # greedy: the same three times
    single = client.completions.create(model="merged", prompt=PROMPT, max_tokens=16, temperature=0)
    assert response.usage.prompt_tokens == single.usage.prompt_tokens
    assert response.usage.completion_tokens == 3 * single.usage.completion_tokens
    shares = response.usage.model_extra["experts"]["completion"]
    assert shares == pytest.approx(single.usage.model_extra["experts"]["completion"])

    sampled = [client.completions.create(model="merged", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11,
                                         n=4) for _ in range(2)]
    texts = [choice.text for choice in sampled[0].choices]
    assert texts == [choice.text for choice in sampled[1].choices] and len(set(texts)) > 1
    alone = client.completions.create(model="merged", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11)
    assert alone.choices[0].text == texts[0]  # choice i samples with seed + i

    chunks = list(client.completions.create(model="merged", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                            seed=11, n=4, stream=True))
    by_choice = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == index) for index in range(4)]
    assert by_choice == texts
    ends = [chunk for chunk in chunks if chunk.choices[0].finish_reason]
    assert len(ends) == 4 and ends[-1] is chunks[-1]
    assert chunks[-1].usage.completion_tokens == sampled[0].usage.completion_tokens


def test_chat_honours_stop_and_n(served, greedy):
    server, client, _ = served
    server.loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        messages = [{"role": "user", "content": PROMPT}]
        plain = client.chat.completions.create(model="merged", messages=messages, max_tokens=16, temperature=0)
        text = plain.choices[0].message.content
        start = next(index for index in range(1, len(text) - 2) if text.find(text[index:index + 2]) == index)
        stop = text[start:start + 2]
        reply = client.chat.completions.create(model="merged", messages=messages, max_tokens=16, temperature=0,
                                               stop=stop, n=2)
        assert [choice.message.content for choice in reply.choices] == [text[:start]] * 2
        assert {choice.finish_reason for choice in reply.choices} == {"stop"}
        chunks = list(client.chat.completions.create(model="merged", messages=messages, max_tokens=16,
                                                     temperature=0, stop=stop, n=2, stream=True))
        for index in range(2):
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
            assert got == text[:start]
    finally:
        server.loaded.tokenizer.chat_template = None


def test_a_stream_never_hands_out_the_start_of_a_stop_string(served):
    tokenizer = served[0].loaded.tokenizer
    tokens = tokenizer("one two three four")["input_ids"]
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    stop = whole[whole.index("three"):whole.index("three") + 4]
    stream = TextStream(tokenizer, StopStrings(tokenizer, [stop, "xyz"]))
    pieces = [stream.push(token) for token in tokens]
    for count in range(1, len(tokens) + 1):  # nothing handed out may end in what could be a stop string's start
        shown = "".join(pieces[:count])
        assert stop not in shown and not any(shown.endswith(stop[:size]) for size in range(1, len(stop)))
    assert "".join(pieces) + stream.finish() == whole[:whole.index(stop)]
    assert StopStrings(tokenizer, ["abc", "bcd"]).held("xxabc") == 2  # "bc" may still become "bcd"


@pytest.mark.parametrize("extra, message", [
    ({"logprobs": 6}, "logprobs must be an integer from 0 to 5, got 6"),
    ({"logprobs": -1}, "logprobs must be an integer from 0 to 5, got -1"),
    ({"logprobs": True}, "logprobs: Input should be a valid integer"),
    ({"top_p": 0.5}, "top_p: top_p is not supported"),
    ({"best_of": 3}, "best_of: best_of is not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ({"stop": ""}, "must not be empty"),
    ({"n": 17}, "n: Input should be less than or equal to 16"),
])
def test_fields_the_server_does_not_implement_are_refused(served, extra, message):
    url = served[2]
    response = httpx.post(f"{url}/v1/completions", json={"model": "merged", "prompt": "x", **extra})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_neutral_values_of_refused_fields_are_accepted(served):
    _, client, url = served
    response = client.completions.create(model="merged", prompt="x", max_tokens=2, temperature=0, top_p=1,
                                         logprobs=None, presence_penalty=0, best_of=1, stop=[])
    assert response.choices[0].finish_reason in ("stop", "length")
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "merged", "logprobs": True, "top_logprobs": 21,
                                                          "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 400
    assert "top_logprobs must be an integer from 0 to 20, got 21" in chat.json()["error"]["message"]
    assert json.loads(chat.text)["error"]["type"] == "invalid_request_error"
