"""What the vLLM plugin computes, without vLLM: a request's mask row, its cache salt, the rows of vLLM's
persistent batch, their expansion to the flattened tokens of one forward, and the masked top-k routing.

The path of a mask through vLLM (v1 engine), and which part of it lives here:

1. The frontend resolves a request's experts exactly as `flexolmo serve` does (`access.request_mask`: key,
   narrowing, active set) into a `MaskRow`, and submits the request with `extra_args = {MASK_ARG: [0/1, ...]}`
   in its `SamplingParams` and `cache_salt = mask_salt(row)` in its prompt. vLLM's prefix cache hashes the salt
   into the first block's key, and every later block's key chains from it, so two different masks (or one mask
   under two active-set versions) never share a cached block: nothing computed with an expert is reused for a
   request without it.
2. In the worker, a logits processor (vLLM's one per-request hook that sees `SamplingParams` before every
   forward) follows the persistent batch's changes (requests removed, added at an index, moved or swapped)
   in a `MaskTable`: row i is the mask of the request at batch index i.
3. The model's forward flattens the batch's tokens in batch-index order, request i owning positions
   `query_start_loc[i]:query_start_loc[i+1]` (vLLM's attention metadata); `token_masks` repeats each row over
   its request's tokens.
4. Every MoE layer routes with `masked_top_k`: softmax over the token's allowed experts, top-k, renormalised
   when the format does (`norm_topk_prob`), the semantics of `flexolmo.model.moe.FlexMoEBlock.route`. A model
   loaded with its owners' router biases (`load_llm(..., router_bias=True)`, which sets `ROUTER_BIAS_CONFIG` in
   the model's config) adds each layer's row of `router_bias_table` to its logits first, as flexolmo's runtime
   does with `--router-bias`.

A request that carries no mask runs the public expert only (fail closed): the plugin is used through the
frontend, which always sends one. Slot 0 is the public expert in every merged model flexolmo writes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from flexolmo.serve.access import request_mask
from flexolmo.serve.follow import ActiveState

MASK_ARG = "flexolmo_mask"  # the key of the mask in a request's SamplingParams.extra_args
ROUTER_BIAS_CONFIG = "flexolmo_router_bias"  # set in the model's config (hf_overrides) to apply kept biases
PUBLIC_SLOT = 0
SALT_PREFIX = "flexolmo-mask-v1:"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class MaskRow(NamedTuple):
    """One request's experts (a flag per expert, in the model's order) and the active-set version they were
    resolved under."""

    mask: tuple[bool, ...]
    version: int | None

    def extra_args(self) -> dict:
        """What the request carries in `SamplingParams.extra_args`."""
        return {MASK_ARG: [int(flag) for flag in self.mask]}

    def salt(self) -> str:
        """The request's prefix-cache salt: a digest of the mask and the active-set version, so blocks are only
        ever shared between requests with the same mask under the same version."""
        bits = "".join("1" if flag else "0" for flag in self.mask)
        return SALT_PREFIX + hashlib.sha256(f"{self.version}|{bits}".encode()).hexdigest()


def mask_row(expert_names: list[str], allowed: frozenset[str], requested: list[str] | None,
             active: ActiveState) -> MaskRow:
    """A request's mask row, resolved as `flexolmo serve` resolves it (400/403 as `access.requested_experts`)."""
    return MaskRow(request_mask(expert_names, allowed, requested, active.mask), active.version)


def public_only(num_experts: int) -> tuple[bool, ...]:
    return tuple(slot == PUBLIC_SLOT for slot in range(num_experts))


def check_mask_arg(value: object) -> tuple[bool, ...]:
    """A request's `extra_args[MASK_ARG]` as a mask; ValueError unless it is a list of 0/1 (or booleans) that
    keeps the public expert on."""
    if not isinstance(value, (list, tuple)) or not value or any(flag not in (0, 1) for flag in value):
        raise ValueError(f"extra_args['{MASK_ARG}'] must be a list of 0/1 flags, one per expert")
    if not value[PUBLIC_SLOT]:
        raise ValueError(f"extra_args['{MASK_ARG}'] must keep the public expert (slot {PUBLIC_SLOT}) on")
    return tuple(bool(flag) for flag in value)


def mask_of(extra_args: dict | None, num_experts: int) -> tuple[bool, ...]:
    """The mask a request's `extra_args` give a model of `num_experts`: public only when there is none or it
    does not fit (fail closed)."""
    value = (extra_args or {}).get(MASK_ARG)
    if value is None:
        return public_only(num_experts)
    try:
        mask = check_mask_arg(value)
    except ValueError:
        return public_only(num_experts)
    return mask if len(mask) == num_experts else public_only(num_experts)


class MaskTable:
    """The mask of the request at each index of vLLM's persistent batch, kept in step with the batch's changes
    as vLLM reports them to logits processors (`BatchUpdate`: removed, then added, then moved)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.rows: dict[int, tuple[bool, ...]] = {}
        self.size = 0
        self.installed = False  # set by the logits processor that keeps it; the model refuses to run without

    def update(self, size: int, removed: Iterable[int], added: Iterable[tuple[int, dict | None]],
               moved: Iterable[tuple[int, int, bool]]) -> None:
        """Apply one batch update: `added` as (index, extra_args), `moved` as (from, to, swap): a swap
        exchanges two rows, a one-way move takes the row at `from` to `to` and leaves `from` empty."""
        for index in removed:
            self.rows.pop(index, None)
        for index, extra_args in added:
            self.rows[index] = mask_of(extra_args, self.num_experts)
        for source, target, swap in moved:
            source_row, target_row = self.rows.pop(source, None), self.rows.pop(target, None)
            if source_row is not None:
                self.rows[target] = source_row
            if swap and target_row is not None:
                self.rows[source] = target_row
        self.size = size

    def batch(self, count: int) -> torch.Tensor:
        """(count, E) bool: the masks of batch indices 0..count-1 (public only for an index with no request)."""
        fallback = public_only(self.num_experts)
        return torch.tensor([self.rows.get(index, fallback) for index in range(count)], dtype=torch.bool)


def token_masks(rows: torch.Tensor, query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens, E): each request's row repeated over its tokens in a flattened batch, request i owning
    positions `query_start_loc[i]:query_start_loc[i+1]`; positions past the last request (padding that vLLM
    adds for a captured batch size) get the public expert only, their outputs are never read."""
    counts = (query_start_loc[1:] - query_start_loc[:-1]).to(torch.long)
    if counts.numel() > rows.shape[0]:
        raise ValueError(f"the forward has {counts.numel()} requests but the mask table {rows.shape[0]} rows")
    masks = rows[: counts.numel()].to(counts.device).repeat_interleave(counts, dim=0)
    if masks.shape[0] > num_tokens:
        raise ValueError(f"the requests own {masks.shape[0]} tokens but the forward has {num_tokens}")
    padding = torch.zeros(num_tokens - masks.shape[0], rows.shape[1], dtype=torch.bool, device=masks.device)
    padding[:, PUBLIC_SLOT] = True
    return torch.cat([masks, padding])


def masked_top_k(gating_output: torch.Tensor, token_mask: torch.Tensor, top_k: int, renormalize: bool,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (T, k) float32, expert ids (T, k) int32): each token's top-k of the softmax over its allowed
    experts, renormalised to sum to 1 when `renormalize`. A masked expert gets probability 0, exactly as if it
    were removed; a token allowed fewer than k experts keeps them all and its other slots have weight 0.
    `bias` (E,), where given, is added to every token's logits before the mask (the owners' router biases)."""
    if gating_output.shape != token_mask.shape:
        raise ValueError(f"router logits {tuple(gating_output.shape)} and token masks {tuple(token_mask.shape)} "
                         "differ in shape")
    logits = gating_output.float()
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~token_mask, float("-inf"))
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def router_bias_table(record_experts: Sequence[dict], num_layers: int) -> torch.Tensor:
    """(layers, E) float32: each expert's kept router bias per layer (the merged record's `router_bias`, already
    checked by `read_merged_info` to be one value <= 0 per layer), zero for an expert trained without one."""
    table = torch.zeros(num_layers, len(record_experts))
    for expert, entry in enumerate(record_experts):
        if "router_bias" in entry:
            table[:, expert] = torch.tensor(entry["router_bias"], dtype=torch.float32)
    return table


def layer_index(module_name: str) -> int:
    """The decoder layer a module belongs to, from its name in the model (`model.layers.7.mlp.experts` -> 7)."""
    match = _LAYER.search(module_name)
    if match is None:
        raise ValueError(f"module {module_name!r} is in no decoder layer (no '.layers.N.' in its name)")
    return int(match.group(1))


def per_expert(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E): top-k weights laid out per expert (0 outside the top-k), as `FlexMoEBlock.route` reports them."""
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype,
                       device=weights.device).scatter_add(-1, ids.long(), weights)


def requests_for_vllm(prompts: Sequence[list[int]], rows: Sequence[MaskRow]) -> list[tuple[dict, dict]]:
    """(prompt, extra_args) per request: vLLM's token prompt with the mask's cache salt, and the mask."""
    return [({"prompt_token_ids": list(ids), "cache_salt": row.salt()}, row.extra_args())
            for ids, row in zip(prompts, rows, strict=True)]
