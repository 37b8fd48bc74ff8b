"""Turn a pretrained checkpoint on local disk into a flexolmo anchor directory (`flexolmo import-anchor`).

The source is a Hugging Face model directory (safetensors or PyTorch weights) or a GGUF file, read through
transformers' own GGUF support (quantised weights are dequantised). Nothing is downloaded: every read is
`local_files_only`. The family is checked against `anchor.ANCHOR_FAMILIES` (refusals included) before any
weight is read. The anchor directory gets the weights as safetensors, the tokenizer, the public router rows
(the per-layer mean FFN input direction over the given public text, as `init-router` computes them), and
`flexolmo_import.json` saying where it came from (file hashes, versions). It appears only once complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import AnchorError
from flexolmo.core.fileio import atomic_directory, atomic_write_json, sha256_file
from flexolmo.core.progress import console
from flexolmo.core.provenance import input_hashes, software_versions, utc_now
from flexolmo.data.public_sample import write_public_sample
from flexolmo.data.tokens import load_token_stream
from flexolmo.model.anchor import (
    anchor_family,
    check_tokenizer,
    complete_config,
    compute_fingerprint,
    read_config,
)
from flexolmo.model.router_init import mean_direction_rows, save_public_rows

IMPORT_FILE = "flexolmo_import.json"
GGUF_REQUIREMENT = "gguf>=0.10"


class ImportConfig(BaseModel):
    """`flexolmo import-anchor`: which checkpoint becomes the anchor, and how its public router rows are made."""

    source: Path = Field(description="a Hugging Face model directory, or a .gguf file (or its directory)")
    gguf_file: str | None = Field(None, description="name of the GGUF file inside a --source directory")
    public_data: list[Path] = Field(description="public text the public router rows are averaged over")
    out: Path = Field(description="the anchor directory to write (must not exist)")
    seq_len: int = Field(256, ge=2, description="tokens per public sequence")
    sequences: int = Field(256, ge=1, description="public sequences averaged for the router rows")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    save_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the written weights (GGUF weights are dequantised to it)")
    device: str = Field("cpu", description="torch device for the router statistics")


def _locate(config: ImportConfig) -> tuple[Path, str | None]:
    """(model directory, GGUF file name or None) from --source and --gguf-file."""
    source = config.source
    if not source.exists():
        raise AnchorError(f"{source}: no such file or directory; check --source")
    if source.is_file():
        if source.suffix != ".gguf":
            raise AnchorError(f"{source}: a file source must be a .gguf file; for a Hugging Face checkpoint pass "
                              "its directory")
        if config.gguf_file not in (None, source.name):
            raise AnchorError(f"--source names the file {source.name} and --gguf-file names {config.gguf_file}; "
                              "give one")
        return source.parent, source.name
    if config.gguf_file is not None and not (source / config.gguf_file).is_file():
        raise AnchorError(f"{source}: has no GGUF file {config.gguf_file}")
    return source, config.gguf_file


def _source_config(directory: Path, gguf_file: str | None) -> dict:
    """The dense config of the source, complete, read without its weights."""
    if gguf_file is None:
        raw = read_config(directory)
        anchor_family(raw, directory)
        return complete_config(raw, directory)
    from transformers import AutoConfig
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise AnchorError(f"reading GGUF needs the gguf package: pip install '{GGUF_REQUIREMENT}'")
    try:
        config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise AnchorError(f"{directory / gguf_file}: cannot read its config ({_first_line(error)})") from None
    return config.to_dict()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_source(directory: Path, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = directory / gguf_file if gguf_file else directory
    # Dequantised into plain layers: transformers may otherwise keep GGUF blocks, which it cannot save.
    gguf = {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)} if gguf_file else {}
    console.print(f"reading {where}" + (" (dequantising)" if gguf_file else ""))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise AnchorError(f"{where}: cannot load the model or its tokenizer ({_first_line(error)})") from None
    return model.eval(), check_tokenizer(tokenizer, where)


def _source_hashes(directory: Path, gguf_file: str | None) -> dict[str, str]:
    """SHA-256 of the files the weights were read from."""
    if gguf_file:
        return {gguf_file: sha256_file(directory / gguf_file)}
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {file.name: sha256_file(file) for file in files}


def import_anchor(config: ImportConfig) -> dict:
    """Write the anchor directory `config.out` from `config.source`; returns what `flexolmo_import.json` says."""
    if config.out.exists():
        raise AnchorError(f"{config.out} already exists: choose another --out or remove it")
    directory, gguf_file = _locate(config)
    dense_config = _source_config(directory, gguf_file)
    family = anchor_family(dense_config, config.source)
    dtype = getattr(torch, config.save_dtype)
    model, tokenizer = _load_source(directory, gguf_file, dtype)
    model.to(config.device)
    stream = load_token_stream(config.public_data, tokenizer, "all", config.text_field)
    rows = mean_direction_rows(model, stream, config.seq_len, config.sequences)
    summary = {
        "kind": "flexolmo-imported-anchor",
        "source": str(config.source.resolve()),
        "gguf_file": gguf_file,
        "source_sha256": _source_hashes(directory, gguf_file),
        "model_type": family.model_type,
        "merged_format": family.moe_model_type,
        "parameters": sum(param.numel() for param in model.parameters()),
        "public_router": {"data": input_hashes(config.public_data), "seq_len": config.seq_len,
                          "sequences": min(config.sequences, stream.num_sequences(config.seq_len))},
        "config": config.model_dump(mode="json"),
        "versions": software_versions(),
        "created": utc_now(),
    }
    with atomic_directory(config.out) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        save_public_rows(config.out, rows, staging=staging)
        write_public_sample(staging, config.public_data, "all", config.text_field)  # owners mix it in by default
        summary["fingerprint"] = compute_fingerprint(staging)
        atomic_write_json(staging / IMPORT_FILE, summary)
    return summary
