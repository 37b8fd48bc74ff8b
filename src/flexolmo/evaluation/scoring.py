"""Held-out evaluation: the one path through which every model (anchor, dense expert, baseline, merged model
with or without exclusions) is measured.

How a number is computed. The text is tokenized into one stream (each document followed by EOS) and cut into
non-overlapping windows of `seq_len + 1` tokens; in a window the model predicts tokens 1..seq_len from the ones
before. The first `context_tokens` tokens of a window are context only: their predictions are not scored, so a
method that decides from a window's first tokens (prompt routing) is never scored on what it has seen, and every
method is scored on the same targets. Each scored target contributes its next-token loss; windows are capped
at `max_sequences` per domain, in stream order.
- loss: mean next-token cross-entropy (nats) over the scored targets; perplexity = exp(loss);
- bits per byte = summed loss / ln 2 / the UTF-8 bytes of text that exactly the scored target tokens encode,
  counted per token (`flexolmo.data.documents` records each token's bytes at tokenization: exact for byte-level BPE,
  from character offsets otherwise; EOS and other special tokens encode 0 bytes). It is comparable across
  tokenizers. `tokens` and `bytes` in a Score are those exact counts.
For mixture models, forward hooks on each MoE block count which experts every token is routed to.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError
from flexolmo.core.progress import console, progress_bar
from flexolmo.data.documents import domain_name
from flexolmo.data.tokens import TokenStream, load_token_stream
from flexolmo.model.anchor import check_context
from flexolmo.model.moe import moe_blocks
from flexolmo.model.runtime import load_model

# Fewer scored tokens than this give bits per byte too noisy to compare methods on; evaluate warns.
MIN_RELIABLE_TOKENS = 4096

# Held-out sequences that training commands (pretrain, train-expert) score before and after training: scoring a
# whole held-out split can take longer than the training itself.
DEFAULT_EVAL_MAX_SEQUENCES = 256


@dataclass(frozen=True)
class Score:
    """Held-out scores of one model on one domain."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    routing: dict | None = None

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


# Kept routing mass is counted in a histogram of this many equal bins over [0, 1]: percentiles to 1/1000 in
# constant memory, however many tokens are scored.
KEPT_MASS_BINS = 1000


class RoutingCounter:
    """Counts, per layer and expert, the tokens routed to that expert (selected in its top-k), and per layer the
    distribution of the kept routing mass (the softmax weight of the selected experts before any
    renormalisation: what a model that does not renormalise scales its FFN output by)."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = list(moe_blocks(model))
        self.counts = torch.zeros(len(self.blocks), self.blocks[0].num_experts if self.blocks else 0)
        self.mass_sum = torch.zeros(len(self.blocks), dtype=torch.float64)
        self.mass_histogram = torch.zeros(len(self.blocks), KEPT_MASS_BINS, dtype=torch.int64)
        self.tokens = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [block.register_forward_hook(self._hook(index)) for index, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int):
        def hook(block, args, _output):
            routing = block.route(args[0])
            self.counts[index] += (routing.weights > 0).reshape(-1, block.num_experts).sum(0).float().cpu()
            mass = routing.kept_mass.reshape(-1).double().cpu()
            self.mass_sum[index] += mass.sum()
            bins = (mass * KEPT_MASS_BINS).long().clamp_(0, KEPT_MASS_BINS - 1)
            self.mass_histogram[index] += torch.bincount(bins, minlength=KEPT_MASS_BINS)
            if index == 0:
                self.tokens += mass.numel()

        return hook

    def _mass_percentile(self, layer: int, fraction: float) -> float:
        """The lower edge of the histogram bin holding the `fraction` quantile of a layer's kept mass."""
        cumulative = self.mass_histogram[layer].cumsum(0)
        rank = fraction * int(cumulative[-1])
        return int((cumulative <= rank).sum()) / KEPT_MASS_BINS

    def shares(self, expert_names: Sequence[str]) -> dict:
        """Share of tokens each expert receives, per layer and averaged over layers (shares sum to top-k), and
        the kept routing mass per layer (mean and 5th percentile)."""
        tokens = max(self.tokens, 1)
        per_layer = (self.counts / tokens).tolist()
        mean = (self.counts / tokens).mean(0).tolist()
        mass_mean = (self.mass_sum / tokens).tolist()
        mass_p5 = [self._mass_percentile(layer, 0.05) for layer in range(len(self.blocks))]
        return {
            "experts": list(expert_names),
            "mean_share": dict(zip(expert_names, mean)),
            "per_layer_share": [dict(zip(expert_names, layer)) for layer in per_layer],
            "kept_mass": {"mean": sum(mass_mean) / len(mass_mean), "lowest_layer_p5": min(mass_p5),
                          "per_layer_mean": mass_mean, "per_layer_p5": mass_p5},
        }


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    stream: TokenStream,
    seq_len: int,
    batch_size: int = 8,
    max_sequences: int | None = None,
    device: str = "cpu",
    description: str = "scoring",
    expert_names: Sequence[str] = (),
    context_tokens: int = 0,
) -> Score:
    """Mean next-token loss, perplexity, bits per byte (and routing shares, for MoE models) over `stream`.

    Targets `max(context_tokens, 1)..seq_len` of every window are scored (see the module docstring)."""
    if not 0 <= context_tokens < seq_len:
        raise DataError(f"context tokens must be in [0, seq_len) = [0, {seq_len}), got {context_tokens}")
    num_sequences = stream.num_sequences(seq_len)
    if max_sequences is not None:
        num_sequences = min(num_sequences, max_sequences)
    if num_sequences < 1:
        raise DataError(f"the text to score has {stream.num_tokens} tokens, fewer than one window of {seq_len} + 1; "
                        "add held-out text or lower --seq-len")
    seen = getattr(model, "routing_prefix_tokens", 0)
    if seen > context_tokens:
        raise DataError(f"this model decides from the first {seen} tokens of each window; score it with at least "
                        f"{seen} context tokens (got {context_tokens}), so it is never scored on what it has seen")
    first_target = max(context_tokens, 1)
    model.eval()
    counter = RoutingCounter(model)
    total_nll, scored_tokens, scored_bytes = 0.0, 0, 0
    with progress_bar(description, total=num_sequences, unit="seqs") as advance, counter.recording():
        for first in range(0, num_sequences, batch_size):
            indices = range(first, min(first + batch_size, num_sequences))
            batch = torch.stack([torch.from_numpy(stream.sequence(i, seq_len)) for i in indices]).to(device)
            logits = model(input_ids=batch[:, :-1]).logits[:, first_target - 1:].float()
            targets = batch[:, first_target:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            scored_tokens += targets.numel()
            scored_bytes += int(sum(stream.sequence_bytes(i, seq_len)[first_target:].sum() for i in indices))
            advance(len(indices))
    if scored_bytes == 0:
        raise DataError("the scored tokens encode no text (only special tokens); check the held-out data")
    loss = total_nll / scored_tokens
    routing = counter.shares(expert_names or [str(i) for i in range(counter.counts.shape[1])]) \
        if counter.blocks else None
    return Score(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        bits_per_byte=total_nll / math.log(2) / scored_bytes,
        tokens=scored_tokens,
        bytes=scored_bytes,
        routing=routing,
    )


class EvalSettings(BaseModel):
    """How held-out text is read and scored."""

    seq_len: int = Field(256, ge=1, description="tokens per scored window")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    max_sequences: int | None = Field(None, ge=1, description="cap on windows scored per domain (the first ones)")
    split: Literal["all", "heldout"] = Field("all", description="all: every document of the files given (what a "
                                             "user means by a held-out file); heldout: only the documents "
                                             "`train-expert` holds out of a training file by its hash split")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the model is loaded in")
    context_tokens: int = Field(0, ge=0, description="leading tokens of each window given as context, not scored")


@dataclass
class EvalResult:
    """Scores of one model per domain."""

    model: str
    excluded: list[str]
    domains: dict[str, Score] = field(default_factory=dict)
    router_bias: bool = False  # the owners' kept router biases were applied (`load_model(router_bias=True)`)

    def as_dict(self) -> dict:
        return {"model": self.model, "excluded": self.excluded, "router_bias": self.router_bias,
                "domains": {name: score.as_dict() for name, score in self.domains.items()}}


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    domains: Mapping[str, Sequence[Path]],
    settings: EvalSettings,
    expert_names: Sequence[str] = (),
    label: str = "model",
    excluded: Sequence[str] = (),
) -> EvalResult:
    """Score `model` on each domain's held-out documents."""
    result = EvalResult(label, list(excluded))
    for name, files in domains.items():
        stream = load_token_stream(list(files), tokenizer, settings.split, settings.text_field)
        score = score_stream(model, stream, settings.seq_len, settings.batch_size, settings.max_sequences,
                             settings.device, f"{label} on {name}", expert_names, settings.context_tokens)
        if score.tokens < MIN_RELIABLE_TOKENS:
            console.print(f"[yellow]warning:[/] {name}: only {score.tokens:,} tokens scored (split "
                          f"'{settings.split}' of {', '.join(str(f) for f in files)}); bits per byte over fewer "
                          f"than {MIN_RELIABLE_TOKENS:,} tokens are too noisy to compare models: give more text"
                          + (" or use --split all for a file that is already held out"
                             if settings.split == "heldout" else ""))
        result.domains[name] = score
    return result


def parse_domains(values: Sequence[str]) -> dict[str, list[Path]]:
    """Domains from `--data` values: `FILE` is a domain named after the file (`code.heldout.jsonl.gz` -> `code`),
    `NAME=FILE` names it; files under one name are scored together as one domain."""
    domains: dict[str, list[Path]] = {}
    for value in values:
        name, sep, file = value.partition("=")
        if not sep or Path(value).exists():  # a file whose own path holds a "=" is a file
            name, file = domain_name(Path(value)), value
        elif not name or not file:
            raise DataError(f"--data {value!r}: expected FILE or NAME=FILE")
        domains.setdefault(name, []).append(Path(file))
    return domains


def evaluate_path(path: Path, domains: Mapping[str, Sequence[Path]], settings: EvalSettings,
                  exclude: Sequence[str] = (), trusted_keys=None, router_bias: bool = False) -> EvalResult:
    """Load a dense or merged model directory (with `exclude` experts masked, the owners' router biases applied
    when `router_bias`, and authenticated against `trusted_keys` when given: `runtime.load_model`) and
    evaluate it."""

    loaded = load_model(path, exclude=exclude, dtype=getattr(torch, settings.dtype), device=settings.device,
                        router_bias=router_bias, trusted_keys=trusted_keys)
    check_context(getattr(loaded.model.config, "max_position_embeddings", None), settings.seq_len, path)
    result = evaluate(loaded.model, loaded.tokenizer, domains, settings, loaded.expert_names, str(path), exclude)
    result.router_bias = router_bias
    return result
