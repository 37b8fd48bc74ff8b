"""What an anchor family needs beyond tensor-name templates, as small declarative pieces.

A merged format (`flex_olmo`, `qwen2_moe`, `qwen3_moe`) is one `MergedFormat`: its transformers model type and
class, the config fields it needs on top of the anchor's, and tensors it must contain that no anchor has (all
zeros, so they change no output). The family table itself is `flexolmo.model.anchor.ANCHOR_FAMILIES`; each row names
one format, its own extra zero tensors, and the refusals below: one check per feature a format cannot hold
exactly, each returning a one-line reason or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A refusal: given an anchor's config.json, the reason it cannot be merged exactly, or None.
Refusal = Callable[[dict], "str | None"]


@dataclass(frozen=True)
class ZeroTensor:
    """A tensor the merged format requires but the anchor lacks, written as zeros in every decoder layer.

    `shape` maps the anchor config to the tensor's shape. The runtime checks these stay zero on load, because
    it runs the anchor's own architecture, which has no place for them."""

    template: str
    shape: Callable[[dict], tuple[int, ...]]


@dataclass(frozen=True)
class MergedFormat:
    """A transformers/vLLM mixture-of-experts format that holds FlexOlmo routing exactly (softmax over all
    experts, top-k, no router bias; the kept weights renormalised or not as the anchor family needs, see
    `AnchorFamily.post_norm`)."""

    model_type: str
    architecture: str
    # Config fields beyond the anchor's own, from the anchor config (num_experts and top-k are set by the merge).
    config_fields: Callable[[dict], dict]
    extra_tensors: tuple[ZeroTensor, ...] = ()


def head_dim(config: dict) -> int:
    """The attention head width an anchor config implies."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def no_attention_output_bias(config: dict) -> str | None:
    if config.get("attention_bias"):
        return ("attention_bias is true: the merged format has no attention output-projection bias, so the "
                "anchor cannot be represented exactly")
    return None


def no_mlp_bias(config: dict) -> str | None:
    if config.get("mlp_bias"):
        return "mlp_bias is true: mixture-of-experts formats have no FFN biases, so the experts cannot hold it"
    return None


def standard_head_dim(config: dict) -> str | None:
    implied = config["hidden_size"] // config["num_attention_heads"]
    if head_dim(config) != implied or config["hidden_size"] % config["num_attention_heads"]:
        return (f"head_dim {head_dim(config)} differs from hidden_size / num_attention_heads = {implied}: vLLM's "
                "qwen2_moe ignores a configured head_dim, so the merged model would not load there")
    return None


def silu_activation(config: dict) -> str | None:
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act is {config.get('hidden_act')!r}: vLLM's mixture-of-experts kernels run SiLU experts only"
    return None


def no_sliding_window(config: dict) -> str | None:
    """Sliding-window attention shorter than the context changes outputs; the merged format would drop it."""
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    switched_on = config.get("use_sliding_window", True)  # Mistral has no switch: a window is always used
    layer_types = config.get("layer_types") or []
    in_use = "sliding_attention" in layer_types or (
        switched_on and window is not None and (context is None or window < context))
    if in_use:
        return (f"sliding-window attention is in use (window {window}, context {context}): the merged format "
                "cannot hold it exactly; use a checkpoint without a sliding window")
    return None
