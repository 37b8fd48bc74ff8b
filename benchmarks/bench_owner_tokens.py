"""Is FlexOlmo's gap to BTX on the demo the owner tokens it spends on public text? A diagnostic, not a fair race.

    .venv/bin/python benchmarks/bench_owner_tokens.py --demo runs/demo

At equal training FLOPs the demo's FlexOlmo owners see 3.4x fewer of their own tokens than the dense experts
that BTX merges (half of each coordinated batch is public text, and a coordinated step costs more). This script
trains the five coordinated experts again with exactly the dense experts' owner tokens (the demo's settings,
more steps), merges them the demo's way (top-k, untuned, as validation chose in the demo) and scores them
through the demo's evaluation, beside the demo's FlexOlmo and BTX rows and their costs. If FlexOlmo then
matches BTX, owner tokens are the cause; if not, something else is. It costs more FLOPs than BTX by
construction, which the output states. Every step is cached under --work; writes
`benchmarks/results/owner_tokens.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.progress import print_table
from flexolmo.experiments.compute import TrainingRun, method_cost
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, DemoConfig, finished_demo_config
from flexolmo.model.anchor import read_config

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("owner_tokens.json")


def matched_steps(config: DemoConfig) -> int:
    """Coordinated steps whose owner sequences equal one dense expert's (all of whose sequences are the owner's)."""
    owner_per_step = config.batch_size - round(config.batch_size * config.public_share)
    dense_sequences = config.dense_steps(read_config(config.data_dir / "anchor")) * config.batch_size
    return -(-dense_sequences // owner_per_step)


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo run")
    parser.add_argument("--work", type=Path, default=Path("runs/owner-tokens"), help="where every step is cached")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    began = time.perf_counter()
    demo_config = finished_demo_config(args.demo)
    demo_results = json.loads((args.demo / "results.json").read_text())
    steps = matched_steps(demo_config)
    config = demo_config.model_copy(update={"out": args.work, "expert_steps": steps, "ablation": False})
    bench = Demo(config)
    bench.check_inputs()
    model = bench.merged(bench.train_experts(), "owner_tokens_matched")
    scores = bench.evaluated("flexolmo_owner_tokens_matched", bench.model_builder(model))
    row = {d: s["bits_per_byte"] for d, s in scores["domains"].items()}
    row["closed_average"] = sum(row[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
    owner_sequences = config.batch_size - round(config.batch_size * config.public_share)
    cost = method_cost(read_config(config.data_dir / "anchor"), config.seq_len,
                       [TrainingRun("coordinated", steps, config.batch_size, owner_sequences)] * len(CLOSED_DOMAINS),
                       experts_per_token=config.top_k)
    rows = {"flexolmo_owner_tokens_matched": (row, cost)}
    flop_matched = demo_results["protocols"]["flop_matched"]  # the dense experts whose owner tokens are matched
    for method in ("public", "flexolmo_untuned", "btx_ffn_untuned"):
        rows[method] = (flop_matched["methods"][method], flop_matched["costs"][method])
    domains = [PUBLIC, *CLOSED_DOMAINS, "mixed", "closed_average"]
    print_table(f"bits per byte on held-out text; coordinated experts at {steps} steps match the dense experts' "
                "owner tokens", ["method", *domains, "training PFLOPs", "owner tokens"],
                [[m, *[r[d] for d in domains], c["training_flops"] / 1e15, c["owner_tokens"]]
                 for m, (r, c) in rows.items()])
    write_results(args.out, {"command": command_line(), "expert_steps": steps,
                                 "demo_expert_steps": demo_config.expert_steps,
                                 "results": {m: {"bits_per_byte": r, "cost": c} for m, (r, c) in rows.items()},
                                 "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
