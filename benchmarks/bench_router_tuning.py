"""Router tuning on owner-selected proxies, on the demo corpora: its settings (chosen on validation text) and what
it changes per domain on the held-out evaluation text.

    .venv/bin/python benchmarks/bench_router_tuning.py --work runs/router-tuning

Steps, each reused when its output exists under --work (so the script resumes after an interruption):
1. Validation text, never the `*.heldout` evaluation files: the 5% hash-held-out documents of each
   `<domain>.train.jsonl.gz` (train-expert's own split, so no expert trains on them). The coordinator's public
   pool, where owners choose proxies and which tuning mixes in, is the anchor's published public sample; public
   validation is the held-out part of `public.train.jsonl.gz` without the sample's documents.
2. Five experts with train-expert's defaults (the anchor's public sample mixed into half of each batch) at the
   demo's sizes, merged at top-2 (`--packages DIR` reuses packages named by domain instead).
3. Per owner, proxies from the public pool with each embedder; the classifier's cross-fitted accuracy.
4. Router tuning over a small grid of (lr, steps) on the anchor-embedder proxies, scored on validation; at the
   best setting, the same tuning with MiniLM proxies and with random public documents as "proxies" (a control:
   is it the selection or just any tuning?).
5. The untuned model and the chosen tunings scored on the held-out evaluation files.
Writes `benchmarks/results/router_tuning.json` (or --out).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from flexolmo.data import iter_documents, select_split
from flexolmo.demo import CLOSED_DOMAINS, PUBLIC, DemoConfig
from flexolmo.evaluate import EvalSettings, evaluate
from flexolmo.expert import ExpertConfig, train_expert
from flexolmo.fileio import atomic_write_bytes, atomic_write_json
from flexolmo.merge import merge
from flexolmo.progress import console, print_table
from flexolmo.proxy import ProxyConfig, read_proxies, select_proxies, text_sha256
from flexolmo.public_sample import PUBLIC_SAMPLE_FILE
from flexolmo.router_tuning import TuneConfig, tune_router
from flexolmo.runtime import load_model
from flexolmo.training import OptimConfig

RESULTS = Path(__file__).parent / "results" / "router_tuning.json"
EMBEDDERS = ("anchor", "minilm")


def write_jsonl_gz(path: Path, texts: list[str]) -> Path:
    if not path.exists():
        lines = "".join(json.dumps({"id": f"{path.stem}-{i}", "text": t}) + "\n" for i, t in enumerate(texts))
        atomic_write_bytes(path, gzip.compress(lines.encode("utf-8"), mtime=0))
    return path


def split_texts(path: Path, split: str) -> list[str]:
    return [document.text for document in select_split(iter_documents(path), split, 0.05)]


def prepare_data(demo: DemoConfig, work: Path) -> dict[str, dict[str, list[Path]]]:
    """Validation and evaluation files per domain, and the coordinator's public pool (the anchor's public sample)."""
    data = work / "data"
    pool = demo.data_dir / "anchor" / PUBLIC_SAMPLE_FILE
    in_pool = {d.text for d in iter_documents(pool)}
    validation = {d: [write_jsonl_gz(data / f"{d}.validation.jsonl.gz",
                                     [t for t in split_texts(demo.data_dir / f"{d}.train.jsonl.gz", "heldout")
                                      if t not in in_pool])]
                  for d in (PUBLIC, *CLOSED_DOMAINS)}
    heldout = {d: [demo.data_dir / f"{d}.heldout.jsonl.gz"] for d in (PUBLIC, *CLOSED_DOMAINS)}
    return {"validation": validation, "heldout": heldout, "pool": [pool]}


def train_experts(demo: DemoConfig, root: Path, negative_bias: bool = False) -> dict[str, Path]:
    """train-expert with its defaults at the demo's sizes; each owner trains on its train split only."""
    packages = {}
    for domain in CLOSED_DOMAINS:
        packages[domain] = root / domain
        if not packages[domain].exists():
            console.rule(f"expert {domain}{' (negative bias)' if negative_bias else ''}")
            train_expert(ExpertConfig(anchor=demo.data_dir / "anchor", data=[demo.data_dir / f"{domain}.train.jsonl.gz"],
                                      name=domain, out=packages[domain], negative_bias=negative_bias,
                                      eval_max_sequences=demo.eval_max_sequences,
                                      optim=demo.optim(demo.expert_steps)),
                         resume=(root / f"{domain}.ckpt" / "checkpoint").exists())
    return packages


def merged(demo: DemoConfig, packages: dict[str, Path], out: Path) -> Path:
    if not out.exists():
        merge(demo.data_dir / "anchor", [packages[d] for d in CLOSED_DOMAINS], out, demo.top_k)
    return out


def scored(model: Path, files: dict[str, list[Path]], cache: Path, demo: DemoConfig, router_bias: bool = False) -> dict:
    """Bits per byte per domain (cached), the demo's evaluation settings."""
    if cache.exists():
        return json.loads(cache.read_text())
    loaded = load_model(model, router_bias=router_bias)
    settings = EvalSettings(seq_len=demo.seq_len, batch_size=8, max_sequences=demo.eval_max_sequences, split="all")
    result = evaluate(loaded.model, loaded.tokenizer, files, settings, loaded.expert_names, str(model))
    scores = {name: score.bits_per_byte for name, score in result.domains.items()}
    scores["closed_average"] = sum(scores[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
    scores["routing"] = {name: score.routing["mean_share"] for name, score in result.domains.items() if score.routing}
    atomic_write_json(cache, scores)
    return scores


def proxies(demo: DemoConfig, data: dict, work: Path, embedder: str, fraction: float,
            max_documents: int) -> tuple[list[Path], dict]:
    files, quality = [], {}
    for domain in CLOSED_DOMAINS:
        out = work / "proxies" / f"{embedder}-{fraction:g}-{max_documents}" / f"{domain}.json"
        if not out.exists():
            console.rule(f"proxies of {domain} ({embedder})")
            select_proxies(ProxyConfig(data=[demo.data_dir / f"{domain}.train.jsonl.gz"], public=data["pool"],
                                       name=domain, out=out, embedder=embedder, anchor=demo.data_dir / "anchor",
                                       fraction=fraction, max_documents=max_documents))
        record = read_proxies(out)
        files.append(out)
        quality[domain] = {k: record["selection"][k] for k in ("heldout_accuracy", "heldout_roc_auc",
                                                                "selected_documents", "selected_bytes")}
    return files, quality


def random_proxies(reference: list[Path], data: dict, work: Path) -> list[Path]:
    """The control: as many random public documents as each owner's real proxies, in the proxy format."""
    pool = sorted({text_sha256(d.text) for path in data["pool"] for d in iter_documents(path)})
    files = []
    for offset, path in enumerate(reference):
        record = read_proxies(path)
        out = work / "proxies" / "random" / path.name
        if not out.exists():
            import random

            chosen = random.Random(offset).sample(pool, len(record["proxies"]))
            atomic_write_json(out, {**record, "proxies": chosen,
                                    "selection": {"embedder": "random (control)"}})
        files.append(out)
    return files


def tuned(model: Path, data: dict, proxy_files: list[Path], out: Path, demo: DemoConfig, lr: float, steps: int,
          public_share: float) -> Path:
    if not out.exists():
        console.rule(f"router tuning {out.name}")
        optim = OptimConfig(steps=steps, batch_size=demo.batch_size, seq_len=demo.seq_len, lr=lr,
                            warmup_steps=max(1, steps // 10), checkpoint_every=max(1, steps // 2), seed=demo.seed)
        tune_router(TuneConfig(model=model, public=data["pool"], proxies=proxy_files, out=out,
                               public_share=public_share, optim=optim),
                    resume=out.with_name(out.name + ".ckpt").exists())
    return out


def refuse_other_settings(work: Path, script: str, settings: dict) -> None:
    """One --work directory holds the outputs of one setting: its cached steps are reused only by the same one."""
    path = work / f"{script}.settings.json"
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{work} holds a run with other settings ({path}); pass another --work")
    atomic_write_json(path, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/router-tuning"))
    parser.add_argument("--packages", type=Path, default=None, help="reuse expert packages DIR/<domain>")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--steps", type=int, nargs="+", default=[40])
    parser.add_argument("--public-share", type=float, default=0.5)
    parser.add_argument("--fraction", type=float, default=0.005, help="proxy bytes / owner bytes")
    parser.add_argument("--max-documents", type=int, default=1000, help="owner documents to fit each classifier")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    demo = DemoConfig()
    began = time.perf_counter()
    work = args.work
    refuse_other_settings(work, "bench_router_tuning", {k: v for k, v in vars(args).items()
                                                                  if k not in ("out", "lrs", "steps")})
    data = prepare_data(demo, work)
    packages = ({d: args.packages / d for d in CLOSED_DOMAINS} if args.packages
                else train_experts(demo, work / "experts"))
    base = merged(demo, packages, work / "models" / "untuned")
    evals = work / "evals"
    anchor = demo.data_dir / "anchor"
    results = {"anchor": {split: scored(anchor, data[split], evals / f"anchor.{split}.json", demo)
                          for split in ("validation", "heldout")},
               "untuned": {"validation": scored(base, data["validation"], evals / "untuned.validation.json", demo)}}
    proxy_files, quality = {}, {}
    for embedder in EMBEDDERS:
        proxy_files[embedder], quality[embedder] = proxies(demo, data, work, embedder, args.fraction,
                                                           args.max_documents)
    grid = {}
    for lr in args.lrs:
        for steps in args.steps:
            name = f"anchor-lr{lr:g}-steps{steps}"
            model = tuned(base, data, proxy_files["anchor"], work / "models" / name, demo, lr, steps, args.public_share)
            grid[name] = {"lr": lr, "steps": steps,
                          "validation": scored(model, data["validation"], evals / f"{name}.validation.json", demo)}
    best = min(grid, key=lambda name: grid[name]["validation"]["closed_average"])
    lr, steps = grid[best]["lr"], grid[best]["steps"]
    results.update(grid)
    controls = {"minilm": proxy_files["minilm"], "random": random_proxies(proxy_files["anchor"], data, work)}
    for label, files in controls.items():
        name = f"{label}-lr{lr:g}-steps{steps}"
        model = tuned(base, data, files, work / "models" / name, demo, lr, steps, args.public_share)
        results[name] = {"lr": lr, "steps": steps,
                         "validation": scored(model, data["validation"], evals / f"{name}.validation.json", demo)}
    # Held-out evaluation, once, for the untuned model and the tunings at the chosen setting.
    for name in ("untuned", best, f"minilm-lr{lr:g}-steps{steps}", f"random-lr{lr:g}-steps{steps}"):
        model = work / "models" / name
        results[name]["heldout"] = scored(model, data["heldout"], evals / f"{name}.heldout.json", demo)
    domains = [PUBLIC, *CLOSED_DOMAINS, "closed_average"]
    for split in ("validation", "heldout"):
        rows = [[name, *[r[split][d] for d in domains]] for name, r in results.items() if split in r]
        print_table(f"bits per byte on {split} text", ["model", *domains], rows)
    payload = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "settings": {"expert_steps": demo.expert_steps, "batch_size": demo.batch_size, "seq_len": demo.seq_len,
                     "eval_max_sequences": demo.eval_max_sequences, "top_k": demo.top_k,
                     "public_share": args.public_share, "proxy_fraction": args.fraction,
                     "proxy_max_documents": args.max_documents},
        "proxy_selection": quality, "chosen_on_validation": best, "results": results,
        "seconds": time.perf_counter() - began,
    }
    atomic_write_json(args.out, payload)


if __name__ == "__main__":
    main()
