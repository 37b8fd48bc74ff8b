"""Merge, late joiners, opt-out and the runtime: the exactness guarantees of the coordinator's side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim
from safetensors.torch import load_file

from flexolmo.coordinator.merge import add_experts, merge, remove_experts
from flexolmo.core.errors import FlexOlmoError, MergeError, PackageError
from flexolmo.model.anchor import load_anchor
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import load_package_into_owner_model
from flexolmo.owner.package import TENSOR_FILE, load_package

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def packages(tmp_path_factory, tiny_anchor, corpora) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    out = {}
    for domain in ("code", "math"):
        out[domain] = root / domain
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora[domain]], name=domain, out=out[domain],
                                  optim=tiny_optim(steps=8, lr=2e-2)))
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def load_merged_state(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_merge_without_owner_experts_is_the_anchor(tiny_anchor, tmp_path):
    from transformers import AutoModelForCausalLM

    merge(tiny_anchor, [], tmp_path / "public-only", top_k=1)
    anchor = logits(load_anchor(tiny_anchor).model)
    assert (logits(load_model(tmp_path / "public-only").model) - anchor).abs().max() <= 1e-5
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "public-only")) - anchor).abs().max() <= 1e-5


def test_merged_pair_equals_the_owners_training_model(tiny_anchor, packages, tmp_path):
    merge(tiny_anchor, [packages["code"]], tmp_path / "pair", top_k=2)
    owner = load_package_into_owner_model(load_anchor(tiny_anchor), load_package(packages["code"]).tensors)
    assert (logits(load_model(tmp_path / "pair").model) - logits(owner)).abs().max() <= 1e-5


def test_transformers_loads_what_we_write_and_agrees_with_our_runtime(tiny_anchor, packages, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    merge(tiny_anchor, list(packages.values()), out, top_k=2)
    config = json.loads((out / "config.json").read_text())
    anchor_config = json.loads((tiny_anchor / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["num_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert config["norm_topk_prob"] is False and config["rope_theta"] == anchor_config["rope_parameters"]["rope_theta"]
    for key in ("rms_norm_eps", "rope_parameters", "hidden_size", "vocab_size", "eos_token_id"):
        assert config[key] == anchor_config[key]
    names = load_merged_state(out)
    assert "model.layers.0.mlp.experts.2.down_proj.weight" in names
    assert names["model.layers.1.mlp.gate.weight"].shape[0] == 3
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "FlexOlmoForCausalLM"
    AutoTokenizer.from_pretrained(out)
    assert (logits(hf) - logits(load_model(out).model)).abs().max() <= 1e-5
    anchor_state = load_file(tiny_anchor / "model.safetensors")
    for name, tensor in anchor_state.items():
        if ".mlp." not in name:
            assert torch.equal(names[name], tensor), f"{name} is not bit-identical to the anchor"


def test_merge_then_add_equals_merging_all_at_once(tiny_anchor, packages, tmp_path):
    merge(tiny_anchor, [packages["code"], packages["math"]], tmp_path / "all", top_k=2)
    merge(tiny_anchor, [packages["code"]], tmp_path / "first", top_k=2)
    add_experts(tmp_path / "first", [packages["math"]], tmp_path / "added")
    together, added = load_merged_state(tmp_path / "all"), load_merged_state(tmp_path / "added")
    assert together.keys() == added.keys()
    assert all(torch.equal(together[name], added[name]) for name in together)
    assert json.loads((tmp_path / "all" / "config.json").read_text()) == \
        json.loads((tmp_path / "added" / "config.json").read_text())


def test_removing_equals_masking_and_top_k_is_capped(tiny_anchor, packages, tmp_path):
    merge(tiny_anchor, list(packages.values()), tmp_path / "merged", top_k=2)
    remove_experts(tmp_path / "merged", ["math"], tmp_path / "removed")
    masked = load_model(tmp_path / "merged", exclude=["math"])
    removed = load_model(tmp_path / "removed")
    assert removed.expert_names == ["public", "code"]
    assert (logits(masked.model) - logits(removed.model)).abs().max() <= 1e-5
    remove_experts(tmp_path / "merged", ["math", "code"], tmp_path / "public-only")
    only_public = load_model(tmp_path / "merged", exclude=["math", "code"])
    assert (logits(only_public.model) - logits(load_anchor(tiny_anchor).model)).abs().max() <= 1e-5


def test_removing_the_first_middle_or_last_expert_equals_masking_it_and_merging_without_it(
        tiny_anchor, packages, corpora, tmp_path):
    """Opt-out of any slot, not only the last: the kept experts move down one slot, and each must bring its
    own FFN and router row. Checked three ways: masking in our runtime, transformers' own loading of the
    smaller checkpoint, and a merge of the kept packages from scratch (which renumbers nothing)."""
    from transformers import AutoModelForCausalLM

    prose = tmp_path / "prose"
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["public"]], name="prose", out=prose,
                              eval_max_sequences=4, optim=tiny_optim(steps=4, lr=2e-2)))
    sources = {"code": packages["code"], "math": packages["math"], "prose": prose}
    merge(tiny_anchor, list(sources.values()), tmp_path / "merged", top_k=2)
    for name in sources:  # slots 1, 2 and 3
        out = tmp_path / f"without-{name}"
        remove_experts(tmp_path / "merged", [name], out)
        kept = [other for other in sources if other != name]
        removed = load_model(out)
        assert removed.expert_names == ["public", *kept]
        expected = logits(load_model(tmp_path / "merged", exclude=[name]).model)
        assert (logits(removed.model) - expected).abs().max() <= 1e-5, name
        assert (logits(AutoModelForCausalLM.from_pretrained(out)) - expected).abs().max() <= 1e-5, name
        merge(tiny_anchor, [sources[other] for other in kept], tmp_path / f"only-{name}", top_k=2)
        direct, written = load_merged_state(tmp_path / f"only-{name}"), load_merged_state(out)
        assert direct.keys() == written.keys(), name
        assert all(torch.equal(direct[key], written[key]) for key in direct), name


def test_sharded_output_equals_single_file(tiny_anchor, packages, tmp_path):
    merge(tiny_anchor, [packages["code"]], tmp_path / "single", top_k=2)
    merge(tiny_anchor, [packages["code"]], tmp_path / "sharded", top_k=2, shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    single, sharded = load_merged_state(tmp_path / "single"), load_merged_state(tmp_path / "sharded")
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    from transformers import AutoModelForCausalLM

    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")) -
            logits(load_model(tmp_path / "single").model)).abs().max() <= 1e-5


def test_bad_inputs_stop_the_merge_and_leave_nothing(tiny_anchor, packages, corpora, tmp_path):
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain

    out = tmp_path / "out"
    with pytest.raises(MergeError, match="two experts are named 'code'"):
        merge(tiny_anchor, [packages["code"], packages["code"]], out, top_k=2)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(packages["code"], corrupt)
    payload = (corrupt / TENSOR_FILE).read_bytes()
    (corrupt / TENSOR_FILE).write_bytes(payload[:-64])
    with pytest.raises(PackageError, match="truncated or corrupt"):
        merge(tiny_anchor, [packages["math"], corrupt], out, top_k=2)
    other = tmp_path / "other-anchor"
    pretrain(PretrainConfig(data=[corpora["public"]], out=other, optim=tiny_optim(steps=2, seed=9),
                            shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                              intermediate_size=64)))
    with pytest.raises(PackageError, match="trained on another anchor"):
        merge(other, [packages["code"]], out, top_k=2)
    merge(other, [], tmp_path / "other-merged", top_k=1)
    with pytest.raises(PackageError, match="trained on another anchor"):
        add_experts(tmp_path / "other-merged", [packages["code"]], out)
    with pytest.raises(MergeError, match="has no expert"):
        remove_experts(tmp_path / "other-merged", ["nobody"], out)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_merge_generate_and_exclude(tiny_anchor, packages, tmp_path, capsys):
    from flexolmo.cli import main

    out = tmp_path / "cli-merged"
    # The tiny test experts are far worse than the anchor on public text: admit them with loose limits.
    assert main(["merge", "--anchor", str(tiny_anchor), "--packages", str(packages["code"]), "--top-k", "2",
                 "--out", str(out), "--max-public-top-share", "1", "--max-public-bpb-increase", "10"]) == 0
    capsys.readouterr()
    generate = ["generate", "--prompt", "the river", "--max-new-tokens", "8"]
    assert main([*generate, "--model", str(out), "--exclude", "code"]) == 0
    without_code = capsys.readouterr().out
    assert main([*generate, "--model", str(tiny_anchor)]) == 0
    # With its only owner expert excluded, the merged model is the anchor: the same greedy continuation.
    assert without_code == capsys.readouterr().out
    assert without_code.startswith("prompt:\nthe river\ncontinuation:")
    assert main(["generate", "--model", str(out), "--prompt", "the river", "--exclude", "nobody"]) == 1
    assert "has no expert(s) nobody" in capsys.readouterr().err
    with pytest.raises(FlexOlmoError):
        load_model(tiny_anchor, exclude=["code"])


def test_cli_add_with_top_k_and_remove_and_the_record_of_experts(tiny_anchor, packages, tmp_path, capsys):
    from flexolmo.cli import main
    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.model.anchor import compute_fingerprint
    from flexolmo.model.merged_format import MERGED_METADATA_FILE
    from flexolmo.trust.record import read_slot_digest

    loose = ["--max-public-top-share", "1", "--max-public-bpb-increase", "10"]  # tiny experts: loose limits
    merge(tiny_anchor, [packages["code"]], tmp_path / "v1", top_k=1)
    assert main(["add", "--model", str(tmp_path / "v1"), "--packages", str(packages["math"]), "--top-k", "3",
                 "--out", str(tmp_path / "v2"), *loose]) == 0
    config = json.loads((tmp_path / "v2" / "config.json").read_text())
    record = json.loads((tmp_path / "v2" / MERGED_METADATA_FILE).read_text())
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == record["top_k"] == 3
    assert record["anchor"]["fingerprint"] == compute_fingerprint(tiny_anchor)
    assert [entry["name"] for entry in record["experts"]] == ["public", "code", "math"]
    assert record["experts"][0]["source"] == "anchor" and "manifest" not in record["experts"][0]
    for name, entry in zip(("code", "math"), record["experts"][1:]):
        package = load_package(packages[name])
        assert entry["source"] == "package" and entry["signer"] is None
        assert entry["package_sha256"] == package.digest and entry["manifest"] == package.manifest
    reader = LazyReader(tmp_path / "v2")
    for index, entry in enumerate(record["experts"]):  # each slot digest names the weights in its slot
        projections = ("gate_proj", "up_proj", "down_proj")
        assert entry["slot_sha256"] == read_slot_digest(reader, index, entry["name"], 2, projections)
    merge(tiny_anchor, [packages["code"], packages["math"]], tmp_path / "all", top_k=3)
    assert torch.equal(logits(load_model(tmp_path / "v2").model), logits(load_model(tmp_path / "all").model))

    assert main(["add", "--model", str(tmp_path / "v2"), "--packages", str(packages["code"]), "--out",
                 str(tmp_path / "clash"), *loose]) == 1
    assert "already has expert(s) code" in capsys.readouterr().err and not (tmp_path / "clash").exists()
    assert main(["remove", "--model", str(tmp_path / "v2"), "--exclude", "public", "--out",
                 str(tmp_path / "no-public")]) == 1
    assert "'public' expert is the anchor's own FFN and cannot be removed" in capsys.readouterr().err
    assert not (tmp_path / "no-public").exists()
    assert main(["remove", "--model", str(tmp_path / "v2"), "--exclude", "code", "--out",
                 str(tmp_path / "v3")]) == 0
    removed = load_model(tmp_path / "v3")
    assert removed.expert_names == ["public", "math"] and removed.record["top_k"] == 2  # lowered to 2 left
    masked = load_model(tmp_path / "v2", exclude=["code"])
    assert (logits(removed.model) - logits(masked.model)).abs().max() <= 1e-5


def test_runtime_names_a_merged_checkpoint_whose_tensors_do_not_fit_its_config(tiny_anchor, packages, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "merged"
    merge(tiny_anchor, [packages["code"]], out, top_k=2)
    (weights,) = out.glob("*.safetensors")
    state = load_file(weights)
    dropped = state.pop("model.layers.1.mlp.experts.1.up_proj.weight")
    save_file(state, weights)
    with pytest.raises(FlexOlmoError, match="missing .*experts.1.up_proj"):
        load_model(out)
    state["model.layers.1.mlp.experts.1.up_proj.weight"] = dropped[:, :-1].contiguous()
    save_file(state, weights)
    with pytest.raises(FlexOlmoError, match="experts.1.up_proj.weight has shape"):
        load_model(out)
