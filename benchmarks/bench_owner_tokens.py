"""FlexOlmo with as many owner tokens as the dense baselines: does the gap to BTX and BTM close?

    .venv/bin/python benchmarks/bench_owner_tokens.py

In the demo every expert trains `expert_steps` steps with half of each batch public text (`public_share` 0.5),
so it sees half the owner tokens the dense experts (and hence BTX, BTM, prompt routing) see. Here each owner's
expert trains twice the steps with the same mix, so it sees exactly as many owner tokens as a dense expert
(and twice the compute). Everything else is the demo's (`DemoConfig` defaults: lr, batch, sequence length,
router initialisation, top-2 merge, held-out sequences). The demo's other rows are read from
`runs/demo/results.json`, which `flexolmo demo` wrote with the same evaluation settings. Artefacts go to
`--work` and finished experts are reused, so an interrupted run resumes. Results: a table and
`benchmarks/results/owner_tokens.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from flexolmo.demo import DemoConfig
from flexolmo.evaluate import EvalSettings, evaluate_path
from flexolmo.expert import ExpertConfig, train_expert
from flexolmo.merge import merge
from flexolmo.progress import console, print_table

RESULTS = Path(__file__).parent / "results" / "owner_tokens.json"
OWNERS = ("code", "math", "legal", "biomedical", "literature")
COMPARED = ("public", "model_soup", "btx_uncoordinated", "flexolmo", "prompt_routing", "btm", "unrestricted")


def train_owner(config: DemoConfig, work: Path, domain: str, steps: int) -> Path:
    out = work / "experts" / domain
    if not out.exists():
        console.rule(f"expert {domain}, {steps} steps")
        data = config.data_dir
        train_expert(ExpertConfig(
            anchor=data / "anchor", data=[data / f"{domain}.train.jsonl.gz"],
            heldout=[data / f"{domain}.heldout.jsonl.gz"], name=domain, out=out,
            eval_max_sequences=config.eval_max_sequences, public_data=[data / "public.train.jsonl.gz"],
            public_share=config.public_share, optim=config.optim(steps)),
            resume=(work / "experts" / f"{domain}.ckpt" / "checkpoint").exists())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-results", type=Path, default=Path("runs/demo/results.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/owner-tokens"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.demo_results.exists():
        sys.exit(f"error: {args.demo_results} is missing; run `flexolmo demo` first")
    demo = json.loads(args.demo_results.read_text())
    config = DemoConfig()
    if {key: value for key, value in demo["config"].items() if key not in ("data_dir", "out")} != \
            {key: value for key, value in config.model_dump(mode="json").items() if key not in ("data_dir", "out")}:
        sys.exit(f"error: {args.demo_results} was written with other settings than DemoConfig's defaults")
    steps = round(config.expert_steps / (1 - config.public_share))
    packages = [train_owner(config, args.work, domain, steps) for domain in OWNERS]
    merged = args.work / "flexolmo"
    if not merged.exists():
        merge(config.data_dir / "anchor", packages, merged, top_k=config.top_k)
    domains = {name: [config.data_dir / f"{name}.heldout.jsonl.gz"] for name in ("public", *OWNERS)}
    scores = evaluate_path(merged, domains, EvalSettings(seq_len=config.seq_len,
                                                         max_sequences=config.eval_max_sequences, split="all"))
    row = {name: score.bits_per_byte for name, score in scores.domains.items()}
    row["closed_average"] = sum(row[name] for name in OWNERS) / len(OWNERS)
    label = f"flexolmo, {steps} steps (equal owner tokens)"
    table = {method: demo["methods"][method] for method in COMPARED} | {label: row}
    columns = ["public", *OWNERS, "closed_average"]
    print_table("held-out bits per byte (demo rows from runs/demo/results.json)", ["method", *columns],
                [[method, *[values[c] for c in columns]] for method, values in table.items()])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "command": "python " + shlex.join(sys.argv), "expert_steps": steps,
        "demo_expert_steps": config.expert_steps, "public_share": config.public_share,
        "bits_per_byte": table}, indent=2) + "\n")
    print(f"results: {args.results}")


if __name__ == "__main__":
    main()
