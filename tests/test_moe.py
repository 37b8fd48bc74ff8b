"""The MoE block: surgery parity with the dense anchor, masking equals removal, dispatch equals dense."""

from __future__ import annotations

import copy

import pytest
import torch

from flexolmo.model.anchor import load_anchor
from flexolmo.model.moe import FlexMoEBlock, convert_to_moe, decoder_layers, set_active_experts


@pytest.fixture
def anchor(tiny_anchor):
    return load_anchor(tiny_anchor)


def random_rows(model, experts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    return [torch.randn(experts, hidden, generator=generator) for _ in decoder_layers(model)]


def perturb_experts(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for expert in list(layer.mlp.experts)[1:]:
                for param in expert.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_identical_experts_with_all_selected_equal_the_anchor(anchor):
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        dense = anchor.model(ids).logits
        moe = convert_to_moe(copy.deepcopy(anchor.model), random_rows(anchor.model, 3), 3, top_k=3)
        assert (moe(ids).logits - dense).abs().max() <= 1e-5


@pytest.mark.parametrize("normalize", [False, True])
def test_masking_equals_removal(anchor, normalize):
    ids = torch.randint(0, 300, (2, 24))
    rows = random_rows(anchor.model, 4)
    full = convert_to_moe(copy.deepcopy(anchor.model), rows, 4, top_k=2, normalize_top_k=normalize)
    perturb_experts(full)
    set_active_experts(full, [True, False, True, True])
    removed = copy.deepcopy(full)
    for layer in decoder_layers(removed):
        block = layer.mlp
        keep = [0, 2, 3]
        block.experts = torch.nn.ModuleList(block.experts[i] for i in keep)
        block.gate.rows = torch.nn.ModuleList(block.gate.rows[i] for i in keep)
        block.active = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, removed(ids).logits, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_top_k_is_capped_by_active_experts_and_renormalised_only_when_set(anchor, normalize):
    block = decoder_layers(convert_to_moe(copy.deepcopy(anchor.model), random_rows(anchor.model, 3), 3, 2,
                                          normalize_top_k=normalize))[0].mlp
    hidden = torch.randn(2, 5, anchor.model.config.hidden_size) * 0.05  # small logits: a flat softmax
    weights, logits, kept_mass = block.route(hidden)
    probs = torch.softmax(logits, -1)
    kept = weights > 0
    assert (kept.sum(-1) == 2).all()
    assert torch.allclose(kept_mass, (probs * kept).sum(-1)) and (kept_mass < 0.95).all()
    expected = probs / kept_mass.unsqueeze(-1) if normalize else probs  # the kept probabilities, rescaled or not
    assert torch.allclose(weights[kept], expected[kept])
    block.active.copy_(torch.tensor([True, False, False]))
    weights, _, kept_mass = block.route(hidden)
    assert torch.equal(weights[..., 0], torch.ones(2, 5)) and weights[..., 1:].abs().sum() == 0
    assert torch.equal(kept_mass, torch.ones(2, 5))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (2, 1), (2, 3), (2, 40)])
def test_grouped_dispatch_equals_dense_weighted_sum(anchor, batch, tokens, normalize):
    """Each expert on its own tokens gives the weighted sum of every expert's output with zeros outside the top-k,
    for a single decoded token as for a long batch, and with an expert masked."""
    model = convert_to_moe(copy.deepcopy(anchor.model), random_rows(anchor.model, 4), 4, top_k=2,
                           normalize_top_k=normalize)
    perturb_experts(model)
    block: FlexMoEBlock = decoder_layers(model)[0].mlp
    hidden = torch.randn(batch, tokens, anchor.model.config.hidden_size)
    with torch.no_grad():
        for active in ([True] * 4, [True, True, False, True]):
            block.active.copy_(torch.tensor(active))
            weights = block.route(hidden).weights
            expected = sum(weights[..., e : e + 1] * expert(hidden) for e, expert in enumerate(block.experts))
            assert ((weights > 0).sum(-1) == 2).all()
            assert active[2] or (weights[..., 2] == 0).all()  # a masked expert gets no token
            assert torch.allclose(block(hidden), expected, atol=1e-6)


def test_the_router_gives_the_same_logits_in_training_and_at_inference(anchor):
    """Training calls each row's nn.Linear (for Opacus' per-sample gradients), inference one stacked matmul."""
    model = convert_to_moe(copy.deepcopy(anchor.model), random_rows(anchor.model, 3), 3, top_k=2,
                           bias_experts=[2])
    router = decoder_layers(model)[0].mlp.gate
    with torch.no_grad():
        router.rows[2].bias.fill_(-0.5)
    hidden = torch.randn(2, 5, anchor.model.config.hidden_size)
    with torch.no_grad():
        training = router.train()(hidden)
        inference = router.eval()(hidden)
    assert torch.allclose(training, inference, atol=1e-6) and (training[..., 2] != 0).all()


def test_routing_shares_count_each_tokens_top_k_and_sum_to_k_per_layer(anchor, corpora, tmp_path):
    """The shares evaluation reports, against a count made here from each layer's router input: the top-2 of
    the softmax over the active experts, per token. Every layer's shares sum to top-k; a masked expert has
    0. The kept routing mass (mean and 5th percentile per layer) against the same recount."""
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.evaluation.scoring import score_stream

    model = convert_to_moe(copy.deepcopy(anchor.model), random_rows(anchor.model, 4), 4, top_k=2).eval()
    perturb_experts(model)
    active = torch.tensor([True, True, False, True])
    set_active_experts(model, active.tolist())
    stream = load_token_stream([corpora["code"]], anchor.tokenizer, split="all", cache_dir=tmp_path / "cache")
    inputs = {index: [] for index in range(2)}
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=index: inputs[i].append(args[0]))
               for index, layer in enumerate(decoder_layers(model))]
    score = score_stream(model, stream, seq_len=16, batch_size=2, max_sequences=5, expert_names="pabc")
    for handle in handles:
        handle.remove()
    shares = score.routing["per_layer_share"]
    for index, layer in enumerate(decoder_layers(model)):
        hidden = torch.cat([batch.reshape(-1, batch.shape[-1]) for batch in inputs[index]])
        logits = (hidden @ layer.mlp.gate.weight().T).masked_fill(~active, float("-inf"))
        kept, chosen = torch.softmax(logits, -1).topk(2, dim=-1)
        expected = torch.bincount(chosen.reshape(-1), minlength=4).float() / len(hidden)
        assert len(hidden) == 5 * 16
        mass = kept.sum(-1).double().detach()
        assert score.routing["kept_mass"]["per_layer_mean"][index] == pytest.approx(float(mass.mean()), abs=1e-6)
        # The 5th percentile to the histogram's 1/1000 resolution.
        assert score.routing["kept_mass"]["per_layer_p5"][index] == pytest.approx(
            float(mass.sort().values[int(0.05 * len(mass))]), abs=2e-3)
        assert list(shares[index].values()) == pytest.approx(expected.tolist(), abs=1e-6)
        assert sum(shares[index].values()) == pytest.approx(2.0) and shares[index]["b"] == 0
    assert sum(score.routing["mean_share"].values()) == pytest.approx(2.0)
