"""FlexOlmo's mixture-of-experts block, and the surgery that puts it into a dense transformers model.

The block replaces a decoder layer's FFN and keeps transformers' names: `experts.E.{gate,up,down}_proj` are the
anchor family's own FFN modules (expert 0 *is* the anchor's FFN object), and the router is one `nn.Linear(H, 1)`
per expert (`gate.rows.E`), so each expert's row can be frozen or trained on its own. Everything else in the
model (attention, norms, embeddings, LM head) stays transformers' code, untouched.

Routing is the paper's: logits `x . r_e (+ b_e)`, softmax over the *active* experts, top-k. Whether the kept
weights are renormalised to sum to 1 depends on where the FFN output goes (`normalize_top_k`, the merged config's
`norm_topk_prob`). OLMo-2 is post-norm: the block's output passes through an RMSNorm before the residual add, which
cancels the kept mass, so the paper does not renormalise. Llama, Mistral and Qwen are pre-norm: the output is
added as it is, so a kept mass of 0.6 would shrink every layer's FFN contribution by 40% against what owners
trained at top-2 of 2 (mass 1); those merged formats renormalise. Either way masking an expert (logit -inf)
is exactly removing it: the softmax, the top-k and the renormalisation all run over the active experts only.

The block is batch-first and, when every active expert is selected (owner training: top-2 of 2), runs each
expert as plain `nn.Linear` calls on the (batch, seq, hidden) tensor. That is what lets Opacus compute exact
per-sample gradients. When top-k < active experts (merged inference), each expert sees only its tokens: the
(token, slot) pairs are sorted by expert, each expert runs once on its contiguous group, and the results go
back to (token, slot) order and are summed over the k slots (a single token, as in batch-1 decoding, just runs
its k experts in turn). That costs one host sync per layer (the group sizes) and no scatter-add, whose CPU
kernel dominated one-token decoding, and whose CUDA kernel is not deterministic.

A server batches requests whose callers may use different experts, so besides the whole-model mask (`active`)
a block can carry a per-row mask (`row_active`, (batch, E), set by `row_masks`): row b's masked experts get
logit -inf for that row only, so each row computes exactly what the model computes alone with that mask, with
one copy of the weights. A row with fewer allowed experts than top-k keeps them all (top-k capped per row);
its other top-k slots have weight 0 and are skipped, not computed. `row_masks` can also collect each forward's
kept routing weights, which is what a server attributes to each expert's owner.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

ROUTER_Z_LOSS_COEF = 1e-3


class ExpertRouter(nn.Module):
    """One router row per expert; owner rows may carry a learned bias kept <= 0 by `clamp_bias_`."""

    def __init__(self, hidden_size: int, rows: torch.Tensor, bias_experts: Sequence[int] = (), bias_start: float = 0.0):
        super().__init__()
        self.rows = nn.ModuleList(
            nn.Linear(hidden_size, 1, bias=index in bias_experts) for index in range(rows.shape[0])
        )
        with torch.no_grad():
            for index, row in enumerate(self.rows):
                row.weight.copy_(rows[index : index + 1])
                if row.bias is not None:
                    row.bias.fill_(bias_start)

    @property
    def num_experts(self) -> int:
        return len(self.rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.training:
            # One nn.Linear call per row, so that Opacus computes each row's per-sample gradients by its hooks.
            return torch.cat([row(hidden) for row in self.rows], dim=-1)
        return nn.functional.linear(hidden, self.weight(), self.bias())  # one matmul instead of E

    def weight(self) -> torch.Tensor:
        """The rows stacked, (E, H): the transformers `gate.weight` layout."""
        return torch.cat([row.weight for row in self.rows], dim=0)

    def bias(self) -> torch.Tensor | None:
        """The biases stacked, (E,), zero for rows without one; None when no row has a bias."""
        if all(row.bias is None for row in self.rows):
            return None
        return torch.cat([row.weight.new_zeros(1) if row.bias is None else row.bias for row in self.rows])

    @torch.no_grad()
    def clamp_bias_(self) -> None:
        for row in self.rows:
            if row.bias is not None:
                row.bias.clamp_(max=0.0)


class Routing(NamedTuple):
    """One forward's routing decision, every tensor (..., E) float32 except `kept_mass` (...)."""

    weights: torch.Tensor  # the weight each expert's output gets: zero outside the top-k, renormalised if so set
    logits: torch.Tensor  # router logits, -inf for masked experts
    kept_mass: torch.Tensor  # softmax mass of the kept experts before any renormalisation (1 when all are kept)


class FlexMoEBlock(nn.Module):
    """Experts `[public, e_1, ..., e_n]` behind a top-k softmax router with an active-expert mask."""

    def __init__(self, experts: Sequence[nn.Module], router: ExpertRouter, top_k: int,
                 normalize_top_k: bool = False):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but {router.num_experts} router rows")
        self.experts = nn.ModuleList(experts)
        self.gate = router
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.register_buffer("active", torch.ones(len(experts), dtype=torch.bool), persistent=False)
        self.last_z_loss: torch.Tensor | None = None
        self.row_active: torch.Tensor | None = None  # (batch, E) per-row masks, set by `row_masks`
        self.routing_sink: list[torch.Tensor] | None = None  # receives each forward's kept weights (batch, seq, E)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def _mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """The allowed experts, broadcastable to (..., E): the model's mask, and each row's where set."""
        if self.row_active is None:
            return self.active
        rows = self.active & self.row_active
        return rows.reshape(rows.shape[0], *([1] * (hidden.dim() - 2)), rows.shape[1])

    def _active_count(self) -> int:
        """The most experts any row may use: top-k is capped at that, and rows with fewer skip empty slots."""
        if self.row_active is None:
            return int(self.active.sum())
        return int((self.active & self.row_active).sum(dim=-1).max())

    def _router_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax over the active experts, masked logits); both (..., E) float32."""
        logits = self.gate(hidden).float().masked_fill(~self._mask(hidden), float("-inf"))
        return torch.softmax(logits, dim=-1), logits

    def _top_k(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept weights (..., k), their experts (..., k), kept mass (...)): the weights renormalised when the
        block does so. Masked experts have probability 0, so they are never kept with a positive weight."""
        top_weights, top_index = probs.topk(self.top_k, dim=-1)
        kept_mass = top_weights.sum(dim=-1)
        if self.normalize_top_k:
            top_weights = top_weights / kept_mass.unsqueeze(-1)
        return top_weights, top_index, kept_mass

    def route(self, hidden: torch.Tensor) -> Routing:
        """The routing this block applies to `hidden`, with per-expert weights (zeros outside the top-k)."""
        probs, logits = self._router_probs(hidden)
        if self.top_k >= self._active_count():  # every active expert is kept; masked ones already have weight 0
            return Routing(probs, logits, probs.new_ones(probs.shape[:-1]))
        top_weights, top_index, kept_mass = self._top_k(probs)
        return Routing(torch.zeros_like(probs).scatter(-1, top_index, top_weights), logits, kept_mass)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        probs, logits = self._router_probs(hidden)
        if self.training:
            active_logits = logits[..., self.active]
            self.last_z_loss = torch.logsumexp(active_logits, dim=-1).pow(2).mean()
        if self.top_k >= self._active_count():
            self._record(probs)
            return self._dense_forward(hidden, probs.to(hidden.dtype))
        top_weights, top_index, _ = self._top_k(probs)
        if self.routing_sink is not None:
            self._record(torch.zeros_like(probs).scatter(-1, top_index, top_weights))
        return self._grouped_forward(hidden, top_weights.to(hidden.dtype), top_index)

    def _record(self, kept: torch.Tensor) -> None:
        if self.routing_sink is not None:
            self.routing_sink.append(kept.detach())

    def _dense_forward(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        used = self.active if self.row_active is None else self.active & self.row_active.any(dim=0)
        output = torch.zeros_like(hidden)
        for index, expert in enumerate(self.experts):
            if used[index]:
                output = output + weights[..., index : index + 1] * expert(hidden)
        return output

    def _grouped_forward(self, hidden: torch.Tensor, top_weights: torch.Tensor,
                         top_index: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens only; `top_weights`/`top_index` are (..., k) from the router's top-k."""
        k = top_index.shape[-1]
        if top_index.numel() == k:  # one token (batch-1 decoding): its k experts in turn, nothing to group
            slot_weights = top_weights.reshape(k, 1)
            return sum(slot_weights[slot] * self.experts[expert](hidden)
                       for slot, expert in enumerate(top_index.reshape(k).tolist()))
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        slots = top_index.reshape(-1)  # expert of each (token, slot) pair, token-major
        if self.row_active is not None:  # a row allowed fewer than k experts: its empty slots (weight 0) go last
            slots = slots.masked_fill(top_weights.reshape(-1) == 0, self.num_experts)
        order = slots.argsort(stable=True)  # the pairs grouped by expert
        sizes = torch.bincount(slots, minlength=self.num_experts + 1).tolist()  # the one host sync
        grouped_hidden = flat_hidden[order // k]
        outputs = [expert(group) for expert, group, size in zip(self.experts, grouped_hidden.split(sizes), sizes)
                   if size]
        # Skipped slots (only under row masks) stay zero; otherwise every row is written, so no fill is paid.
        per_slot = torch.zeros_like(grouped_hidden) if sizes[-1] else torch.empty_like(grouped_hidden)
        per_slot[order[: len(order) - sizes[-1]]] = torch.cat(outputs)  # back to (token, slot) order
        weighted = per_slot.view(-1, k, hidden.shape[-1]) * top_weights.reshape(-1, k, 1)
        return weighted.sum(dim=1).reshape(hidden.shape)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    return model.model.layers


def moe_blocks(model: nn.Module) -> Iterator[FlexMoEBlock]:
    """Every FlexMoEBlock in `model`, in layer order (works on wrappers and ensembles too)."""
    for module in model.modules():
        if isinstance(module, FlexMoEBlock):
            yield module


@torch.no_grad()
def set_router_bias(model: nn.Module, expert: int, per_layer: Sequence[float]) -> None:
    """Give `expert`'s router row a fixed bias in every MoE layer of `model` (one value per layer), replacing any
    it had. flexolmo's runtime only: the merged checkpoint formats have no router bias."""
    for block, value in zip(moe_blocks(model), per_layer, strict=True):
        row = block.gate.rows[expert]
        row.bias = nn.Parameter(row.weight.new_tensor([value]), requires_grad=False)


def convert_to_moe(
    model: nn.Module,
    router_rows: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    bias_experts: Sequence[int] = (),
    normalize_top_k: bool = False,
    bias_start: float = 0.0,
) -> nn.Module:
    """Replace every layer's dense FFN by a FlexMoEBlock whose experts are the FFN and `num_experts - 1` copies.

    `router_rows[layer]` is that layer's (num_experts, H) router matrix. Experts are exact copies, so callers
    overwrite the ones they have trained weights for. The experts in `bias_experts` get a learned router bias
    starting at `bias_start`. `normalize_top_k` is the merged format's `norm_topk_prob`
    (it changes nothing when top-k keeps every expert, as in owner training).
    """
    for layer, rows in zip(decoder_layers(model), router_rows, strict=True):
        dense_ffn = layer.mlp
        experts = [dense_ffn] + [copy.deepcopy(dense_ffn) for _ in range(num_experts - 1)]
        like = next(dense_ffn.parameters())
        router = ExpertRouter(rows.shape[1], rows, bias_experts, bias_start)
        layer.mlp = FlexMoEBlock(experts, router, top_k, normalize_top_k).to(device=like.device, dtype=like.dtype)
    return model


def set_active_experts(model: nn.Module, active: Sequence[bool]) -> None:
    """Mask experts in every layer: an inactive expert's router logit is -inf, as if it had been removed."""
    if not any(active):
        raise ValueError("at least one expert must stay active")
    for block in moe_blocks(model):
        block.active.copy_(torch.tensor(list(active), dtype=torch.bool))


@contextmanager
def row_masks(model: nn.Module, masks: torch.Tensor,
              routing_sink: list[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, row b of every batch uses only the experts `masks[b]` allows ((batch, E) bool), on top
    of the model's own mask; with `routing_sink`, each layer's kept routing weights (batch, seq, E) are
    appended to it, in layer order, on every forward."""
    if not bool(masks.any(dim=-1).all()):
        raise ValueError("every row must keep at least one expert")
    blocks = list(moe_blocks(model))
    for block in blocks:
        block.row_active = masks.to(block.active.device)
        block.routing_sink = routing_sink
    try:
        yield
    finally:
        for block in blocks:
            block.row_active = None
            block.routing_sink = None


def router_z_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the last forward's router z-loss (mean squared logsumexp of the logits)."""
    losses = [block.last_z_loss for block in moe_blocks(model) if block.last_z_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def clamp_router_bias(model: nn.Module) -> None:
    """Project every learned router bias back to <= 0 (the paper's negative bias)."""
    for block in moe_blocks(model):
        block.gate.clamp_bias_()
