"""Admission checks on the demo: what honest experts measure, what hijackers measure, and what the probe costs.

    .venv/bin/python benchmarks/bench_admission.py

The demo's five honest experts (the demo's own settings: 60 steps, 8 x 256 tokens, lr 2e-3, half of each batch
public text; reused from `--demo-dir` when present, else trained there) are merged at top-2 and measured by the
admission checks with every limit disabled, on the demo's public held-out text (48 windows of 256 tokens).
Then the math owner turns dishonest, as a member who recomputes its package's checksums with flexolmo's own
functions: its router rows scaled by 5, 20 and 50, and its rows replaced by the public row's direction at 1.5x
the public row's norm (under the norm limit). Each dishonest package is merged with the four honest ones and
measured the same way. Reported per expert: the largest router-row norm over the public row's, the share of
public tokens on which it has the top router logit, the share on which it is in the top-2, the change of public
bits per byte with it against without it, and the checks' seconds per expert (the whole admission of a merge
over its 5 candidates: loading the merged model, 1 + 5 probe passes), also as a ratio to one pass of the dense
anchor over the same probe windows timed just before in the same process. Results: a table and
`benchmarks/results/admission.json`. The default limits of `flexolmo.coordinator.admission` are chosen from these
numbers (honest maximum with margin, below every attack).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from flexolmo.coordinator.admission import AdmissionPolicy
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.progress import console, print_table
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import score_stream
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, DemoConfig
from flexolmo.model.router_init import load_public_rows
from flexolmo.model.runtime import load_model
from flexolmo.owner.package import load_package, write_package

from common import results_file, write_results

RESULTS = results_file("admission.json")
NO_LIMITS = dict(max_row_norm_ratio=1e9, max_public_top_share=1.0, max_public_bpb_increase=1e9)
ATTACKER = "math"


def forged(source: Path, out: Path, transform) -> Path:
    """A package whose tensors `transform` changed, re-written with flexolmo's own writer (valid checksums)."""
    if out.exists():
        return out
    package = load_package(source)
    manifest = package.manifest
    fields = {key: manifest[key] for key in ("anchor", "training", "privacy", "created", "versions")}
    write_package(out, package.name, transform(dict(package.tensors)), fields)
    return out


def scaled_rows(factor: float):
    def transform(tensors):
        return {k: v * factor if k.endswith("router.weight") else v for k, v in tensors.items()}
    return transform


def public_aligned(anchor: Path, factor: float):
    def transform(tensors):
        layers = sum(1 for k in tensors if k.endswith("router.weight"))
        rows = load_public_rows(anchor, layers)
        return {k: (rows[int(k.split(".")[1])][None] * factor).to(v.dtype) if k.endswith("router.weight") else v
                for k, v in tensors.items()}
    return transform


def anchor_pass_seconds(anchor: Path, probe: Path, policy: AdmissionPolicy) -> float:
    """The baseline, timed in the same process: one pass of the dense anchor over the probe's windows."""
    loaded = load_model(anchor, device=policy.device)
    stream = load_token_stream([probe], loaded.tokenizer, "all")
    start = time.perf_counter()
    score_stream(loaded.model, stream, policy.seq_len, policy.batch_size, policy.probe_sequences, policy.device,
                 "baseline: anchor pass")
    return time.perf_counter() - start


def measure(anchor: Path, packages: list[Path], probe: Path, out: Path) -> dict:
    baseline = anchor_pass_seconds(anchor, probe, AdmissionPolicy())
    reports = []
    shutil.rmtree(out, ignore_errors=True)
    trust = CoordinatorTrust(admission=AdmissionPolicy(**NO_LIMITS), probe=([probe], "all"),
                             on_admission=reports.append)
    merge(anchor, packages, out, top_k=2, trust=trust)
    shutil.rmtree(out)
    return {**reports[0].as_dict(), "anchor_pass_seconds": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"))
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"),
                        help="a demo run whose experts/ are reused (trained there when missing)")
    parser.add_argument("--work", type=Path, default=Path("runs/admission"))
    args = parser.parse_args()
    anchor, probe = args.data_dir / "anchor", args.data_dir / "public.heldout.jsonl.gz"
    demo = Demo(DemoConfig(data_dir=args.data_dir.resolve(), out=args.demo_dir))
    demo.check_inputs()
    honest = demo.train_experts()
    attacks = {
        "rows x5": scaled_rows(5.0), "rows x20": scaled_rows(20.0), "rows x50": scaled_rows(50.0),
        "public-aligned row x1.5": public_aligned(anchor, 1.5),
    }
    results = {"command": " ".join(shlex.quote(a) for a in sys.argv), "probe": str(probe), "top_k": 2}
    console.rule("five honest experts")
    results["honest"] = measure(anchor, [honest[d] for d in CLOSED_DOMAINS], probe, args.work / "merged")
    results["attacks"] = {}
    for label, transform in attacks.items():
        console.rule(f"dishonest {ATTACKER}: {label}")
        package = forged(honest[ATTACKER], args.work / "forged" / label.replace(" ", "_"), transform)
        others = [honest[d] for d in CLOSED_DOMAINS if d != ATTACKER]
        report = measure(anchor, [*others, package], probe, args.work / "merged")
        results["attacks"][label] = report
    write_results(RESULTS, results)

    def row(label, verdict, report):
        per_expert = report["seconds"] / len(CLOSED_DOMAINS)
        return [label, verdict["row_norm_ratio"], verdict["public_top_share"], verdict["public_selected_share"],
                verdict["public_bpb_change"], per_expert, per_expert / report["anchor_pass_seconds"]]

    rows = [row(v["name"], v, results["honest"]) for v in results["honest"]["verdicts"]]
    for label, report in results["attacks"].items():
        verdict = next(v for v in report["verdicts"] if v["name"] == ATTACKER)
        rows.append(row(f"{ATTACKER}, {label}", verdict, report))
    print_table("admission measurements (top-2 merge of 5 experts, public held-out probe)",
                ["expert", "row norm / public", "top logit on public", "in top-2 on public", "public bpb change",
                 "checks s/expert", "/ anchor pass"], rows)


if __name__ == "__main__":
    main()
