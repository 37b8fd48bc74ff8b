"""`flexolmo serve --router-bias`: the owners' kept router biases applied to every request, whatever its mask, so
each response equals the biased runtime's solo run and attribution credits the routing the bias produced."""

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

PROMPTS = ["def return self", "one plus two", "the cat sat on"]


def test_a_server_with_router_biases_runs_and_credits_the_biased_model(serve_merged_biased):
    biased = load_model(serve_merged_biased, router_bias=True)
    plain = load_model(serve_merged_biased)
    cases = [(PROMPTS[0], None, []), (PROMPTS[1], ["code"], ["math"]), (PROMPTS[2], ["math"], ["code"])]
    with running_server(ModelServer(load_model(serve_merged_biased, router_bias=True), ServeOptions())) as url:
        assert httpx.get(f"{url}/health").json()["router_bias"] == ["code"]
        client = openai.OpenAI(api_key="anyone", base_url=f"{url}/v1", max_retries=0, timeout=30)
        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(lambda case: client.completions.create(
                model="merged", prompt=case[0], max_tokens=8, temperature=0,
                extra_body={"experts": case[1]} if case[1] is not None else None), cases))
    for (prompt, _, exclude), response in zip(cases, responses):
        expected = solo_greedy(biased, prompt, exclude, 8)
        assert response.choices[0].text == biased.tokenizer.decode(expected, skip_special_tokens=True)
    # Attribution is the biased routing's, which gives the code expert visibly less than the plain model's.
    prompt_ids = biased.tokenizer(PROMPTS[0])["input_ids"]
    shares = responses[0].usage.model_extra["experts"]["prompt"]
    routing, unbiased = solo_routing(biased, prompt_ids, []), solo_routing(plain, prompt_ids, [])
    assert [shares[name] for name in biased.expert_names] == pytest.approx((routing / routing.sum()).tolist(),
                                                                           abs=1e-4)
    code = biased.expert_names.index("code")
    assert shares["code"] < float(unbiased[code] / unbiased.sum()) - 0.05


def test_eval_and_generate_apply_the_biases_with_the_flag_and_say_so(serve_merged_biased, tiny_anchor, corpora,
                                                                     tmp_path, capsys):
    from flexolmo.cli import main

    scores = {}
    for flag in ([], ["--router-bias"]):
        out = tmp_path / f"eval{len(flag)}.json"
        assert main(["eval", "--model", str(serve_merged_biased), "--data", str(corpora["code"]), "--seq-len", "32",
                     "--max-sequences", "2", "--json", str(out), *flag]) == 0
        written = json.loads(out.read_text())
        assert written["router_bias"] == bool(flag)
        scores[bool(flag)] = written["domains"]["code"]
    assert scores[True]["routing"]["mean_share"]["code"] < scores[False]["routing"]["mean_share"]["code"] - 0.05
    assert scores[True]["bits_per_byte"] != scores[False]["bits_per_byte"]
    biased = load_model(serve_merged_biased, router_bias=True)
    capsys.readouterr()
    assert main(["generate", "--model", str(serve_merged_biased), "--prompt", PROMPTS[0], "--max-new-tokens", "6",
                 "--router-bias"]) == 0
    expected = biased.tokenizer.decode(solo_greedy(biased, PROMPTS[0], [], 6), skip_special_tokens=True)
    assert capsys.readouterr().out.splitlines()[3] == expected
    assert main(["generate", "--model", str(tiny_anchor), "--prompt", "x", "--router-bias"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a dense model has no experts" in err[-1]
