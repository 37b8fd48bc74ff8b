"""The owner's training model: the anchor with every FFN turned into a 2-expert block (the anchor's frozen FFN
and the owner's copy), what of it trains, the owner's loss, and the package's tensors taken out of it and put
back. `owner.expert` trains it; the router tuning and the benchmarks reuse its pieces."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexolmo.core.weights import PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER
from flexolmo.model.anchor import Anchor
from flexolmo.model.moe import clamp_router_bias, convert_to_moe, decoder_layers, router_z_loss
from flexolmo.model.router_init import load_public_rows
from flexolmo.training.loop import causal_lm_loss

OWNER_EXPERT = 1


def build_owner_model(anchor: Anchor, owner_rows: list[torch.Tensor], negative_bias: bool,
                      bias_start: float = 0.0) -> torch.nn.Module:
    """The anchor with every FFN turned into the 2-expert block, experts identical, rows [r_pub, r_i]; with
    `negative_bias`, the owner's row carries a learned bias starting at `bias_start` (<= 0)."""
    public_rows = load_public_rows(anchor.path, len(decoder_layers(anchor.model)))
    rows = [torch.stack([public.float(), own.float()]) for public, own in zip(public_rows, owner_rows)]
    return convert_to_moe(anchor.model, rows, num_experts=2, top_k=2,
                          bias_experts=[OWNER_EXPERT] if negative_bias else [], bias_start=bias_start)


def owner_trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the owner's expert and router row; return what stays trainable, in name order."""
    owned = (f".mlp.experts.{OWNER_EXPERT}.", f".mlp.gate.rows.{OWNER_EXPERT}.")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in owned))
        if param.requires_grad:
            trainable.append((name, param))
    return trainable


def router_lr_scales(trainable: list[tuple[str, torch.nn.Parameter]], scale: float) -> dict[str, float]:
    """The router row's learning-rate multiple, by tensor name (empty when it learns at the FFN's rate)."""
    if scale == 1.0:
        return {}
    return {name: scale for name, _ in trainable if f".mlp.gate.rows.{OWNER_EXPERT}." in name}


def package_tensors(model: torch.nn.Module, projections: tuple[str, ...],
                    gather: Callable[[torch.Tensor], torch.Tensor | None] = lambda tensor: tensor
                    ) -> dict[str, torch.Tensor]:
    """The owner's expert and router row of every layer, under package names.

    `gather` turns a (possibly sharded) trained tensor into a whole one; a training strategy's `gather` is
    collective, so it is called on every rank in the same order, layer by layer, one tensor at a time, and
    returns None except on rank 0 (which then holds the package and never the whole model)."""
    tensors = {}
    for layer_index, layer in enumerate(decoder_layers(model)):
        expert = layer.mlp.experts[OWNER_EXPERT]
        row = layer.mlp.gate.rows[OWNER_EXPERT]
        owned = {PACKAGE_FFN.format(layer=layer_index, proj=proj): getattr(expert, proj).weight
                 for proj in projections}
        owned[PACKAGE_ROUTER.format(layer=layer_index)] = row.weight
        if row.bias is not None:
            owned[PACKAGE_BIAS.format(layer=layer_index)] = row.bias
        for name, tensor in owned.items():
            tensors[name] = gather(tensor)
    return tensors


def load_package_into_owner_model(anchor: Anchor, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the owner's training model from the anchor and a package's tensors."""
    layers = len(decoder_layers(anchor.model))
    has_bias = PACKAGE_BIAS.format(layer=0) in tensors
    rows = [tensors[PACKAGE_ROUTER.format(layer=i)][0] for i in range(layers)]
    model = build_owner_model(anchor, rows, has_bias)
    with torch.no_grad():
        for layer_index, layer in enumerate(decoder_layers(model)):
            expert = layer.mlp.experts[OWNER_EXPERT]
            for proj in anchor.family.ffn_projections:
                getattr(expert, proj).weight.copy_(tensors[PACKAGE_FFN.format(layer=layer_index, proj=proj)])
            if has_bias:
                layer.mlp.gate.rows[OWNER_EXPERT].bias.copy_(tensors[PACKAGE_BIAS.format(layer=layer_index)])
    return model


class ClampBias:
    """Projected gradient step: keep the learned bias <= 0 after every update."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def after_optimizer_step(self, step: int) -> None:
        clamp_router_bias(self.model)


def owner_loss(z_loss_coef: float):
    """Language-model loss plus the router z-loss; reports the language-model part."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor):
        logits = model(input_ids=batch[:, :-1]).logits
        lm_loss = causal_lm_loss(logits, batch[:, 1:])
        return lm_loss + z_loss_coef * router_z_loss(model), lm_loss.detach()

    return loss_fn
