"""What the vLLM plugin computes, without vLLM: a request's mask row, its cache salt, the rows of vLLM's
persistent batch, their expansion to the flattened tokens of one forward, and the masking of every MoE layer's
router logits.

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
4. Every MoE layer's router (`mlp.gate`) has a forward hook (`RouterMasks`) that sets each token's disallowed
   experts' logits to the lowest value (`masked_logits`), so vLLM's own top-k softmax routing, whatever kernel
   computes it, gives them weight 0 and ranges over the allowed experts: the semantics of
   `flexolmo.model.moe.FlexMoEBlock.route`. The hook counts the routers it reached, and a forward that did not
   reach all of them raises: a vLLM that routes some other way fails loudly rather than serving without masks.
   (Masking the logits, not replacing vLLM's top-k, is what keeps this independent of how vLLM's MoE layer
   picks experts, which changed after 0.11.) A model loaded with its owners' router biases
   (`load_llm(..., router_bias=True)`, which sets `ROUTER_BIAS_CONFIG` in the model's config) adds each layer's
   row of `router_bias_table` to its logits first, as flexolmo's runtime does with `--router-bias`.

A request that carries no mask runs the public expert only (fail closed): the plugin is used through the
frontend, which always sends one. Slot 0 is the public expert in every merged model flexolmo writes.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from flexolmo.model.merged_format import kept_router_biases
from flexolmo.serve.access import request_mask
from flexolmo.serve.follow import ActiveState

MASK_ARG = "flexolmo_mask"  # the key of the mask in a request's SamplingParams.extra_args
ROUTER_BIAS_CONFIG = "flexolmo_router_bias"  # set in the model's config (hf_overrides) to apply kept biases
PUBLIC_SLOT = 0
SALT_PREFIX = "flexolmo-mask-v1:"
_MOE_PART = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate|experts)$")


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


def masked_logits(gating_output: torch.Tensor, token_mask: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits (T, E) with each token's disallowed experts at the dtype's lowest value, and `bias` (E,),
    where given, added first (the owners' router biases). vLLM's own routing then computes on them what
    `FlexMoEBlock.route` computes under the same masks: the softmax gives a masked expert probability 0 (its
    exponent underflows), so top-k and any renormalisation range over the allowed experts only; a token allowed
    fewer than k experts keeps them all, and its other slots have weight 0. The lowest finite value rather than
    -inf, so that no kernel ever multiplies an infinity by zero."""
    if gating_output.shape != token_mask.shape:
        raise ValueError(f"router logits {tuple(gating_output.shape)} and token masks {tuple(token_mask.shape)} "
                         "differ in shape")
    logits = gating_output if bias is None else gating_output + bias.to(gating_output.dtype)
    return logits.masked_fill(~token_mask, torch.finfo(logits.dtype).min)


def router_bias_table(record_experts: Sequence[dict], num_layers: int) -> torch.Tensor:
    """(layers, E) float32: each expert's kept router bias per layer (`kept_router_biases` of the merged record),
    zero for an expert trained without one."""
    table = torch.zeros(num_layers, len(record_experts))
    for slot, per_layer in kept_router_biases(list(record_experts)).items():
        table[:, slot] = torch.tensor(per_layer, dtype=torch.float32)
    return table


def moe_routers(named_modules: Iterable[tuple[str, nn.Module]], renormalize: bool) -> dict[int, nn.Module]:
    """Each MoE layer's router (`...layers.N.mlp.gate`, the module whose logits vLLM's MoE layer routes on), by
    decoder layer. ValueError unless every layer with experts (`...layers.N.mlp.experts`) has one and no router
    lacks experts, and every experts module renormalises as the checkpoint says (`norm_topk_prob`): a model laid
    out otherwise would route around the masks, or compute another model."""
    routers, experts = {}, {}
    for name, module in named_modules:
        match = _MOE_PART.search(name)
        if match is not None:
            (routers if match.group(2) == "gate" else experts)[int(match.group(1))] = module
    if not routers or routers.keys() != experts.keys():
        raise ValueError(f"vLLM's model has routers in layers {sorted(routers)} and experts in layers "
                         f"{sorted(experts)}: flexolmo's masks cannot reach every MoE layer of this vLLM version")
    for layer, module in experts.items():
        if _renormalizes(module) != renormalize:
            raise ValueError(f"vLLM's MoE layer {layer} routes with renormalize={_renormalizes(module)}, the "
                             f"checkpoint says norm_topk_prob={renormalize}: vLLM would not compute this model")
    return routers


def _renormalizes(experts: nn.Module) -> bool | str:
    """Whether vLLM's MoE layer renormalises its top-k weights: an attribute of the layer up to vLLM 0.11, of its
    router object (`MoERunner.router`) later; "unknown" where neither says."""
    for holder in (experts, getattr(experts, "router", None)):
        value = getattr(holder, "renormalize", None)
        if isinstance(value, bool):
            return value
    return "unknown"


class RouterMasks:
    """Puts each forward's token masks (and a layer's owner biases) into the router logits of every MoE layer,
    through a forward hook on the layer's router, and counts the layers it reached: a forward in which any MoE
    layer routed without passing through it (a vLLM version that routes another way, or a compiled model that
    does not re-run Python hooks) raises instead of returning outputs computed without the masks."""

    def __init__(self, biases: torch.Tensor | None = None):
        self.biases = biases  # (layers, E), or None: no biases applied
        self.layers = 0
        self.current: torch.Tensor | None = None  # (tokens, E) of the forward in progress
        self.reached = 0
        self._device_biases: dict[tuple[int, torch.device], torch.Tensor] = {}

    def install(self, routers: dict[int, nn.Module]) -> None:
        for layer, router in routers.items():
            router.register_forward_hook(functools.partial(self._apply, layer))
        self.layers += len(routers)

    def _apply(self, layer: int, _module: nn.Module, _inputs: tuple, output):
        if self.current is None:
            raise RuntimeError("a router ran outside a masked forward; flexolmo refuses to route without masks")
        logits = output[0] if isinstance(output, tuple) else output  # ReplicatedLinear may return (out, bias)
        masked = masked_logits(logits, self.current[: logits.shape[0]], self._bias(layer, logits.device))
        self.reached += 1
        return (masked, *output[1:]) if isinstance(output, tuple) else masked

    def _bias(self, layer: int, device: torch.device) -> torch.Tensor | None:
        if self.biases is None:
            return None
        key = (layer, device)
        if key not in self._device_biases:
            self._device_biases[key] = self.biases[layer].to(device)
        return self._device_biases[key]

    @contextmanager
    def masking(self, token_masks: torch.Tensor) -> Iterator[None]:
        """Run one forward under `token_masks` (tokens, E); afterwards, check that every router was reached."""
        self.current, self.reached = token_masks, 0
        try:
            yield
        finally:
            self.current = None
        if self.reached != self.layers:
            raise RuntimeError(f"flexolmo's expert masks reached {self.reached} of {self.layers} MoE routers in "
                               "this forward: this vLLM routes in a way the plugin does not reach, so its outputs "
                               "would ignore the masks; use the vLLM version docs/serving.md names")


def requests_for_vllm(prompts: Sequence[list[int]], rows: Sequence[MaskRow]) -> list[tuple[dict, dict]]:
    """(prompt, extra_args) per request: vLLM's token prompt with the mask's cache salt, and the mask."""
    return [({"prompt_token_ids": list(ids), "cache_salt": row.salt()}, row.extra_args())
            for ids, row in zip(prompts, rows, strict=True)]
