"""The per-row expert mask: one batch of rows with different masks computes what each row computes alone."""

from __future__ import annotations

import copy

import pytest
import torch

from flexolmo.model.anchor import load_anchor
from flexolmo.model.moe import convert_to_moe, decoder_layers, row_masks, set_active_experts

MASKS = [[True, True, True, True], [True, False, True, False], [True, False, False, False],
         [True, True, False, True]]


@pytest.fixture(scope="module")
def model(tiny_anchor):
    anchor = load_anchor(tiny_anchor).model
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(4, anchor.config.hidden_size, generator=generator) for _ in decoder_layers(anchor)]
    moe = convert_to_moe(copy.deepcopy(anchor), rows, 4, top_k=2).eval()
    with torch.no_grad():
        for layer in decoder_layers(moe):
            for expert in list(layer.mlp.experts)[1:]:
                for param in expert.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return moe


def solo(model, ids, mask):
    set_active_experts(model, mask)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        set_active_experts(model, [True] * len(mask))


@pytest.mark.parametrize("tokens", [1, 12])
def test_a_batch_of_rows_with_different_masks_equals_each_row_alone(model, tokens):
    ids = torch.randint(0, 300, (len(MASKS), tokens), generator=torch.Generator().manual_seed(1))
    sink: list[torch.Tensor] = []
    with torch.no_grad(), row_masks(model, torch.tensor(MASKS), sink):
        batched = model(ids).logits
    for row, mask in enumerate(MASKS):
        alone = solo(model, ids[row : row + 1], mask)
        assert (batched[row] - alone[0]).abs().max() <= 1e-5
        assert torch.equal(batched[row].argmax(-1), alone[0].argmax(-1))
    kept = torch.stack(sink)  # (layers, batch, seq, E)
    masked = ~torch.tensor(MASKS)[None, :, None, :].expand_as(kept)
    assert (kept[masked] == 0).all()  # a masked expert never gets weight in its row
    assert ((kept > 0).sum(-1) <= 2).all()  # top-2, capped per row at the experts allowed
    assert ((kept[:, 2] > 0).sum(-1) == 1).all()  # the public-only row keeps its one expert


def test_a_row_mask_equals_the_whole_model_exclusion_when_every_row_shares_it(model):
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = [True, False, True, True]
    with torch.no_grad(), row_masks(model, torch.tensor([mask, mask])):
        batched = model(ids).logits
    assert (batched - solo(model, ids, mask)).abs().max() <= 1e-6


def test_a_row_without_any_expert_is_refused(model):
    with pytest.raises(ValueError, match="at least one expert"), row_masks(model, torch.zeros(1, 4, dtype=torch.bool)):
        pass
