"""Anchor pretraining and loading: transformers round trip, validation, fingerprint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flexolmo.core.errors import AnchorError
from flexolmo.model.anchor import compute_fingerprint, load_anchor


def test_pretrained_anchor_loads_in_transformers_as_is(tiny_anchor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_anchor)
    tokenizer = AutoTokenizer.from_pretrained(tiny_anchor)
    assert type(model).__name__ == "Olmo2ForCausalLM"
    ids = tokenizer("the history of the river", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "the history of the river"
    anchor = load_anchor(tiny_anchor)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, anchor.model(ids).logits)
    summary = json.loads((tiny_anchor / "flexolmo_pretrain.json").read_text())
    assert summary["heldout"]["bits_per_byte"] > 0
    assert summary["final_train_loss"] < 5.5  # it learned something: uniform over 400 tokens is 6.0


def test_fingerprint_is_stable_and_sensitive(tiny_anchor, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_anchor, copy)
    assert compute_fingerprint(copy) == compute_fingerprint(tiny_anchor)
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert compute_fingerprint(copy) != compute_fingerprint(tiny_anchor)


def test_fingerprint_covers_the_config_and_the_public_router_rows(tiny_anchor, tmp_path):
    from flexolmo.model.anchor import PUBLIC_ROUTER_FILE
    from flexolmo.model.router_init import load_public_rows, save_public_rows

    reference = compute_fingerprint(tiny_anchor)
    config_changed = tmp_path / "config"
    shutil.copytree(tiny_anchor, config_changed)
    config = json.loads((config_changed / "config.json").read_text())
    changed = {**config, "rms_norm_eps": config["rms_norm_eps"] * 2}
    (config_changed / "config.json").write_text(json.dumps(changed))
    assert compute_fingerprint(config_changed) != reference
    rows_changed = tmp_path / "rows"
    shutil.copytree(tiny_anchor, rows_changed)
    rows = load_public_rows(rows_changed, config["num_hidden_layers"])
    rows[1] = rows[1].clone()
    rows[1][0] += 1e-3
    save_public_rows(rows_changed, rows)
    assert compute_fingerprint(rows_changed) != reference
    (rows_changed / PUBLIC_ROUTER_FILE).unlink()
    assert compute_fingerprint(rows_changed) != reference


def test_anchor_errors_are_one_line(tiny_anchor, tmp_path):
    with pytest.raises(AnchorError, match="no such directory"):
        load_anchor(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnchorError, match="no config.json"):
        load_anchor(tmp_path / "empty")
    foreign = tmp_path / "gpt2"
    shutil.copytree(tiny_anchor, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(AnchorError, match="'gpt2' is not supported as an anchor "
                                          "\\(supported: llama, mistral, olmo2, qwen2, qwen3\\)"):
        load_anchor(foreign)
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "flex_olmo"}))
    with pytest.raises(AnchorError, match="merged FlexOlmo model"):
        load_anchor(foreign)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_anchor, corrupt)
    payload = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(AnchorError, match="corrupt weights"):
        load_anchor(corrupt)


def test_pretrain_cli_smoke_and_refuses_existing_output(corpora, tmp_path):
    from flexolmo.cli import main

    out = tmp_path / "cli-anchor"
    args = ["pretrain", "--data", str(corpora["public"]), "--out", str(out), "--steps", "3", "--vocab-size",
            "300", "--hidden-size", "16", "--layers", "1", "--heads", "2", "--intermediate-size", "32",
            "--seq-len", "16", "--batch-size", "2"]
    assert main(args) == 0
    assert (out / "model.safetensors").exists() and not (tmp_path / "cli-anchor.ckpt").exists()
    assert main(args) == 1
