"""Every anchor family, on a tiny random model built here: the exactness guarantees hold in its merged format.

For each family: the owner's model at step 0 computes the anchor; transformers' own class for the merged format
(`AutoModelForCausalLM.from_pretrained`) computes what flexolmo's runtime computes, and what the owner trained;
removing an expert equals masking it; removing every owner expert gives back the anchor. Weights, norms and
biases are random and large, so a tensor in the wrong slot or a dropped bias shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim
from safetensors.torch import load_file, save_file

from flexolmo.coordinator.merge import merge, remove_experts
from flexolmo.core.errors import AnchorError, FlexOlmoError
from flexolmo.model.anchor import ANCHOR_FAMILIES, anchor_family, load_anchor
from flexolmo.model.router_init import compute_public_rows
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import build_owner_model, load_package_into_owner_model
from flexolmo.owner.package import load_package

IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
TOLERANCE = 1e-5
SHAPE = dict(vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
# One tiny config per family, each exercising what its mapping must carry: tied embeddings and Llama-3 RoPE
# scaling (Llama, as SmolLM2 ties), q/k/v biases (Qwen2), a head width unlike hidden/heads and per-head q/k norms
# (Qwen3), a window no longer than the context (Mistral).
FAMILY_CONFIGS = {
    "olmo2": dict(),
    "llama": dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(),
    "qwen3": dict(head_dim=12),
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def save_random_dense(model_type: str, out: Path, tokenizer_dir: Path, shape: dict | None = None) -> Path:
    """A random dense transformers model of `model_type` with the test tokenizer (not yet an anchor), of `SHAPE`
    and the family's `FAMILY_CONFIGS`, `shape` overriding either."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexolmo.model.anchor import load_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SHAPE, **FAMILY_CONFIGS[model_type], **(shape or {})})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)  # biases too: transformers initialises them to zero
    model.save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out


def build_family_anchor(model_type: str, out: Path, tokenizer_dir: Path, public: Path,
                        shape: dict | None = None) -> Path:
    """A random dense anchor of `model_type` with the test tokenizer and public router rows (`save_random_dense`)."""
    save_random_dense(model_type, out, tokenizer_dir, shape)
    compute_public_rows(out, [public], seq_len=32, max_sequences=8, text_field="text", device="cpu")
    return out


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_run(request, tmp_path_factory, tiny_anchor, corpora) -> dict:
    """Anchor, two trained expert packages and the merged model of one family."""
    root = tmp_path_factory.mktemp(request.param)
    anchor = build_family_anchor(request.param, root / "anchor", tiny_anchor, corpora["public"])
    packages = {}
    for domain in ("code", "math"):
        packages[domain] = root / domain
        train_expert(ExpertConfig(anchor=anchor, data=[corpora[domain]], name=domain, out=packages[domain],
                                  eval_max_sequences=2, optim=tiny_optim(steps=3, lr=2e-2)))
    merged = root / "merged"
    merge(anchor, list(packages.values()), merged, top_k=2)
    return {"family": request.param, "root": root, "anchor": anchor, "packages": packages, "merged": merged}


def test_owner_model_at_step_zero_is_the_anchor(family_run):
    anchor = load_anchor(family_run["anchor"])
    reference = logits(anchor.model)
    rows = [torch.randn(SHAPE["hidden_size"]) for _ in range(SHAPE["num_hidden_layers"])]
    owner = build_owner_model(anchor, rows, negative_bias=False)
    assert (logits(owner) - reference).abs().max() <= TOLERANCE


def test_transformers_class_of_the_merged_format_equals_the_runtime(family_run):
    from transformers import AutoModelForCausalLM

    family = ANCHOR_FAMILIES[family_run["family"]]
    merged = family_run["merged"]
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == family.moe_model_type and config["norm_topk_prob"] is family.normalize_top_k
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 2 and "rope_theta" in config
    hf, loading = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert type(hf).__name__ == family.moe_architecture
    # Every parameter of the format comes from the checkpoint (vLLM leaves a missing one uninitialised).
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    runtime = load_model(merged)
    assert runtime.expert_names == ["public", "code", "math"]
    assert (logits(hf) - logits(runtime.model)).abs().max() <= TOLERANCE
    state = load_file(merged / "model.safetensors")
    for extra in family.extra_tensors:  # the format's zero tensors: present, non-empty, zero
        tensor = state[extra.template.format(layer=SHAPE["num_hidden_layers"] - 1)]
        assert tensor.numel() > 0 and not tensor.any()


def test_merged_pair_in_transformers_equals_the_owners_training_model(family_run, tmp_path):
    from transformers import AutoModelForCausalLM

    package = family_run["packages"]["code"]
    merge(family_run["anchor"], [package], tmp_path / "pair", top_k=2)
    owner = load_package_into_owner_model(load_anchor(family_run["anchor"]), load_package(package).tensors)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pair")
    assert (logits(hf) - logits(owner)).abs().max() <= TOLERANCE


def test_removing_equals_masking_and_removing_all_is_the_anchor(family_run, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = family_run["merged"]
    remove_experts(merged, ["math"], tmp_path / "removed")
    masked = load_model(merged, exclude=["math"])
    assert (logits(masked.model) - logits(AutoModelForCausalLM.from_pretrained(tmp_path / "removed"))).abs().max() \
        <= TOLERANCE
    remove_experts(merged, ["math", "code"], tmp_path / "public-only")
    anchor = logits(load_anchor(family_run["anchor"]).model)
    assert (logits(load_model(merged, exclude=["math", "code"]).model) - anchor).abs().max() <= TOLERANCE
    public_only = AutoModelForCausalLM.from_pretrained(tmp_path / "public-only")
    assert (logits(public_only) - anchor).abs().max() <= TOLERANCE


def test_a_merge_of_identical_experts_is_the_anchor_at_every_top_k(family_run):
    """Owners trained at top-2 of 2, where the kept routing mass is 1. Whatever the router says, experts that
    equal the anchor's FFN must then give the anchor at every top-k: pre-norm families renormalise the kept
    weights for it, OLMo-2's post-FFN norm cancels the mass."""
    loaded = load_model(family_run["merged"])
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            for expert in list(layer.mlp.experts)[1:]:
                expert.load_state_dict(layer.mlp.experts[0].state_dict())
    anchor = logits(load_anchor(family_run["anchor"]).model)
    # The post-FFN RMSNorm cancels a scale m only up to its eps (m^2 * mean(y^2) + eps): 1e-4, not float rounding.
    tolerance = 1e-4 if ANCHOR_FAMILIES[family_run["family"]].post_norm else TOLERANCE
    for top_k in (1, 2, 3):
        for layer in loaded.model.model.layers:
            layer.mlp.top_k = top_k
        assert (logits(loaded.model) - anchor).abs().max() <= tolerance, f"top-{top_k} of 3"


def test_runtime_refuses_a_merged_checkpoint_whose_format_tensors_or_config_were_altered(family_run, tmp_path):
    family = ANCHOR_FAMILIES[family_run["family"]]
    altered = tmp_path / "altered"
    shutil.copytree(family_run["merged"], altered)
    config = json.loads((altered / "config.json").read_text())
    (altered / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with pytest.raises(FlexOlmoError, match=r"config.json differs .*\(field rms_norm_eps\)"):
        load_model(altered)
    (altered / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 3}))
    assert load_model(altered).model.model.layers[0].mlp.top_k == 3  # top-k is the user's to change
    if not family.extra_tensors:
        return
    state = load_file(altered / "model.safetensors")
    name = family.extra_tensors[-1].template.format(layer=0)
    state[name] = torch.ones_like(state[name])
    save_file(state, altered / "model.safetensors")
    with pytest.raises(AnchorError, match=f"{name} must be all zeros"):
        load_model(altered)


REFUSED = [
    ("mistral", {"sliding_window": 4096, "max_position_embeddings": 32768}, "sliding-window attention is in use"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_position_embeddings": 128},
     "sliding-window attention"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window attention"),
    ("llama", {"attention_bias": True}, "attention_bias is true"),
    ("qwen3", {"attention_bias": True}, "attention_bias is true"),
    ("llama", {"mlp_bias": True}, "mlp_bias is true"),
    ("llama", {"head_dim": 12}, "head_dim 12 differs from hidden_size / num_attention_heads = 8"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    # No sliding_window in config.json: Mistral's default window (4096) applies, and is shorter than the context.
    ("mistral", {"max_position_embeddings": 32768}, "window 4096, context 32768"),
]


@pytest.mark.parametrize(("model_type", "fields", "reason"), REFUSED)
def test_features_a_format_cannot_hold_are_refused_in_one_line(model_type, fields, reason):
    config = {"model_type": model_type, **SHAPE, "hidden_act": "silu", **fields}
    with pytest.raises(AnchorError, match=reason) as error:
        anchor_family(config, "anchor")
    assert "\n" not in str(error.value)
    allowed = {"model_type": model_type, **SHAPE, "hidden_act": "silu", "sliding_window": None}
    assert anchor_family(allowed, "anchor").model_type == model_type


def test_the_papers_baselines_build_on_every_family(family_run, corpora):
    """Dense experts, model soup, BTM and BTX (dense experts merged) assume nothing of OLMo-2."""
    from transformers import AutoModelForCausalLM

    from flexolmo.data.tokens import load_token_stream
    from flexolmo.experiments.baselines import (
        BranchTrainMergeEnsemble,
        dense_expert_package,
        model_soup,
        train_dense_expert,
    )

    root, anchor_dir = family_run["root"], family_run["anchor"]
    dense = [train_dense_expert(anchor_dir, [corpora[d]], root / f"dense-{d}", tiny_optim(steps=2, lr=2e-2))
             for d in ("code", "math")]
    soup = model_soup(anchor_dir, dense, root / "soup")
    members = [load_model(path).model for path in dense]
    averaged = {name: (a + b) / 2 for (name, a), (_, b) in zip(members[0].state_dict().items(),
                                                               members[1].state_dict().items())}
    assert all(torch.allclose(load_model(soup).model.state_dict()[name], value) for name, value in averaged.items())
    btm = BranchTrainMergeEnsemble(members, top_k=2)(input_ids=IDS).logits
    assert torch.isfinite(btm).all() and btm.shape == logits(members[0]).shape
    anchor = load_anchor(anchor_dir)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer, "all")
    dense_expert_package(anchor, dense[0], stream, "code", root / "btx-code", "mean_hidden", 32, 4, 0)
    merge(anchor_dir, [root / "btx-code"], root / "btx", top_k=2)
    assert (logits(AutoModelForCausalLM.from_pretrained(root / "btx")) - logits(load_model(root / "btx").model)) \
        .abs().max() <= TOLERANCE


def test_fields_an_anchor_config_leaves_out_take_the_anchor_familys_defaults(tiny_anchor, tmp_path):
    """An OLMo-2 config.json without rope_parameters means theta 1e4; flex_olmo's own default is 5e5."""
    from transformers import AutoModelForCausalLM

    terse = tmp_path / "terse-anchor"
    shutil.copytree(tiny_anchor, terse)
    config = json.loads((terse / "config.json").read_text())
    assert config.pop("rope_parameters")["rope_theta"] == 10000.0
    (terse / "config.json").write_text(json.dumps(config))
    merge(terse, [], tmp_path / "merged", top_k=1)
    reference = logits(load_anchor(terse).model)
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - reference).abs().max() <= TOLERANCE
    assert (logits(load_model(tmp_path / "merged").model) - reference).abs().max() <= TOLERANCE


def test_dp_expert_trains_and_merges_on_every_family(family_run, corpora):
    """DP-SGD wraps only the FlexOlmo block's linear layers, so any family's attention is no concern to Opacus."""
    from flexolmo.owner.privacy import DPConfig

    package = family_run["root"] / "code-dp"
    manifest = train_expert(ExpertConfig(anchor=family_run["anchor"], data=[corpora["code"]], name="code-dp",
                                         out=package, eval_max_sequences=2, dp=DPConfig(epsilon=8.0, delta=1e-4),
                                         optim=tiny_optim(steps=2, batch_size=8)))
    assert manifest["privacy"]["dp"]["epsilon"] <= 8.0 + 1e-6
    merge(family_run["anchor"], [package], family_run["root"] / "dp-merged", top_k=1)
    assert load_model(family_run["root"] / "dp-merged").expert_names == ["public", "code-dp"]
