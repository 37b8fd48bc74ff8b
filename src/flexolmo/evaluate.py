"""Held-out scoring: the one function through which every model (anchor, expert, baseline, merged) is measured.

Bits per byte is the headline because it is comparable across tokenizers: the summed next-token loss in bits
divided by the UTF-8 bytes of the text those tokens encode. Sequences are scored in non-overlapping windows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from flexolmo.data import TokenStream
from flexolmo.progress import progress_bar


@dataclass(frozen=True)
class Score:
    """Held-out scores of one model on one domain."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    stream: TokenStream,
    seq_len: int,
    batch_size: int = 8,
    max_sequences: int | None = None,
    device: str = "cpu",
    description: str = "scoring",
) -> Score:
    """Mean next-token loss, perplexity and bits per byte of `model` over `stream`."""
    num_sequences = stream.num_sequences(seq_len)
    if max_sequences is not None:
        num_sequences = min(num_sequences, max_sequences)
    if num_sequences < 1:
        raise ValueError(f"held-out data has {stream.num_tokens} tokens, fewer than one sequence of {seq_len}")
    model.eval()
    total_nll = 0.0
    with progress_bar(description, total=num_sequences, unit="seqs") as advance:
        for first in range(0, num_sequences, batch_size):
            rows = [torch.from_numpy(stream.sequence(i, seq_len)) for i in range(first, min(first + batch_size, num_sequences))]
            batch = torch.stack(rows).to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            advance(len(rows))
    tokens = num_sequences * seq_len
    # The bytes these tokens encode, assuming the split's average bytes per token.
    scored_bytes = stream.num_bytes * tokens / max(stream.num_tokens - 1, 1)
    loss = total_nll / tokens
    return Score(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        bits_per_byte=total_nll / math.log(2) / scored_bytes,
        tokens=tokens,
        bytes=round(scored_bytes),
    )
