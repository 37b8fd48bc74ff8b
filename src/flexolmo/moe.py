"""FlexOlmo's mixture-of-experts block, and the surgery that puts it into a dense transformers model.

The block replaces a decoder layer's FFN and keeps transformers' names: `experts.E.{gate,up,down}_proj` are the
anchor family's own FFN modules (expert 0 *is* the anchor's FFN object), and the router is one `nn.Linear(H, 1)`
per expert (`gate.rows.E`), so each expert's row can be frozen or trained on its own. Everything else in the
model (attention, norms, embeddings, LM head) stays transformers' code, untouched.

Routing is the paper's: logits `x . r_e (+ b_e)`, softmax over the *active* experts, top-k, and no
renormalisation of the kept weights; masking an expert (logit -inf) is exactly removing it.

The block is batch-first and, when every active expert is selected (owner training: top-2 of 2), runs each
expert as plain `nn.Linear` calls on the (batch, seq, hidden) tensor. That is what lets Opacus compute exact
per-sample gradients. When top-k < active experts (merged inference), each expert sees only its tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ROUTER_Z_LOSS_COEF = 1e-3


class ExpertRouter(nn.Module):
    """One router row per expert; owner rows may carry a learned bias kept <= 0 by `clamp_bias_`."""

    def __init__(self, hidden_size: int, rows: torch.Tensor, bias_experts: Sequence[int] = ()):
        super().__init__()
        self.rows = nn.ModuleList(
            nn.Linear(hidden_size, 1, bias=index in bias_experts) for index in range(rows.shape[0])
        )
        with torch.no_grad():
            for index, row in enumerate(self.rows):
                row.weight.copy_(rows[index : index + 1])
                if row.bias is not None:
                    row.bias.zero_()

    @property
    def num_experts(self) -> int:
        return len(self.rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([row(hidden) for row in self.rows], dim=-1)

    def weight(self) -> torch.Tensor:
        """The rows stacked, (E, H): the transformers `gate.weight` layout."""
        return torch.cat([row.weight for row in self.rows], dim=0)

    @torch.no_grad()
    def clamp_bias_(self) -> None:
        for row in self.rows:
            if row.bias is not None:
                row.bias.clamp_(max=0.0)


class FlexMoEBlock(nn.Module):
    """Experts `[public, e_1, ..., e_n]` behind a top-k softmax router with an active-expert mask."""

    def __init__(self, experts: Sequence[nn.Module], router: ExpertRouter, top_k: int):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but {router.num_experts} router rows")
        self.experts = nn.ModuleList(experts)
        self.gate = router
        self.top_k = top_k
        self.register_buffer("active", torch.ones(len(experts), dtype=torch.bool), persistent=False)
        self.last_z_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def routing_weights(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights per expert with zeros outside the top-k, masked logits); both (..., E), weights float32."""
        logits = self.gate(hidden).float().masked_fill(~self.active, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        k = min(self.top_k, int(self.active.sum()))
        if k == int(self.active.sum()):
            return probs, logits  # every active expert is kept; masked ones already have weight 0
        top_weights, top_index = probs.topk(k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top_index, top_weights), logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, logits = self.routing_weights(hidden)
        if self.training:
            active_logits = logits[..., self.active]
            self.last_z_loss = torch.logsumexp(active_logits, dim=-1).pow(2).mean()
        weights = weights.to(hidden.dtype)
        if self.top_k >= int(self.active.sum()):
            return self._dense_forward(hidden, weights)
        return self._dispatch_forward(hidden, weights)

    def _dense_forward(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden)
        for index, expert in enumerate(self.experts):
            if self.active[index]:
                output = output + weights[..., index : index + 1] * expert(hidden)
        return output

    def _dispatch_forward(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_weights = weights.reshape(-1, self.num_experts)
        output = torch.zeros_like(flat_hidden)
        for index, expert in enumerate(self.experts):
            tokens = flat_weights[:, index].nonzero(as_tuple=True)[0]
            if tokens.numel():
                contribution = expert(flat_hidden[tokens]) * flat_weights[tokens, index : index + 1]
                output.index_add_(0, tokens, contribution)
        return output.reshape(hidden.shape)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    return model.model.layers


def moe_blocks(model: nn.Module) -> Iterator[FlexMoEBlock]:
    """Every FlexMoEBlock in `model`, in layer order (works on wrappers and ensembles too)."""
    for module in model.modules():
        if isinstance(module, FlexMoEBlock):
            yield module


def convert_to_moe(
    model: nn.Module,
    router_rows: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    bias_experts: Sequence[int] = (),
) -> nn.Module:
    """Replace every layer's dense FFN by a FlexMoEBlock whose experts are the FFN and `num_experts - 1` copies.

    `router_rows[layer]` is that layer's (num_experts, H) router matrix. Experts are exact copies, so callers
    overwrite the ones they have trained weights for.
    """
    for layer, rows in zip(decoder_layers(model), router_rows, strict=True):
        dense_ffn = layer.mlp
        experts = [dense_ffn] + [copy.deepcopy(dense_ffn) for _ in range(num_experts - 1)]
        like = next(dense_ffn.parameters())
        router = ExpertRouter(rows.shape[1], rows, bias_experts)
        layer.mlp = FlexMoEBlock(experts, router, top_k).to(device=like.device, dtype=like.dtype)
    return model


def set_active_experts(model: nn.Module, active: Sequence[bool]) -> None:
    """Mask experts in every layer: an inactive expert's router logit is -inf, as if it had been removed."""
    if not any(active):
        raise ValueError("at least one expert must stay active")
    for block in moe_blocks(model):
        block.active.copy_(torch.tensor(list(active), dtype=torch.bool))


def router_z_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of the last forward's router z-loss (mean squared logsumexp of the logits)."""
    losses = [block.last_z_loss for block in moe_blocks(model) if block.last_z_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def clamp_router_bias(model: nn.Module) -> None:
    """Project every learned router bias back to <= 0 (the paper's negative bias)."""
    for block in moe_blocks(model):
        block.gate.clamp_bias_()
