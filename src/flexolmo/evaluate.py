"""Held-out evaluation: the one path through which every model (anchor, dense expert, baseline, merged model
with or without exclusions) is measured.

Bits per byte is the headline because it is comparable across tokenizers: the summed next-token loss in bits
divided by the UTF-8 bytes of the text those tokens encode. Sequences are scored in non-overlapping windows.
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

from flexolmo.data import TokenStream, domain_name, load_token_stream
from flexolmo.errors import DataError
from flexolmo.moe import moe_blocks
from flexolmo.progress import progress_bar

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


class RoutingCounter:
    """Counts, per layer and expert, the tokens routed to that expert (selected in its top-k)."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = list(moe_blocks(model))
        self.counts = torch.zeros(len(self.blocks), self.blocks[0].num_experts if self.blocks else 0)
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
            weights, _ = block.routing_weights(args[0])
            self.counts[index] += (weights > 0).reshape(-1, block.num_experts).sum(0).float().cpu()
            if index == 0:
                self.tokens += weights.shape[0] * weights.shape[1]

        return hook

    def shares(self, expert_names: Sequence[str]) -> dict:
        """Share of tokens each expert receives, per layer and averaged over layers (shares sum to top-k)."""
        per_layer = (self.counts / max(self.tokens, 1)).tolist()
        mean = (self.counts / max(self.tokens, 1)).mean(0).tolist()
        return {
            "experts": list(expert_names),
            "mean_share": dict(zip(expert_names, mean)),
            "per_layer_share": [dict(zip(expert_names, layer)) for layer in per_layer],
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
) -> Score:
    """Mean next-token loss, perplexity, bits per byte (and routing shares, for MoE models) over `stream`."""
    num_sequences = stream.num_sequences(seq_len)
    if max_sequences is not None:
        num_sequences = min(num_sequences, max_sequences)
    if num_sequences < 1:
        raise ValueError(f"held-out data has {stream.num_tokens} tokens, fewer than one sequence of {seq_len}")
    model.eval()
    counter = RoutingCounter(model)
    total_nll = 0.0
    with progress_bar(description, total=num_sequences, unit="seqs") as advance, counter.recording():
        for first in range(0, num_sequences, batch_size):
            indices = range(first, min(first + batch_size, num_sequences))
            batch = torch.stack([torch.from_numpy(stream.sequence(i, seq_len)) for i in indices]).to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            advance(len(indices))
    tokens = num_sequences * seq_len
    # The bytes these tokens encode, assuming the split's average bytes per token.
    scored_bytes = stream.num_bytes * tokens / max(stream.num_tokens - 1, 1)
    loss = total_nll / tokens
    routing = counter.shares(expert_names or [str(i) for i in range(counter.counts.shape[1])]) \
        if counter.blocks else None
    return Score(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        bits_per_byte=total_nll / math.log(2) / scored_bytes,
        tokens=tokens,
        bytes=round(scored_bytes),
        routing=routing,
    )


class EvalSettings(BaseModel):
    """How held-out text is read and scored."""

    seq_len: int = Field(256, ge=1, description="tokens per scored window")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    max_sequences: int | None = Field(None, ge=1, description="cap on windows scored per domain (the first ones)")
    split: Literal["heldout", "all"] = Field("heldout", description="documents of each file to score")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype the model is loaded in")


@dataclass
class EvalResult:
    """Scores of one model per domain."""

    model: str
    excluded: list[str]
    domains: dict[str, Score] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"model": self.model, "excluded": self.excluded,
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
        result.domains[name] = score_stream(model, stream, settings.seq_len, settings.batch_size,
                                            settings.max_sequences, settings.device, f"{label} on {name}",
                                            expert_names)
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
                  exclude: Sequence[str] = ()) -> EvalResult:
    """Load a dense or merged model directory (with `exclude` experts masked) and evaluate it."""
    from flexolmo.runtime import load_model

    loaded = load_model(path, exclude=exclude, dtype=getattr(torch, settings.dtype), device=settings.device)
    return evaluate(loaded.model, loaded.tokenizer, domains, settings, loaded.expert_names, str(path), exclude)
