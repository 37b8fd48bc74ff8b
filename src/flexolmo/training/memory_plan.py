"""A memory plan for an owner's expert training, per device, from the anchor's config.json alone.

Nothing is loaded: the anchor is instantiated on PyTorch's meta device (shapes, no storage) to count its
parameters exactly for any architecture transformers knows. The owner's model adds, per layer, one copy of the
FFN and one router row next to the frozen public row. Per device, with N processes and `--batch-size` B
sequences of S tokens split over them (T = B/N x S tokens per device):

| item | bytes |
|---|---|
| frozen weights | anchor + public router rows, in the compute dtype (2 bf16, 4 float32); / N under FSDP \
(not with `replicate_frozen`) |
| trainable weights | the owner's FFN copies and router rows, float32 master weights: 4 per parameter; / N under FSDP |
| gradients | float32: 4 per trainable parameter; / N under FSDP |
| optimizer state | AdamW's two float32 moments: 8 per trainable parameter; / N under FSDP |
| activations | what autograd keeps for the backward pass, counted tensor by tensor below, plus the logits and loss |
| working buffers | replicated: the bf16 copies autocast makes of trainable weights, DDP's gradient buckets; \
FSDP: two gathered layers, the gathered root, one layer's unsharded gradients |

Activations of one decoder layer per token (c = compute bytes; norms work in float32, f = 4), as kept by
transformers' OLMo-2 layer with scaled-dot-product attention (flash or memory-efficient kernels, which keep no
S x S matrix) and the owner's 2-expert block:
- q and k norms: their float32 inputs, f x (q width + kv width);
- attention: q, k, v and the output, c x (2 q width + 2 kv width), and a float32 log-sum-exp per head;
- post-attention and post-feed-forward norms: f x H each;
- the MoE block: its input c x H (read by the trained router row and expert), 3 c x I inside the frozen expert
  and 4 c x I inside the trained one (gate output, SiLU output, up output, and the down projection's input
  for its weight gradient), each expert's output c x H (weighted by a router probability that trains);
- router and norm statistics: a few float32 values.
The first layer keeps only its MoE block onward (nothing before it trains). With activation checkpointing, a
layer keeps only its input (c x H) and the backward pass recomputes one layer at a time. The loss adds 12 bytes
per vocabulary entry per token at its peak (float32 log-probabilities, their gradient and the logits'
gradient). A test checks the per-token count against the tensors autograd actually saves on a small model,
and benchmarks/docs/sharded-training.md checks the totals against measured peaks.

`fits` leaves 10% of the device for the CUDA context, communication buffers and allocator fragmentation.
Before sharding, each process briefly holds the owner's model in host memory (not on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from flexolmo.core.errors import FlexOlmoError
from flexolmo.model.anchor import anchor_family, read_config
from flexolmo.training.loop import OptimConfig

GIB = 1024**3
DEVICE_RESERVE = 0.10  # share of device memory the plan keeps free
MASTER_BYTES = 4  # float32 master weights, gradients and each AdamW moment
NORM_BYTES = 4  # RMSNorm computes in float32
LOSS_BYTES_PER_VOCAB = 12


class PlanSettings(BaseModel):
    """The training settings a plan is made for (flags of `flexolmo plan`)."""

    world_size: int = Field(1, ge=1, description="processes, one per device")
    # Defaults are train-expert's (`OptimConfig`), so a plan without flags describes train-expert without flags.
    batch_size: int = Field(OptimConfig.model_fields["batch_size"].default, ge=1,
                            description="sequences per micro-batch over all processes")
    seq_len: int = Field(OptimConfig.model_fields["seq_len"].default, ge=1, description="tokens per sequence")
    dtype: Literal["bfloat16", "float32"] = Field(OptimConfig.model_fields["dtype"].default,
                                                  description="compute dtype (bfloat16: mixed precision)")
    fsdp: bool = Field(False, description="FSDP2 sharding")
    replicate_frozen: bool = Field(False, description="under FSDP, frozen weights replicated rather than sharded")
    activation_checkpointing: bool = Field(False, description="recompute each layer in the backward pass")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of one device, GiB")

    @property
    def compute_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4


@dataclass(frozen=True)
class AnchorShape:
    """What the plan needs to know about an anchor, read from its config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    q_width: int  # heads x head_dim
    kv_width: int  # kv heads x head_dim
    vocab: int
    anchor_params: int
    layer_params: int  # one decoder layer of the anchor
    ffn_params: int  # one layer's FFN

    @property
    def trainable_params(self) -> int:
        """The owner's FFN copy and router row, every layer."""
        return self.layers * (self.ffn_params + self.hidden)

    @property
    def frozen_params(self) -> int:
        """The anchor and its public router rows."""
        return self.anchor_params + self.layers * self.hidden

    @property
    def owner_layer_params(self) -> int:
        """One decoder layer of the owner's model (one FSDP unit)."""
        return self.layer_params + self.ffn_params + 2 * self.hidden

    @property
    def root_params(self) -> int:
        """Everything outside the decoder layers (embeddings, final norm, LM head)."""
        return self.anchor_params - self.layers * self.layer_params


def anchor_shape(config: dict) -> AnchorShape:
    """Count the anchor's parameters on the meta device (no memory), and read the attention widths."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    layer = model.model.layers[0]
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return AnchorShape(
        hidden=hf_config.hidden_size, intermediate=hf_config.intermediate_size,
        layers=hf_config.num_hidden_layers, heads=heads, q_width=heads * head_dim, kv_width=kv_heads * head_dim,
        vocab=hf_config.vocab_size, anchor_params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        ffn_params=sum(p.numel() for p in layer.mlp.parameters()),
    )


def activation_bytes_per_token(shape: AnchorShape, compute_bytes: int, first_layer: bool = False) -> int:
    """Bytes autograd keeps per token for one decoder layer of the owner's model (see the module docstring)."""
    c, f, h, i = compute_bytes, NORM_BYTES, shape.hidden, shape.intermediate
    moe = c * h + (3 + 4) * c * i + 2 * c * h
    statistics = f * (4 + 3 * 2)  # rsqrt of four norms; router probabilities, logits and z-loss terms of 2 experts
    if first_layer:  # nothing before the MoE block trains, so the frozen expert's insides are not kept
        return c * h + 4 * c * i + 2 * c * h + f * h + statistics
    attention = f * (shape.q_width + shape.kv_width) + c * 2 * (shape.q_width + shape.kv_width) + f * shape.heads
    return attention + 2 * f * h + moe + statistics


def saved_activation_bytes(shape: AnchorShape, settings: PlanSettings) -> int:
    """Bytes autograd keeps on one device for one micro-batch, without the loss's transient peak."""
    tokens = settings.batch_size // settings.world_size * settings.seq_len
    c = settings.compute_bytes
    full_layer = activation_bytes_per_token(shape, c)
    if settings.activation_checkpointing:
        layers = shape.layers * c * shape.hidden + full_layer  # layer inputs, and one layer being recomputed
    else:
        layers = activation_bytes_per_token(shape, c, first_layer=True) + (shape.layers - 1) * full_layer
    final_norm = NORM_BYTES * shape.hidden
    log_probs = MASTER_BYTES * shape.vocab
    return tokens * (layers + final_norm + log_probs)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by item, the total, and whether it fits."""

    settings: PlanSettings
    shape: AnchorShape
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def usable(self) -> int:
        return int(self.settings.gpu_memory_gb * GIB * (1 - DEVICE_RESERVE))

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def plan_memory(config: dict, settings: PlanSettings) -> MemoryPlan:
    """The per-device memory of training an expert on the anchor of `config` with `settings`."""
    if settings.batch_size % settings.world_size:
        raise FlexOlmoError(f"--batch-size {settings.batch_size} does not split over {settings.world_size} "
                            "processes; use a multiple of --world-size")
    shape = anchor_shape(config)
    n, c = settings.world_size, settings.compute_bytes
    shard = n if settings.fsdp else 1
    frozen_shard = 1 if settings.replicate_frozen else shard
    tokens = settings.batch_size // n * settings.seq_len
    trainable = shape.trainable_params
    activations = saved_activation_bytes(shape, settings) + tokens * shape.vocab * (
        LOSS_BYTES_PER_VOCAB - MASTER_BYTES)
    if settings.fsdp:
        layer_trainable = shape.ffn_params + shape.hidden
        gathered_layer = layer_trainable if settings.replicate_frozen else shape.owner_layer_params
        gathered_root = 0 if settings.replicate_frozen else shape.root_params
        buffers = 2 * gathered_layer * c + gathered_root * c + layer_trainable * (c + MASTER_BYTES)
    else:
        autocast_copies = trainable * c if settings.dtype == "bfloat16" else 0
        ddp_buckets = trainable * MASTER_BYTES if n > 1 else 0
        buffers = autocast_copies + ddp_buckets
    items = {
        "frozen weights": math.ceil(shape.frozen_params / frozen_shard) * c,
        "trainable weights": math.ceil(trainable / shard) * MASTER_BYTES,
        "gradients": math.ceil(trainable / shard) * MASTER_BYTES,
        "optimizer state": math.ceil(trainable / shard) * 2 * MASTER_BYTES,
        "activations": activations,
        "working buffers": buffers,
    }
    return MemoryPlan(settings, shape, items)


def plan_for_anchor(anchor_dir: Path | str, settings: PlanSettings) -> MemoryPlan:
    """`plan_memory` from an anchor directory's config.json (nothing else is read)."""
    config = read_config(anchor_dir)
    anchor_family(config, anchor_dir)
    try:
        return plan_memory(config, settings)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FlexOlmoError(f"{anchor_dir}/config.json: cannot build the model shape ({error})") from None
