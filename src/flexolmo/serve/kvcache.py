"""The keys and values the scheduler keeps between decode steps: each request's own, batched left-padded.

A request's cache (`Rows`: per layer its keys and values, each (1, heads, length, head_dim)) is computed by
one forward over its whole sequence with its own expert mask, and from then on grows by one position per
decode step. It belongs to that request alone: two requests never share one, even with the same prompt and
mask, so a cache never mixes masks. `DecodeBatch` lays the running requests' caches side by side in one
transformers `DynamicCache`, left-padded to the longest, for one forward of one new token per row:

- left padding keeps every row's newest position in the same (last) column, so the batch grows by one column
  per step; the padding columns are masked out by the attention mask (zeros, never attended to);
- each row's position id is its own length, the position the new token has in the request's solo run.

Why one batched cache and not per-request caches concatenated at every step: `DynamicCache` appends by
concatenation anyway, so a batch that keeps its rows reuses its cache as it is, and only a change of the rows
(a request joining, leaving or recomputed) pays one copy of the others' caches into a new batch, which is
also when the padding shrinks to the new longest row.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch.nn import functional
from transformers import DynamicCache

Rows = list[tuple[torch.Tensor, torch.Tensor]]  # one request's cache: per layer (keys, values)


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which `model.forward` takes a cache: `cache` in newer transformers, `past_key_values`
    before that (both take a `DynamicCache`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_rows(cache: DynamicCache, row: int, start: int, end: int) -> Rows:
    """Positions [start, end) of batch row `row`, as views (no copy)."""
    return [(layer.keys[row : row + 1, :, start:end], layer.values[row : row + 1, :, start:end])
            for layer in cache.layers]


class DecodeBatch:
    """The caches of `requests` (any objects, compared by identity) in one left-padded `DynamicCache`."""

    def __init__(self, requests: Sequence[object], rows: Sequence[Rows]):
        self.requests = list(requests)
        self.lengths = [row[0][0].shape[-2] for row in rows]
        width = max(self.lengths)
        self.cache = DynamicCache()
        for layer in range(len(rows[0])):
            keys, values = (torch.cat([functional.pad(row[layer][part], (0, 0, width - length, 0))
                                       for row, length in zip(rows, self.lengths)])
                            for part in (0, 1))
            self.cache.update(keys, values, layer)
        self.width = width

    def row(self, request: object) -> Rows:
        """The cache of one of the batch's requests, without its padding (views)."""
        index = next(index for index, other in enumerate(self.requests) if other is request)
        return cache_rows(self.cache, index, self.width - self.lengths[index], self.width)

    def inputs(self, tokens: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The forward's inputs for one new token per row (`tokens`, in the batch's order)."""
        lengths = torch.tensor(self.lengths, device=device)
        columns = torch.arange(self.width + 1, device=device)
        return {"input_ids": torch.tensor(tokens, device=device).unsqueeze(1),
                # Real positions are the last `length` columns, and the new token's column after them.
                "attention_mask": (columns >= (self.width - lengths).unsqueeze(1)).long(),
                "position_ids": lengths.unsqueeze(1)}

    def advance(self) -> None:
        """After a forward with `inputs`: every row is one position longer (the cache grew in place)."""
        self.lengths = [length + 1 for length in self.lengths]
        self.width += 1
