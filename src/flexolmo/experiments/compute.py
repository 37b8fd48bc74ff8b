"""What each way of building a model costs: training FLOPs, owner tokens, and inference work per token.

Counted are matrix-multiply FLOPs (2 per multiply-add), the part of a transformer's work that grows with its
size; norms, softmaxes and the optimizer are left out. Per training token:
- forward: attention projections (q, k, v, o), attention scores (QK^T and AV over half the window on average:
  causal), every FFN expert a token runs through, and the LM head;
- backward: gradients with respect to inputs wherever they must flow to reach a trained tensor (everything above
  layer 0's FFN, since embeddings and attention are frozen), plus weight gradients of the trained tensors only;
  a full-model run (every weight trained) costs twice its forward there, the usual 6N.
The formula was checked against measured training throughput on the demo anchor
(benchmarks/docs/expert-training.md, coordinated vs dense FFN fine-tuning: measured/predicted ratio 1.10).
"""

from __future__ import annotations

from dataclasses import dataclass

# How each training run updates the model: which FFN experts run, and what gets weight gradients.
# dense_ffn: the anchor's FFNs fine-tuned in place (dense experts, unrestricted, the anchor's FFNs);
# dense_full: every weight of the anchor trained (the paper's dense experts: continued pretraining);
# coordinated: FlexOlmo owner training, the frozen public FFN next to the trained copy;
# router_only: router tuning of a merged model at top-k (weight gradients of the router rows are negligible).
TRAINING_KINDS = ("dense_ffn", "dense_full", "coordinated", "router_only")


@dataclass(frozen=True)
class Shape:
    """The sizes that decide matmul FLOPs, read from a dense anchor's config."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_hidden: int

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        kv_heads = config.get("num_key_value_heads") or heads
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                   config["vocab_size"], kv_heads * head_dim)

    @property
    def attention_params(self) -> int:
        return 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_hidden

    @property
    def ffn_params(self) -> int:
        return 3 * self.hidden * self.intermediate


def training_flops_per_token(config: dict, seq_len: int, kind: str, top_k: int = 1) -> float:
    """Matmul FLOPs of one training token for a run of `kind` (see TRAINING_KINDS); `top_k` is the experts per
    token of a router-tuned merged model."""
    if kind not in TRAINING_KINDS:
        raise ValueError(f"unknown training kind {kind!r}")
    shape = Shape.from_config(config)
    attention = 2 * shape.attention_params
    scores = 2 * seq_len * shape.hidden
    ffn = 2 * shape.ffn_params
    head = 2 * shape.vocab * shape.hidden
    experts = {"dense_ffn": 1, "dense_full": 1, "coordinated": 2, "router_only": top_k}[kind]
    trained_ffns = 0 if kind == "router_only" else 1
    forward = shape.layers * (attention + scores + experts * ffn) + head
    if kind == "dense_full":  # input and weight gradients of every matmul (the scores have no weights: two inputs)
        return float(3 * forward)
    backward = (head + shape.layers * (experts + trained_ffns) * ffn
                + (shape.layers - 1) * (attention + 2 * scores))
    return float(forward + backward)


def inference_flops_per_token(config: dict, seq_len: int, experts_per_token: int = 1,
                              forward_passes: float = 1) -> float:
    """Matmul FLOPs of scoring one token: `forward_passes` full models (an ensemble runs every member), each
    running `experts_per_token` FFN experts per layer."""
    shape = Shape.from_config(config)
    per_pass = (shape.layers * (2 * shape.attention_params + 2 * seq_len * shape.hidden
                                + experts_per_token * 2 * shape.ffn_params) + 2 * shape.vocab * shape.hidden)
    return float(forward_passes * per_pass)


@dataclass(frozen=True)
class TrainingRun:
    """One training run behind a method: its kind, steps, sequences per step, and how many are owner text."""

    kind: str
    steps: int
    sequences_per_step: int
    owner_sequences_per_step: int
    top_k: int = 1

    def tokens(self, seq_len: int) -> int:
        return self.steps * self.sequences_per_step * seq_len

    def owner_tokens(self, seq_len: int) -> int:
        return self.steps * self.owner_sequences_per_step * seq_len

    def flops(self, config: dict, seq_len: int) -> float:
        return self.tokens(seq_len) * training_flops_per_token(config, seq_len, self.kind, self.top_k)


def method_cost(config: dict, seq_len: int, runs: list[TrainingRun], experts_per_token: int = 1,
                forward_passes: float = 1) -> dict:
    """Training FLOPs, tokens, owner tokens and public tokens over all of a method's runs, and its inference FLOPs
    per token. `forward_passes` may be fractional: an ensemble whose members read only part of each window."""
    tokens, owner_tokens = sum(run.tokens(seq_len) for run in runs), sum(run.owner_tokens(seq_len) for run in runs)
    return {
        "training_flops": sum(run.flops(config, seq_len) for run in runs),
        "training_tokens": tokens,
        "owner_tokens": owner_tokens,
        "public_tokens": tokens - owner_tokens,
        "inference_flops_per_token": inference_flops_per_token(config, seq_len, experts_per_token, forward_passes),
        "forward_passes_per_token": forward_passes,
        "experts_per_token": experts_per_token,
    }
