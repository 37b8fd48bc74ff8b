"""How many experts per token: the demo's five expert packages merged at top-k 1..6, scored on every domain.

    .venv/bin/python benchmarks/bench_top_k.py

The demo merges at top-2 (of 6: public + 5 owners); the paper's final model uses top-4 of 8. Same packages
(`runs/demo/experts`, from `flexolmo demo`), same anchor, one `flexolmo.coordinator.merge.merge` per k into a temporary
directory, then the one evaluation path (`evaluate_path`) with the demo's settings: the first 48 sequences of
256 tokens of each `<domain>.heldout.jsonl.gz`, the first 32 of each as context. Active parameters per token grow with k
(FFN compute is k/1 of the anchor's). Results: a table and `benchmarks/results/top_k.json`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from flexolmo.coordinator.merge import merge
from flexolmo.core.progress import print_table
from flexolmo.evaluation.scoring import EvalSettings, evaluate_path

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("top_k.json")
DOMAINS = ("public", "code", "math", "legal", "biomedical", "literature")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--anchor", type=Path, default=Path("data/demo/anchor"),
                        help="the anchor the experts merge onto")
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="the held-out text scored")
    parser.add_argument("--experts", type=Path, default=Path("runs/demo/experts"), help="a folder of expert packages")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 3, 4, 6], help="experts per token tried")
    parser.add_argument("--max-sequences", type=int, default=48, help="held-out windows scored per domain")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    packages = sorted(path for path in args.experts.iterdir() if (path / "manifest.json").exists()) \
        if args.experts.is_dir() else []
    if not packages:
        sys.exit(f"error: no expert packages in {args.experts}; run `flexolmo demo` first")
    domains = {name: [args.data_dir / f"{name}.heldout.jsonl.gz"] for name in DOMAINS}
    # The demo's evaluation exactly: the first 32 tokens of each window are context, not scored.
    settings = EvalSettings(seq_len=256, max_sequences=args.max_sequences, split="all", context_tokens=32)
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="flexolmo-top-k-") as scratch:
        anchor_scores = evaluate_path(args.anchor, domains, settings)
        results["anchor"] = {name: score.bits_per_byte for name, score in anchor_scores.domains.items()}
        for k in args.top_k:
            out = Path(scratch) / f"top{k}"
            merge(args.anchor, packages, out, top_k=k)
            began = time.perf_counter()
            scores = evaluate_path(out, domains, settings)
            seconds[k] = time.perf_counter() - began
            results[f"top-{k}"] = {name: score.bits_per_byte for name, score in scores.domains.items()}
    for row in results.values():
        row["closed average"] = sum(row[name] for name in DOMAINS[1:]) / len(DOMAINS[1:])
    columns = [*DOMAINS, "closed average"]
    print_table(f"held-out bits per byte, {len(packages)} experts + public", ["model", *columns],
                [[label, *[row[c] for c in columns]] for label, row in results.items()])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.results, {
        "command": command_line(), "packages": [str(p) for p in packages],
        "max_sequences": args.max_sequences, "bits_per_byte": results, "eval_seconds": seconds})


if __name__ == "__main__":
    main()
