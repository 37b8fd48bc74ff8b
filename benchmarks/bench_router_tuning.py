"""Router tuning on the demo: which proxy embedder, how many proxies, which learning rate, chosen on validation text.

    .venv/bin/python benchmarks/bench_router_tuning.py --demo runs/demo

Builds on a finished demo (`flexolmo demo`): its untuned FlexOlmo merge and its settings, so every number here is
comparable with the demo's tables. Every owner selects proxies from the anchor's public sample with each
embedder (the anchor's own hidden states, and all-MiniLM-L6-v2) at each proxy size (bytes as a fraction of the
owner's training bytes); the coordinator tunes the merged model's router rows at each learning rate (the demo's
step count); each candidate is scored on the shipped `*.validation` files through the demo's own evaluation.
At the best setting on validation, a control tunes on random public documents, as many as the real proxies: is
it the selection that helps, or any tuning? The untuned model, the best tuning, the same setting with the other
embedder and the control are then scored once on the held-out files. Each step is cached under --work, so the
script resumes; a --work holding another setting or another --pool is refused. Writes
`benchmarks/results/router_tuning.json`.

    .venv/bin/python benchmarks/bench_router_tuning.py --demo runs/demo --pool runs/domain-pool/pool.jsonl.gz \
        --work runs/router-tuning-pool --fractions 0.05 --out benchmarks/results/router_tuning_domain_pool.json

--pool replaces the anchor's public sample, for the owners' proxy selection, the coordinator's tuning and the
control, by another public pool: `benchmarks/domain_like_pool.py` builds one that holds documents like four of
the closed domains.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_write_json, sha256_file
from flexolmo.core.progress import console, print_table
from flexolmo.data.documents import iter_documents
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, finished_demo_config, merged_model_dir
from flexolmo.owner.proxy import read_proxies, text_sha256

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("router_tuning.json")
EMBEDDERS = ("anchor", "minilm")


class PoolDemo(Demo):
    """The demo's steps with another public pool for proxies and tuning."""

    def __init__(self, config, pool: Path):
        super().__init__(config)
        self.pool = pool

    def public_pool(self) -> Path:
        return self.pool


def bench_demo(run: Path, work: Path, pool: Path | None) -> Demo:
    """A Demo with the finished run's settings that writes under `work` (refusing a `work` of other settings, or
    of another pool: its cached proxies were chosen from that pool)."""
    if pool is not None and not pool.is_file():
        raise FlexOlmoError(f"--pool {pool}: no such file (build one with benchmarks/domain_like_pool.py)")
    config = finished_demo_config(run).model_copy(update={"out": work})
    demo = Demo(config) if pool is None else PoolDemo(config, pool)
    demo.check_inputs()
    record = work / "pool.json"
    used = {"pool": str(demo.public_pool()), "sha256": sha256_file(demo.public_pool())}
    if record.exists() and json.loads(record.read_text())["sha256"] != used["sha256"]:
        raise FlexOlmoError(f"{work} holds a run on another public pool ({json.loads(record.read_text())['pool']}); "
                            "pass another --work")
    atomic_write_json(record, used)
    return demo


def random_proxies(demo: Demo, reference: list[Path]) -> list[Path]:
    """The control: as many random public documents as each owner's real proxies, in the proxy format."""
    pool = sorted({text_sha256(d.text) for d in iter_documents(demo.public_pool())})
    files = []
    for seed, path in enumerate(reference):
        record = read_proxies(path)
        out = demo.out / "proxies-random" / path.name
        if not out.exists():
            chosen = random.Random(seed).sample(pool, len(record["proxies"]))
            atomic_write_json(out, {**record, "proxies": chosen, "selection": {"embedder": "random (control)"}})
        files.append(out)
    return files


def selection_quality(files: list[Path]) -> dict[str, dict]:
    """Per owner: the classifier's cross-fitted accuracy and ROC AUC, and what it selected."""
    keys = ("heldout_accuracy", "heldout_roc_auc", "selected_documents", "selected_bytes")
    records = [read_proxies(f) for f in files]
    return {record["name"]: {k: record["selection"][k] for k in keys} for record in records}


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo run")
    parser.add_argument("--work", type=Path, default=Path("runs/router-tuning"), help="where every step is cached")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.05],
                        help="proxy sizes tried: proxy bytes / owner training bytes (select-proxy's default first)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="tuning learning rates tried")
    parser.add_argument("--embedders", nargs="+", choices=EMBEDDERS, default=list(EMBEDDERS),
                        help="proxy embedders tried (the held-out table adds the other one at the best setting "
                             "only when both are tried)")
    parser.add_argument("--pool", type=Path, default=None,
                        help="public pool for proxies and tuning (default: the anchor's public sample)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    began = time.perf_counter()
    demo = bench_demo(args.demo, args.work, args.pool)
    untuned = merged_model_dir(args.demo, "flexolmo", None)
    validation = {"untuned": demo.validated("untuned", untuned)}
    proxies, quality, candidates = {}, {}, {}
    for embedder in args.embedders:
        for fraction in args.fractions:
            setting = f"{embedder}-f{fraction:g}"
            proxies[setting] = demo.select_proxies(f"proxies-{setting}", embedder=embedder, fraction=fraction)
            quality[setting] = selection_quality(proxies[setting])
            for lr in args.lrs:
                name = f"{setting}-lr{lr:g}"
                candidates[name] = {"embedder": embedder, "fraction": fraction, "lr": lr,
                                    "model": demo.tuned(untuned, args.work / "models" / name, proxies[setting], lr)}
                validation[name] = demo.validated(name, candidates[name]["model"])
    best = min(candidates, key=lambda name: validation[name]["closed_average"])
    chosen = candidates[best]
    control = f"random-f{chosen['fraction']:g}-lr{chosen['lr']:g}"
    console.rule(f"control: random public documents at the best setting ({best})")
    control_model = demo.tuned(untuned, args.work / "models" / control,
                               random_proxies(demo, proxies[f"{chosen['embedder']}-f{chosen['fraction']:g}"]),
                               chosen["lr"])
    validation[control] = demo.validated(control, control_model)
    heldout_models = {"untuned": untuned, best: chosen["model"], control: control_model}
    for other in (e for e in args.embedders if e != chosen["embedder"]):
        name = f"{other}-f{chosen['fraction']:g}-lr{chosen['lr']:g}"
        heldout_models[name] = candidates[name]["model"]
    heldout = {name: demo.evaluated(name, demo.model_builder(model)) for name, model in heldout_models.items()}
    heldout_rows = {name: {**{d: s["bits_per_byte"] for d, s in result["domains"].items()},
                           "closed_average": sum(result["domains"][d]["bits_per_byte"] for d in CLOSED_DOMAINS)
                           / len(CLOSED_DOMAINS)} for name, result in heldout.items()}
    domains = [PUBLIC, *CLOSED_DOMAINS, "closed_average"]
    print_table("proxy classifiers (cross-fitted, owner vs public documents)",
                ["setting", *[f"{d} AUC" for d in CLOSED_DOMAINS], "documents selected (sum)"],
                [[s, *[q[d]["heldout_roc_auc"] for d in CLOSED_DOMAINS],
                  sum(q[d]["selected_documents"] for d in CLOSED_DOMAINS)] for s, q in quality.items()])
    print_table("bits per byte on validation text (the choice)", ["model", *domains],
                [[name, *[scores[d] for d in domains]] for name, scores in validation.items()])
    print_table("bits per byte on held-out text (reported once)", ["model", *domains, "mixed"],
                [[name, *[row[d] for d in domains], row["mixed"]] for name, row in heldout_rows.items()])
    write_results(args.out, {
        "command": command_line(),
        "demo_settings": demo.config.model_dump(mode="json", exclude={"out"}),
        "public_pool": str(demo.public_pool()),
        "proxy_selection": quality,
        "validation": validation,
        "chosen_on_validation": best,
        "tuning_beats_untuned_on_validation":
            validation[best]["closed_average"] < validation["untuned"]["closed_average"],
        "heldout": heldout_rows,
        "seconds": time.perf_counter() - began,
    })


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
