"""Logprobs over real HTTP with the official openai client: every value is the log-softmax of the solo forward of
the request's own sequence under the request's own exclusions (so a mask reaches its logprobs, also when
requests with different masks decode in one batch), in OpenAI's legacy completions shape and in the chat shape,
streamed or not; out-of-range values are one clear 400."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import solo_greedy, solo_logprobs

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server

KEYS = {"all-key": ["*"], "code-key": ["code"]}
PROMPTS = ["def return self", "one plus two", "the cat sat on", "print len list"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(serve_merged):
    return load_model(serve_merged)


@pytest.fixture(scope="module")
def url(serve_merged, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    loaded = load_model(serve_merged)
    loaded.tokenizer.chat_template = TEMPLATE
    with running_server(ModelServer(loaded, ServeOptions(keys=keys))) as base:
        yield base


def client(url, key="all-key"):
    return openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=60)


def token_ids(reference, ids, texts, logprobs, exclude) -> list[int]:
    """The ids of a completion given as token texts: at each step the id with that text whose reference logprob
    is the reported one (a sampled completion's ids are not in the response)."""
    vocab = [reference.tokenizer.decode([index]) for index in range(int(reference.model.config.vocab_size))]
    out: list[int] = []
    for text, logprob in zip(texts, logprobs):
        row = solo_logprobs(reference, ids, out + [0], exclude)[-1]
        candidates = [index for index, decoded in enumerate(vocab) if decoded == text]
        out.append(min(candidates, key=lambda index: abs(float(row[index]) - logprob)))
    return out


def test_completion_logprobs_are_the_solo_forward_under_each_requests_mask(url, reference):
    # (key, prompt, extra body, experts excluded in the reference, temperature): sent together, so requests
    # with different masks decode in one batch; the last one samples.
    cases = [("all-key", PROMPTS[0], None, [], 0.0), ("code-key", PROMPTS[1], None, ["math"], 0.0),
             ("all-key", PROMPTS[2], {"experts": []}, ["code", "math"], 0.0),
             ("all-key", PROMPTS[3], {"experts": ["math"]}, ["code"], 1.0)]

    def ask(case):
        key, prompt, extra, _, temperature = case
        return client(url, key).completions.create(model="merged", prompt=prompt, max_tokens=6, logprobs=5,
                                                   temperature=temperature, seed=3, extra_body=extra)

    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(ask, cases))
    tokenizer = reference.tokenizer
    for (_, prompt, _, exclude, temperature), response in zip(cases, responses):
        choice, ids = response.choices[0], tokenizer(prompt)["input_ids"]
        logprobs = choice.logprobs
        tokens = token_ids(reference, ids, logprobs.tokens, logprobs.token_logprobs, exclude)
        if temperature == 0:
            assert tokens == solo_greedy(reference, prompt, exclude, 6)
        expected = solo_logprobs(reference, ids, tokens, exclude)
        assert len(tokens) == response.usage.completion_tokens == len(logprobs.top_logprobs)
        for step, token in enumerate(tokens):
            assert logprobs.token_logprobs[step] == pytest.approx(float(expected[step, token]), abs=TOLERANCE)
            values, top = expected[step].topk(5)
            # The top 5 and the chosen token, always; a text shared by several tokens keeps the most likely one's.
            want: dict[str, float] = {}
            for index, value in [*zip(top.tolist(), values.tolist()), (token, float(expected[step, token]))]:
                want.setdefault(tokenizer.decode([index]), float(value))
            assert logprobs.top_logprobs[step] == pytest.approx(want, abs=TOLERANCE)
            if temperature == 0:  # greedy: the chosen token is the most likely one
                assert logprobs.token_logprobs[step] == pytest.approx(max(logprobs.top_logprobs[step].values()))
            assert logprobs.text_offset[step] == len(tokenizer.decode(tokens[:step], skip_special_tokens=True))


def test_an_excluded_expert_changes_the_logprobs_in_the_same_batch(url):
    def first_token(experts):
        extra = None if experts is None else {"experts": experts}
        response = client(url).completions.create(model="merged", prompt=PROMPTS[0], max_tokens=1, logprobs=5,
                                                  temperature=0, extra_body=extra)
        return response.choices[0].logprobs.top_logprobs[0]

    with ThreadPoolExecutor(2) as pool:
        with_all, without_math = pool.map(first_token, [None, ["code"]])
    shared = set(with_all) & set(without_math)
    assert shared and max(abs(with_all[text] - without_math[text]) for text in shared) > 1e-3


def test_logprobs_zero_gives_the_chosen_token_only(url, reference):
    response = client(url).completions.create(model="merged", prompt=PROMPTS[1], max_tokens=3, logprobs=0,
                                              temperature=0)
    logprobs = response.choices[0].logprobs
    assert [list(top) for top in logprobs.top_logprobs] == [[token] for token in logprobs.tokens]
    assert client(url).completions.create(model="merged", prompt=PROMPTS[1], max_tokens=3,
                                          temperature=0).choices[0].logprobs is None


def test_chat_logprobs_streamed_or_not(url, reference):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    asked = {"model": "merged", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
             "top_logprobs": 3, "extra_body": {"experts": ["code"]}}
    whole = client(url).chat.completions.create(**asked)
    content = whole.choices[0].logprobs.content
    tokenizer = reference.tokenizer
    prompt = tokenizer.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = token_ids(reference, ids, [entry.token for entry in content], [entry.logprob for entry in content],
                       ["math"])
    expected = solo_logprobs(reference, ids, tokens, ["math"])
    for step, entry in enumerate(content):
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 3
        values, top = expected[step].topk(3)
        assert [alt.logprob for alt in entry.top_logprobs] == pytest.approx(values.tolist(), abs=TOLERANCE)
        assert [alt.token for alt in entry.top_logprobs] == [tokenizer.decode([index]) for index in top.tolist()]
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == entry.top_logprobs[0].logprob
    chunks = list(client(url).chat.completions.create(**asked, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in content]


def test_completion_logprobs_streamed_are_the_same(url):
    asked = {"model": "merged", "prompt": PROMPTS[3], "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client(url).completions.create(**asked).choices[0].logprobs
    chunks = list(client(url).completions.create(**asked, stream=True))
    parts = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices[0].logprobs is not None]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [value for part in parts for value in getattr(part, field)] == getattr(whole, field)


@pytest.mark.parametrize("path, body, message", [
    ("completions", {"logprobs": 6}, "logprobs must be an integer from 0 to 5, got 6"),
    ("completions", {"logprobs": "2"}, "logprobs: Input should be a valid integer"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20"),
    ("chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs must be an integer from 0 to 20"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("chat/completions", {"logprobs": 3}, "logprobs: Input should be a valid boolean"),
])
def test_out_of_range_logprobs_are_one_clear_400(url, path, body, message):
    content = {"model": "merged", "prompt": "x", "messages": [{"role": "user", "content": "x"}], **body}
    response = httpx.post(f"{url}/v1/{path}", json=content, headers={"authorization": "Bearer all-key"})
    assert response.status_code == 400 and message in response.json()["error"]["message"]
