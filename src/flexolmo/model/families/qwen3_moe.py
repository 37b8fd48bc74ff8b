"""`qwen3_moe`: the merged format of Qwen3 dense anchors.

Qwen3-MoE is Qwen3 (per-head q/k norms) with a sparse block that is FlexOlmo routing (with `norm_topk_prob: true`,
as pre-norm Qwen3 needs), and no shared expert. Its sliding window, if set, would apply to every layer, so it is
switched off (anchors that use one are refused).
"""

from __future__ import annotations

from flexolmo.model.families import MergedFormat


def config_fields(anchor_config: dict) -> dict:
    return {
        "moe_intermediate_size": anchor_config["intermediate_size"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
        "sliding_window": None,
    }


FORMAT = MergedFormat(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", config_fields=config_fields)
