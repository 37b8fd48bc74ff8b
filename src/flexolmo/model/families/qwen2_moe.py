"""`qwen2_moe`: the merged format of Llama, Mistral, SmolLM2 and Qwen2/2.5 anchors.

Qwen2-MoE's sparse block is FlexOlmo routing (softmax over all experts, top-k, the kept weights renormalised
with `norm_topk_prob: true`, as the pre-norm families need) plus a shared expert behind a sigmoid gate. The shared
expert is written with all weights zero, so it adds exactly 0 to every token. It cannot be left out: vLLM's loader
always builds `shared_expert_gate` (an absent weight would be uninitialised memory) and must not be given zero-size
`shared_expert.*` tensors, so it gets a small non-zero width. Attention always has q/k/v biases in this format
(vLLM hard-codes them): Llama and Mistral anchors get zero biases (`ZERO_QKV_BIAS`), Qwen2's own are copied.
"""

from __future__ import annotations

from flexolmo.model.families import MergedFormat, ZeroTensor, head_dim

# Width of the zero shared expert: small, yet divisible by any tensor-parallel degree and quantisation block.
SHARED_EXPERT_SIZE = 128


def config_fields(anchor_config: dict) -> dict:
    layers = anchor_config["num_hidden_layers"]
    return {
        "moe_intermediate_size": anchor_config["intermediate_size"],
        "shared_expert_intermediate_size": SHARED_EXPERT_SIZE,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * layers,
    }


def _shared(proj: str, shape):
    return ZeroTensor(f"model.layers.{{layer}}.mlp.shared_expert.{proj}.weight", shape)


FORMAT = MergedFormat(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    config_fields=config_fields,
    extra_tensors=(
        _shared("gate_proj", lambda c: (SHARED_EXPERT_SIZE, c["hidden_size"])),
        _shared("up_proj", lambda c: (SHARED_EXPERT_SIZE, c["hidden_size"])),
        _shared("down_proj", lambda c: (c["hidden_size"], SHARED_EXPERT_SIZE)),
        ZeroTensor("model.layers.{layer}.mlp.shared_expert_gate.weight", lambda c: (1, c["hidden_size"])),
    ),
)

# q/k/v biases for anchors whose attention has none (Llama, Mistral).
ZERO_QKV_BIAS = (
    ZeroTensor("model.layers.{layer}.self_attn.q_proj.bias", lambda c: (c["num_attention_heads"] * head_dim(c),)),
    ZeroTensor("model.layers.{layer}.self_attn.k_proj.bias", lambda c: (c["num_key_value_heads"] * head_dim(c),)),
    ZeroTensor("model.layers.{layer}.self_attn.v_proj.bias", lambda c: (c["num_key_value_heads"] * head_dim(c),)),
)
