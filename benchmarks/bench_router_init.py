"""Which router initialisation to default to: held-out loss after training an expert on each demo domain.

    .venv/bin/python benchmarks/bench_router_init.py --inits mean_hidden random --work runs/router-init

For every closed demo domain and every initialisation, trains an expert with the demo's settings (same data,
steps, batch, seed: only the router row's starting point differs) and scores the owner's model on the domain's
held-out text, with the same evaluation as everything else. Writes `benchmarks/results/router_init.json`.
Packages go under `--work`; an existing one is reused, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flexolmo.demo import CLOSED_DOMAINS, DemoConfig
from flexolmo.expert import ExpertConfig, train_expert
from flexolmo.package import load_package
from flexolmo.progress import print_table

RESULTS = Path(__file__).parent / "results" / "router_init.json"


def trained(domain: str, init: str, demo: DemoConfig, work: Path) -> dict:
    out = work / f"{domain}-{init}"
    if not out.exists():
        train_expert(ExpertConfig(
            anchor=demo.data_dir / "anchor", data=[demo.data_dir / f"{domain}.train.jsonl.gz"],
            heldout=[demo.data_dir / f"{domain}.heldout.jsonl.gz"], name=f"{domain}-{init}", out=out,
            router_init=init, eval_max_sequences=demo.eval_max_sequences, optim=demo.optim(demo.expert_steps),
            public_data=[demo.data_dir / "public.train.jsonl.gz"], public_share=demo.public_share))
    return load_package(out, with_tensors=False).manifest["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", nargs="+", default=["mean_hidden", "random"])
    parser.add_argument("--domains", nargs="+", default=list(CLOSED_DOMAINS))
    parser.add_argument("--work", type=Path, default=Path("runs/router-init"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    demo = DemoConfig()
    began = time.perf_counter()
    table = {domain: {init: trained(domain, init, demo, args.work) for init in args.inits} for domain in args.domains}
    rows, results = [], {}
    for domain, by_init in table.items():
        before = next(iter(by_init.values()))["heldout_loss_before"]
        results[domain] = {"anchor": before, **{init: t["heldout_loss_after"] for init, t in by_init.items()}}
        rows.append([domain, before, *[by_init[i]["heldout_loss_after"] for i in args.inits]])
    means = {init: sum(results[d][init] for d in args.domains) / len(args.domains) for init in args.inits}
    rows.append(["mean", sum(r[1] for r in rows) / len(rows), *[means[i] for i in args.inits]])
    print_table("held-out loss (nats/token) of the owner's model after training", ["domain", "anchor", *args.inits],
                rows)
    payload = {"command": " ".join([".venv/bin/python", *sys.argv]), "steps": demo.expert_steps,
               "batch_size": demo.batch_size, "seq_len": demo.seq_len, "heldout_sequences": demo.eval_max_sequences,
               "heldout_loss": results, "mean": means, "best": min(means, key=means.get),
               "seconds": time.perf_counter() - began}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
