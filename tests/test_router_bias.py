"""The owners' negative router bias: kept by the merge beside the checkpoint, applied only by flexolmo's runtime."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_optim

from flexolmo.coordinator.inspection import describe
from flexolmo.coordinator.merge import merge, remove_experts
from flexolmo.core.errors import MergeError, PackageError
from flexolmo.model.anchor import load_anchor
from flexolmo.model.merged_format import MERGED_METADATA_FILE, read_merged_info
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import load_package_into_owner_model
from flexolmo.owner.package import load_package, write_package

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
BIAS = [-0.75, -1.5]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_merge_keeps_the_bias_and_the_runtime_applies_it_on_request(tiny_anchor, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=tmp_path / "trained",
                              negative_bias=True, optim=tiny_optim(steps=4, lr=2e-2)))
    # The same expert with a bias far from zero, so that applying it or not visibly changes the outputs.
    package = load_package(tmp_path / "trained")
    tensors = {**package.tensors, **{f"layers.{i}.router.bias": torch.tensor([b]) for i, b in enumerate(BIAS)}}
    fields = {k: v for k, v in package.manifest.items() if k not in ("format", "format_version", "name", "tensors",
                                                                    "tensors_sha256", "file_sha256")}
    write_package(tmp_path / "code", "code", tensors, fields)
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["math"]], name="math", out=tmp_path / "math",
                              optim=tiny_optim(steps=4, lr=2e-2)))

    merge(tiny_anchor, [tmp_path / "code"], tmp_path / "pair", top_k=2)
    metadata = json.loads((tmp_path / "pair" / MERGED_METADATA_FILE).read_text())
    assert metadata["router_bias_dropped"] == ["code"] and metadata["experts"][1]["router_bias"] == BIAS
    assert load_model(tmp_path / "pair", router_bias=True).biased_experts == ["code"]
    assert dict(describe(tmp_path / "pair").fields)["router biases"] == \
        "code -1.12 (mean over layers; transformers drops them, --router-bias applies them)"
    assert load_model(tmp_path / "pair").biased_experts == []
    owner = load_package_into_owner_model(load_anchor(tiny_anchor), load_package(tmp_path / "code").tensors)
    with_bias = load_model(tmp_path / "pair", router_bias=True)
    without = load_model(tmp_path / "pair")
    # With the bias the merged pair is exactly the owner's training model; without it, what transformers computes.
    assert (logits(with_bias.model) - logits(owner)).abs().max() <= 1e-5
    assert (logits(without.model) - logits(owner)).abs().max() > 1e-3
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pair")
    assert (logits(hf) - logits(without.model)).abs().max() <= 1e-5

    # The record follows its expert through add and remove, and leaves with it.
    merge(tiny_anchor, [tmp_path / "math", tmp_path / "code"], tmp_path / "three", top_k=2)
    remove_experts(tmp_path / "three", ["math"], tmp_path / "code-left")
    assert (logits(load_model(tmp_path / "code-left", router_bias=True).model) -
            logits(load_model(tmp_path / "three", router_bias=True, exclude=["math"]).model)).abs().max() <= 1e-5
    remove_experts(tmp_path / "three", ["code"], tmp_path / "math-left")
    left = json.loads((tmp_path / "math-left" / MERGED_METADATA_FILE).read_text())
    assert left["router_bias_dropped"] == [] and all("router_bias" not in e for e in left["experts"])


def test_the_bias_starts_where_the_owner_asks_and_trains_from_there(tiny_anchor, corpora, tmp_path):
    starts = {0.0: tmp_path / "at-zero", -2.0: tmp_path / "below"}
    for start, out in starts.items():
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out, negative_bias=True,
                                  negative_bias_start=start, optim=tiny_optim(steps=4, lr=2e-2)))
        biases = [value for name, value in load_package(out).tensors.items() if name.endswith("router.bias")]
        assert biases and all(value.item() <= 0 for value in biases)
        # A few router steps move it by hundredths: it is still near where it started, and it did train.
        assert all(abs(value.item() - start) < 0.1 for value in biases), (start, biases)
        assert any(value.item() != start for value in biases)
    with pytest.raises(PackageError, match="add --negative-bias"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=tmp_path / "no",
                                  negative_bias_start=-1.0, optim=tiny_optim(steps=4, lr=2e-2)))


def test_a_positive_router_bias_is_refused_in_a_package_and_in_a_merged_record(tiny_anchor, corpora, tmp_path):
    """Training keeps the bias <= 0, so it can only lower its own expert's share; a positive one would take
    routing weight, and the credit paid by it, from every other expert wherever the kept biases are applied."""
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=tmp_path / "trained",
                              negative_bias=True, optim=tiny_optim(steps=2, lr=2e-2)))
    package = load_package(tmp_path / "trained")
    fields = {k: v for k, v in package.manifest.items() if k not in ("format", "format_version", "name", "tensors",
                                                                    "tensors_sha256", "file_sha256")}
    forged = {**package.tensors, "layers.1.router.bias": torch.tensor([0.5])}
    write_package(tmp_path / "forged", "code", forged, fields)
    with pytest.raises(PackageError, match=r"layers.1.router.bias is a positive router bias \(0.5\)"):
        load_package(tmp_path / "forged")

    merge(tiny_anchor, [tmp_path / "trained"], tmp_path / "merged", top_k=2)
    record_file = tmp_path / "merged" / MERGED_METADATA_FILE
    record = json.loads(record_file.read_text())
    for bias in ([0.5, -1.0], [-1.0], [-1.0, float("nan")], ["-1", -1.0]):
        record["experts"][1]["router_bias"] = bias
        record_file.write_text(json.dumps(record))
        with pytest.raises(MergeError, match="expert slot 1's 'router_bias' is not one value <= 0 per layer"):
            read_merged_info(tmp_path / "merged")
