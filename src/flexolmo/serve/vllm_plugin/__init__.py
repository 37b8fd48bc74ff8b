"""flexolmo's vLLM plugin: the merged families with a per-request expert mask (optional extra `gpu`).

`register` is the entry point of group `vllm.general_plugins` (pyproject.toml), which vLLM calls in every one
of its processes. It registers each merged architecture's masked model under a name of its own, so that plain
FlexOlmo, Qwen2-MoE and Qwen3-MoE checkpoints keep vLLM's own classes, and a merged model runs masked only when
loaded with `hf_overrides={"architectures": [MASKED_ARCHITECTURES[...]]}` (what `glue.load_llm` does). Nothing
here imports vLLM until `register` runs; `core` never does.
"""

from __future__ import annotations

# The merged format's architecture (config.json) -> the masked model's name in vLLM's registry.
MASKED_ARCHITECTURES = {
    "FlexOlmoForCausalLM": "FlexolmoMaskedFlexOlmoForCausalLM",
    "Qwen2MoeForCausalLM": "FlexolmoMaskedQwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "FlexolmoMaskedQwen3MoeForCausalLM",
}
_CLASSES = {
    "FlexOlmoForCausalLM": "MaskedFlexOlmoForCausalLM",
    "Qwen2MoeForCausalLM": "MaskedQwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM": "MaskedQwen3MoeForCausalLM",
}


def register() -> None:
    """Register the masked models with vLLM, by name (`module:Class`), so that no process imports them (and
    initialises CUDA) before it builds one. Idempotent, as vLLM's plugins must be."""
    from vllm import ModelRegistry

    for architecture, masked in MASKED_ARCHITECTURES.items():
        if masked not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(masked, f"flexolmo.serve.vllm_plugin.glue:{_CLASSES[architecture]}")
