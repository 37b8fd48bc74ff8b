"""The vLLM plugin's glue, where vLLM is installed (the optional extra `gpu`); skipped everywhere else, which so far
is everywhere it was run: no session had vLLM (see docs/serving.md). The parts without vLLM are
tests/test_serve_vllm_core.py; scripts/gpu_check.sh measures the plugin on a GPU."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import solo_greedy

vllm = pytest.importorskip("vllm")

from flexolmo.model.runtime import load_model  # noqa: E402
from flexolmo.serve.vllm_plugin import MASKED_ARCHITECTURES, register  # noqa: E402
from flexolmo.serve.vllm_plugin.core import MaskRow  # noqa: E402

PROMPTS = ["def return self", "the cat sat on", "theorem proof lemma"]


def test_register_adds_every_masked_architecture_once():
    register()
    register()  # vLLM loads plugins in every process, sometimes twice
    assert set(MASKED_ARCHITECTURES.values()) <= vllm.ModelRegistry.get_supported_archs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM runs on a GPU")
def test_requests_with_different_masks_in_one_batch_equal_flexolmos_solo_runs(serve_merged):
    from flexolmo.serve.vllm_plugin.glue import generate, load_llm

    register()
    cpu = load_model(serve_merged)
    allowed = [{"public", "code", "math"}, {"public", "code"}, {"public"}]
    cases = [(prompt, names) for prompt in PROMPTS for names in allowed]
    llm = load_llm(serve_merged, dtype="float32", gpu_memory_utilization=0.3, seed=0)
    rows = [MaskRow(tuple(name in names for name in cpu.expert_names), None) for _, names in cases]
    outputs = generate(llm, [cpu.tokenizer(prompt)["input_ids"] for prompt, _ in cases], rows, max_tokens=8)
    for (prompt, names), output in zip(cases, outputs):
        excluded = [name for name in cpu.expert_names if name not in names]
        assert list(output.outputs[0].token_ids) == solo_greedy(cpu, prompt, excluded, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM runs on a GPU")
def test_router_biases_apply_in_vllm_as_in_flexolmos_runtime(serve_merged_biased):
    from flexolmo.serve.vllm_plugin.glue import generate, load_llm

    register()
    cpu = load_model(serve_merged_biased, router_bias=True)
    allowed = [{"public", "code", "math"}, {"public", "code"}]
    cases = [(prompt, names) for prompt in PROMPTS for names in allowed]
    llm = load_llm(serve_merged_biased, router_bias=True, dtype="float32", gpu_memory_utilization=0.3, seed=0)
    rows = [MaskRow(tuple(name in names for name in cpu.expert_names), None) for _, names in cases]
    outputs = generate(llm, [cpu.tokenizer(prompt)["input_ids"] for prompt, _ in cases], rows, max_tokens=8)
    for (prompt, names), output in zip(cases, outputs):
        excluded = [name for name in cpu.expert_names if name not in names]
        assert list(output.outputs[0].token_ids) == solo_greedy(cpu, prompt, excluded, 8)
