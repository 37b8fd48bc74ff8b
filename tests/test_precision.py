"""Mixed precision: bf16 compute with float32 master weights, and what merging does to dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim

from flexolmo.coordinator.merge import merge
from flexolmo.core.tensor_io import LazyReader
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import score_stream
from flexolmo.model.anchor import load_anchor
from flexolmo.model.router_init import initial_rows
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import (
    build_owner_model,
    load_package_into_owner_model,
    owner_loss,
    owner_trainable_parameters,
)
from flexolmo.owner.package import load_package
from flexolmo.training.loop import train

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_bf16_training_keeps_float32_master_weights_so_a_small_update_lands(tiny_anchor, corpora, tmp_path):
    anchor = load_anchor(tiny_anchor, dtype=torch.bfloat16)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    model = build_owner_model(anchor, initial_rows("mean_hidden", anchor, stream, 32, 8, 0), False)
    trainable = owner_trainable_parameters(model)
    before = {name: param.detach().float().clone() for name, param in trainable}
    # One step at lr 1e-4: Adam moves each weight by about 1e-4, below half of bf16's spacing at these
    # magnitudes, so bf16 weights updated in place kept 54% of an expert's weights bit-unchanged.
    train(model, trainable, stream, tiny_optim(steps=1, lr=1e-4, warmup_steps=0, dtype="bfloat16",
                                               checkpoint_every=1), tmp_path, loss_fn=owner_loss(1e-3))
    changed = total = 0
    for name, param in trainable:
        assert param.dtype == torch.float32, name
        changed += int((param.detach() != before[name]).sum())
        total += param.numel()
    assert changed / total > 0.99
    frozen = [param for param in model.parameters() if not param.requires_grad]
    assert frozen and all(param.dtype == torch.bfloat16 for param in frozen)
    optimizer = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer["state"].values())


@pytest.fixture(scope="module")
def bf16_anchor(tmp_path_factory, corpora) -> Path:
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("bf16") / "anchor"
    pretrain(PretrainConfig(data=[corpora["public"]], out=out, save_dtype="bfloat16",
                            shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                              intermediate_size=64, max_position_embeddings=128),
                            optim=tiny_optim(steps=20)))
    return out


@pytest.fixture(scope="module")
def bf16_package(bf16_anchor, corpora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf16-expert") / "code"
    train_expert(ExpertConfig(anchor=bf16_anchor, data=[corpora["code"]], name="code", out=out,
                              eval_max_sequences=16, optim=tiny_optim(steps=8, lr=2e-2)))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def test_default_merge_keeps_the_anchor_dtype_and_is_the_owners_model_in_it(bf16_anchor, bf16_package, corpora,
                                                                           tmp_path):
    package = load_package(bf16_package)
    training = package.manifest["training"]
    assert training["heldout_dtype"] == "bfloat16"
    assert all(tensor.dtype == torch.float32 for tensor in package.tensors.values())  # the master weights
    metadata = merge(bf16_anchor, [bf16_package], tmp_path / "merged", top_k=2)
    assert metadata["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    reader = LazyReader(tmp_path / "merged")
    assert {reader.dtype(name) for name in reader.names()} == {torch.bfloat16}
    merged = load_model(tmp_path / "merged", dtype=torch.bfloat16).model
    owner = load_package_into_owner_model(load_anchor(bf16_anchor, dtype=torch.bfloat16), package.tensors)
    # The weights are bit-identical (above); the two model builds may sum in another order (measured 3.6e-7).
    assert (logits(merged) - logits(owner)).abs().max() < 1e-5
    # The package's held-out number is the merged model's.
    heldout = load_token_stream([corpora["code"]], load_anchor(bf16_anchor, with_model=False).tokenizer, "heldout")
    score = score_stream(merged, heldout, 32, max_sequences=16)
    assert score.loss == pytest.approx(training["heldout_loss_after"], abs=1e-6)


def test_float32_merge_keeps_the_expert_exact_and_differs_from_the_bf16_merge(bf16_anchor, bf16_package,
                                                                             tmp_path):
    package = load_package(bf16_package)
    assert merge(bf16_anchor, [bf16_package], tmp_path / "f32", top_k=2, dtype="float32")["dtype"] == "float32"
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    reader = LazyReader(tmp_path / "f32")
    assert torch.equal(reader.get("model.layers.1.mlp.experts.1.up_proj.weight"),
                       package.tensors["layers.1.up_proj.weight"])
    anchor = LazyReader(bf16_anchor)
    assert torch.equal(reader.get("model.embed_tokens.weight"), anchor.get("model.embed_tokens.weight").float())
    merged = load_model(tmp_path / "f32", dtype=torch.float32).model
    owner = load_package_into_owner_model(load_anchor(bf16_anchor, dtype=torch.float32), package.tensors)
    # The weights are bit-identical (above); the two model builds may sum in another order (measured 3.6e-7).
    assert (logits(merged) - logits(owner)).abs().max() < 1e-5
    merge(bf16_anchor, [bf16_package], tmp_path / "bf16", top_k=2)
    rounded = load_model(tmp_path / "bf16", dtype=torch.bfloat16).model
    assert (logits(merged) - logits(rounded)).abs().max() > 1e-3  # what every float32-only test cannot see
