"""`import-anchor`: a local checkpoint (Hugging Face directory or GGUF file) becomes an anchor that computes what
transformers reads from the source, with public router rows, provenance, and nothing written on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_families import TOLERANCE, logits, save_random_dense

from flexolmo.coordinator.importer import IMPORT_FILE, ImportConfig, import_anchor
from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import AnchorError
from flexolmo.core.fileio import sha256_file
from flexolmo.model.anchor import compute_fingerprint, load_anchor


def write_tiny_gguf(path: Path, tokenizer_dir: Path, hidden: int = 32, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 48) -> Path:
    """A float32 Llama GGUF with random weights and the test tokenizer (byte-level BPE, as SmolLM2's)."""
    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    special = {added["content"] for added in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: control
    eos = spec["model"]["vocab"]["<|endoftext|>"]
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(eos)
    rng = np.random.default_rng(0)
    attention = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden),
              "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (heads * attention, hidden),
                       f"blk.{i}.attn_k.weight": (kv_heads * attention, hidden),
                       f"blk.{i}.attn_v.weight": (kv_heads * attention, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, heads * attention),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        values = 1 + 0.2 * rng.standard_normal(shape) if "norm" in name else 0.2 * rng.standard_normal(shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_hugging_face_directory_becomes_an_anchor(tiny_anchor, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    source = save_random_dense("qwen2", tmp_path / "qwen2-checkpoint", tiny_anchor)
    out = tmp_path / "anchor"
    summary = import_anchor(ImportConfig(source=source, public_data=[corpora["public"]], out=out, seq_len=32,
                                         sequences=8))
    anchor = load_anchor(out)
    assert anchor.family.model_type == "qwen2" and summary["merged_format"] == "qwen2_moe"
    assert (logits(anchor.model) - logits(AutoModelForCausalLM.from_pretrained(source))).abs().max() <= TOLERANCE
    assert summary["fingerprint"] == anchor.fingerprint == compute_fingerprint(out)
    assert summary["source_sha256"] == {"model.safetensors": sha256_file(source / "model.safetensors")}
    assert json.loads((out / IMPORT_FILE).read_text()) == summary
    merge(out, [], tmp_path / "merged", top_k=1)  # the public router rows are there, and provenance stays behind
    assert not (tmp_path / "merged" / IMPORT_FILE).exists()


def test_gguf_file_becomes_an_anchor_through_the_cli(tiny_anchor, corpora, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexolmo.cli import main

    pytest.importorskip("gguf")
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_anchor)
    out = tmp_path / "anchor"
    assert main(["import-anchor", "--source", str(gguf_path), "--public-data", str(corpora["public"]),
                 "--out", str(out), "--seq-len", "32", "--sequences", "4"]) == 0
    assert f"wrote anchor: {out}" in capsys.readouterr().out
    anchor = load_anchor(out)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert (logits(anchor.model) - logits(reference)).abs().max() <= TOLERANCE
    source_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "the history of the river"
    assert anchor.tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
    assert json.loads((out / IMPORT_FILE).read_text())["gguf_file"] == "tiny.gguf"


def test_bad_sources_fail_in_one_line_and_write_nothing(tiny_anchor, corpora, tmp_path):
    def attempt(source: Path, **fields) -> None:
        import_anchor(ImportConfig(source=source, public_data=[corpora["public"]], out=tmp_path / "out",
                                   seq_len=32, sequences=4, **fields))

    with pytest.raises(AnchorError, match="no such file or directory"):
        attempt(tmp_path / "missing")
    mistral = save_random_dense("mistral", tmp_path / "mistral", tiny_anchor)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(AnchorError, match="sliding-window attention is in use"):
        attempt(mistral)
    with pytest.raises(AnchorError, match="has no GGUF file nothing.gguf"):
        attempt(mistral, gguf_file="nothing.gguf")
    with pytest.raises(AnchorError, match="must be a .gguf file"):
        attempt(mistral / "config.json")
    with pytest.raises(AnchorError, match="already exists"):
        import_anchor(ImportConfig(source=mistral, public_data=[corpora["public"]], out=tiny_anchor))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
