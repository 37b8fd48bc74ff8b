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

import torch

from flexolmo.data import TokenStream, load_token_stream
from flexolmo.errors import DataError
from flexolmo.moe import moe_blocks
from flexolmo.progress import progress_bar


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
        raise DataError(f"the text to score has {stream.num_tokens} tokens, fewer than one window of {seq_len} + 1; "
                        "add held-out text or lower --seq-len")
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


@dataclass
class EvalSettings:
    """How held-out text is read and scored."""

    seq_len: int = 256
    batch_size: int = 8
    max_sequences: int | None = None
    split: str = "heldout"
    text_field: str = "text"
    device: str = "cpu"


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


def evaluate_path(path: Path, domains: Mapping[str, Sequence[Path]], settings: EvalSettings,
                  exclude: Sequence[str] = ()) -> EvalResult:
    """Load a dense or merged model directory (with `exclude` experts masked) and evaluate it."""
    from flexolmo.anchor import check_context
    from flexolmo.runtime import load_model

    loaded = load_model(path, exclude=exclude, device=settings.device)
    check_context(getattr(loaded.model.config, "max_position_embeddings", None), settings.seq_len, path)
    return evaluate(loaded.model, loaded.tokenizer, domains, settings, loaded.expert_names, str(path), exclude)
