"""A DP expert inside the merged model: does mixing public text into its DP batches keep its router row honest?

    .venv/bin/python benchmarks/bench_dp_merge.py

An owner's router row trained on its own text alone learns "prefer me" and takes tokens of every domain after
the merge (issue 3); `--public-share` fixes that for ordinary experts and, since issue 6, works under DP. Here the
`code` owner's DP expert (epsilon 8, the settings of `bench_privacy.py`: 60 steps, expected batch 32, lr 5e-4,
delta 1e-6, router row from the public row) is trained with and without half of each batch public text, and
each is merged at top-2 with the demo's other four experts (`runs/demo/experts`). Reported: held-out bits per
byte per domain, and the share of each domain's tokens the code expert receives (mean over layers). Every DP
expert is trained here (`bench_privacy.py`'s DP experts mix in the anchor's public sample by default, so none of
them is the owner-text-only case). A fourth expert adds the DP router statistic (`--router-init
dp_mean_hidden`: the mean-hidden direction of a Poisson sample of ~1,024 owner sequences, released with noise multiplier
4 and charged to the same epsilon 8). Results: a table and `benchmarks/results/dp_merge.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flexolmo.coordinator.merge import merge
from flexolmo.core.progress import console, print_table
from flexolmo.evaluation.scoring import EvalSettings, evaluate_path
from flexolmo.model.router_init import DP_ROUTER_INIT
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.privacy import DPConfig
from flexolmo.training.loop import OptimConfig

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("dp_merge.json")
OTHERS = ("math", "legal", "biomedical", "literature")
DOMAINS = ("public", "code", *OTHERS)
# Poisson sample of about 1,024 of the code owner's ~2,860 sequences for the DP router statistic (noise multiplier 4).
ROUTER_SEQUENCES = 1024


def train_dp_code(data: Path, out: Path, public_share: float, router_init: str = "public") -> Path:
    if out.exists():
        return out
    console.rule(f"DP code expert, public share {public_share}, router init {router_init}")
    optim = OptimConfig(steps=60, batch_size=32, seq_len=256, lr=5e-4, warmup_steps=6, checkpoint_every=20, seed=0)
    train_expert(ExpertConfig(
        anchor=data / "anchor", data=[data / "code.train.jsonl.gz"], heldout=[data / "code.heldout.jsonl.gz"],
        name="code", out=out, router_init=router_init, router_init_sequences=ROUTER_SEQUENCES,
        eval_max_sequences=48, optim=optim,
        public_data=[data / "public.train.jsonl.gz"] if public_share else [], public_share=public_share,
        dp=DPConfig(epsilon=8.0, delta=1e-6)),
        resume=(out.with_name(out.name + ".ckpt") / "checkpoint").exists())
    return out


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="the demo data (anchor and corpora)")
    parser.add_argument("--demo-experts", type=Path, default=Path("runs/demo/experts"),
                        help="the demo's expert packages (code and the four others merged with each DP expert)")
    parser.add_argument("--work", type=Path, default=Path("runs/dp-merge"),
                        help="where the DP experts and merged models are written (reused when present)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    others = [args.demo_experts / name for name in OTHERS]
    if not all((path / "manifest.json").exists() for path in [*others, args.demo_experts / "code"]):
        sys.exit(f"error: the demo's experts are missing under {args.demo_experts}; run `flexolmo demo` first")
    codes = {
        "code expert without DP (the demo's)": args.demo_experts / "code",
        "DP eps 8, owner text only": train_dp_code(args.data_dir, args.work / "experts" / "code-dp8", 0.0),
        "DP eps 8, half of each batch public": train_dp_code(args.data_dir, args.work / "experts" / "code-dp8-mix",
                                                              0.5),
        "DP eps 8, half public, dp_mean_hidden row": train_dp_code(
            args.data_dir, args.work / "experts" / "code-dp8-mix-dprow", 0.5, DP_ROUTER_INIT),
    }
    domains = {name: [args.data_dir / f"{name}.heldout.jsonl.gz"] for name in DOMAINS}
    settings = EvalSettings(seq_len=256, max_sequences=48, split="all")
    bits, code_share, privacy = {}, {}, {}
    for label, package in codes.items():
        merged = args.work / "merged" / package.name
        if not merged.exists():
            merge(args.data_dir / "anchor", [package, *others], merged, top_k=2)
        result = evaluate_path(merged, domains, settings)
        bits[label] = {name: score.bits_per_byte for name, score in result.domains.items()}
        expert = json.loads((package / "manifest.json").read_text())["name"]
        code_share[label] = {name: score.routing["mean_share"][expert] for name, score in result.domains.items()}
        privacy[label] = json.loads((package / "manifest.json").read_text())["privacy"]["dp"]
    print_table("held-out bits per byte, code expert + the demo's other four, top-2", ["code expert", *DOMAINS],
                [[label, *[row[d] for d in DOMAINS]] for label, row in bits.items()])
    print_table("share of each domain's tokens routed to the code expert", ["code expert", *DOMAINS],
                [[label, *[row[d] for d in DOMAINS]] for label, row in code_share.items()])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.results, {
        "command": command_line(), "packages": {k: str(v) for k, v in codes.items()},
        "bits_per_byte": bits, "code_expert_share": code_share, "dp": privacy})


if __name__ == "__main__":
    main()
