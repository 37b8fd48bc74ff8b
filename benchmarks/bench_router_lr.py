"""A router learning rate of its own: the demo's experts trained with the owner's router row at a multiple of the
FFN's learning rate, on validation.

    .venv/bin/python benchmarks/bench_router_lr.py --demo runs/demo

The demo's owners train their router row at the FFN's rate (`--router-lr-scale 1`, train-expert's default), and
the merged router sends code's and math's tokens to each other's experts. This script trains the five experts
again with the row at each other multiple (the demo's settings and step count otherwise), merges them the
demo's way (top-k, untuned) and scores them on the shipped `*.validation` files through the demo's evaluation,
beside the demo's own merge: bits per byte, and the share of each domain's tokens that reach its own expert
(mean over layers). Validation only: this is a choice of setting, so the held-out files are not read. The rule,
written before the run: a multiple becomes the default only if it lowers the closed-domain average on
validation and leaves no domain (public included) worse than the demo's merge by more than 1%. Every step is
cached under --work; writes `benchmarks/results/router_lr.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flexolmo.core.fileio import atomic_write_json
from flexolmo.core.progress import print_table
from flexolmo.evaluation.scoring import evaluate
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, finished_demo_config, merged_model_dir

from common import command_line, results_file, write_results

RESULTS = results_file("router_lr.json")  # --seed N writes router_lr_seedN.json unless --out says otherwise
DOMAINS = [PUBLIC, *CLOSED_DOMAINS]


def scored(demo: Demo, name: str, model: Path, cache: Path) -> dict:
    """Validation bits per byte and own-expert routing share of every domain (cached in `cache`)."""
    if cache.exists():
        return json.loads(cache.read_text())
    loaded = demo.load(model)
    files = {domain: [demo.validation_file(domain)] for domain in DOMAINS}
    result = evaluate(loaded.model, loaded.tokenizer, files, demo.settings, loaded.expert_names, name)
    bpb = {domain: score.bits_per_byte for domain, score in result.domains.items()}
    bpb["closed_average"] = sum(bpb[domain] for domain in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
    own = {domain: result.domains[domain].routing["mean_share"][domain] for domain in DOMAINS}
    entry = {"bits_per_byte": bpb, "own_expert_share": own}
    atomic_write_json(cache, entry)
    return entry


def adopted(candidate: dict, reference: dict) -> bool:
    """The rule of the module docstring."""
    better = candidate["closed_average"] < reference["closed_average"]
    return better and all(candidate[domain] <= 1.01 * reference[domain] for domain in DOMAINS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo run")
    parser.add_argument("--work", type=Path, default=Path("runs/router-lr"), help="where every step is cached")
    parser.add_argument("--scales", type=float, nargs="+", default=[10.0],
                        help="router learning-rate multiples tried")
    parser.add_argument("--seed", type=int, default=None,
                        help="train every set of experts with this seed instead of the demo's (then multiple 1 is "
                             "trained again too): the seed-to-seed spread the differences are read against")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default: {RESULTS}, or "
                        "router_lr_seedN.json beside it with --seed N)")
    args = parser.parse_args()
    began = time.perf_counter()
    demo_config = finished_demo_config(args.demo)
    seed = demo_config.seed if args.seed is None else args.seed
    out = args.out or (RESULTS if seed == demo_config.seed else RESULTS.with_name(f"router_lr_seed{seed}.json"))
    work = args.work if seed == demo_config.seed else args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if seed == demo_config.seed:  # the demo's own merge is the multiple-1 model
        results[1.0] = scored(Demo(demo_config), "flexolmo_untuned", merged_model_dir(args.demo, "flexolmo", None),
                              work / "scale1.json")
    for scale in sorted({*args.scales, 1.0} - set(results)):
        bench = Demo(demo_config.model_copy(update={"out": work / f"scale{scale:g}", "ablation": False,
                                                    "seed": seed}))
        bench.check_inputs()
        model = bench.merged(bench.train_experts(router_lr_scale=scale), f"router_lr{scale:g}")
        results[scale] = scored(bench, f"flexolmo_router_lr{scale:g}", model, work / f"scale{scale:g}.json")
    rows = sorted(results.items())
    print_table("bits per byte on validation text, FlexOlmo (untuned) by router learning-rate multiple",
                ["router lr multiple", *DOMAINS, "closed avg"],
                [[f"{scale:g}", *[f"{entry['bits_per_byte'][d]:.4f}" for d in [*DOMAINS, "closed_average"]]]
                 for scale, entry in rows])
    print_table("share of each domain's validation tokens routed to its own expert (mean over layers)",
                ["router lr multiple", *DOMAINS],
                [[f"{scale:g}", *[f"{entry['own_expert_share'][d]:.3f}" for d in DOMAINS]] for scale, entry in rows])
    verdicts = {f"{scale:g}": adopted(entry["bits_per_byte"], results[1.0]["bits_per_byte"])
                for scale, entry in rows if scale != 1.0}
    print(f"adopted by the rule: {[scale for scale, ok in verdicts.items() if ok] or 'none (the default stays 1)'}")
    write_results(out, {"command": command_line(), "seed": seed,
                             "validation": {f"{s:g}": e for s, e in rows},
                             "adopted": verdicts, "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    main()
