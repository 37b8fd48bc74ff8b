"""PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --workdir /tmp/flexolmo-bench-serve

(run from the repository root; loopback only; a fixed number of requests, so it stops by itself.)

Serving a merged model with `flexolmo serve`'s app, in this process on 127.0.0.1, queried over HTTP with the
official `openai` client from `--streams` concurrent client threads, each sending `--requests` greedy
completions of `--max-tokens` tokens one after another.

Model (not measured): `bench_load.py`'s small synthetic merge (hidden 128, 2 layers, FFN 512, vocab 4096, the
demo anchor's tokenizer; public + 4 experts, top-2), built in --workdir when missing.

Measured, in one run, on the same prompts:
- `different_masks`: every stream with its own allow-list (the 8 subsets of experts 1-3, narrowed through the
  request's `experts` field): what a consortium's mixed users cost;
- `same_mask`: the same streams, every request with all experts;
- `generate_sequential`: transformers `generate` (KV cache, batch 1) on the same checkpoint, one request at a
  time, each with its mask set for the whole model (`LoadedModel.exclude`).
Reported: completion tokens/s, request latency p50/p95 (HTTP modes), errors, and how many responses differ from
the request's solo greedy run with the same exclusions (must be 0). Results: `benchmarks/results/serve.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import DEMO_ANCHOR, EXPERTS, SMALL_SHAPE
from bench_merge import write_anchor, write_expert

RESULTS = Path(__file__).parent / "results" / "serve.json"
WORDS = ["the", "of", "and", "river", "city", "music", "science", "language", "country", "people", "century", "war", "king", "water", "animal"]


def build_model(workdir: Path) -> Path:
    """A small merge of `bench_load.py`'s shape: the shipped demo anchor's tokenizer and synthetic experts."""
    import shutil

    from flexolmo.coordinator.merge import merge
    from flexolmo.model.anchor import load_anchor
    from flexolmo.owner.expert import anchor_record

    merged, anchor = workdir / "merged", workdir / "anchor"
    if merged.exists():
        return merged
    if not anchor.exists():
        write_anchor(anchor, SMALL_SHAPE, seed=0, shard_bytes=1 << 30)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(DEMO_ANCHOR / name, anchor / name)
    record = anchor_record(load_anchor(anchor, with_model=False))
    packages = [workdir / f"expert{index}" for index in range(EXPERTS)]
    for index, package in enumerate(packages):
        if not package.exists():
            write_expert(package, f"expert{index}", SMALL_SHAPE, seed=index + 1, anchor_record=record)
    merge(anchor, packages, merged, top_k=2)
    return merged


def prompts(count: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=generator))
            for _ in range(count)]


def allow_lists(owners: list[str], streams: int) -> list[list[str]]:
    """`streams` different subsets of the owners' experts (public is always on)."""
    subsets = [list(subset) for size in range(len(owners) + 1) for subset in combinations(owners, size)]
    return subsets[:streams]


def run_http(url: str, cases: list[tuple[str, list[str] | None]], streams: int, max_tokens: int) -> dict:
    """Send every case, `streams` at a time; cases[i] goes to stream i % streams."""
    import openai

    client = openai.OpenAI(api_key="bench", base_url=f"{url}/v1", max_retries=0, timeout=300)

    def one(case):
        prompt, experts = case
        start = time.perf_counter()
        response = client.completions.create(model="merged", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             extra_body=None if experts is None else {"experts": experts})
        return response, time.perf_counter() - start

    def stream(index):
        return [one(case) for case in cases[index::streams]]

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        per_stream = list(pool.map(stream, range(streams)))
    wall = time.perf_counter() - start
    results = {case: result for index in range(streams)
               for case, result in zip(range(index, len(cases), streams), per_stream[index])}
    latencies = sorted(latency for _, latency in results.values())
    tokens = sum(response.usage.completion_tokens for response, _ in results.values())
    return {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "texts": [results[index][0].choices[0].text for index in range(len(cases))]}


@torch.no_grad()
def run_generate(loaded, cases: list[tuple[str, list[str] | None]], max_tokens: int) -> dict:
    start, tokens, texts = time.perf_counter(), 0, []
    for prompt, experts in cases:
        loaded.exclude([] if experts is None else [n for n in loaded.expert_names[1:] if n not in experts])
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = loaded.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.eos_token_id)[0, ids.shape[1]:]
        tokens += len(out)
        texts.append(loaded.tokenizer.decode(out, skip_special_tokens=True))
    loaded.exclude([])
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "texts": texts}


@torch.no_grad()
def solo_text(loaded, prompt: str, experts: list[str] | None, max_tokens: int) -> str:
    """The request's greedy completion alone, with its exclusions for the whole model and no cache."""
    loaded.exclude([] if experts is None else [n for n in loaded.expert_names[1:] if n not in experts])
    ids, out = loaded.tokenizer(prompt)["input_ids"], []
    while len(out) < max_tokens:
        out.append(int(loaded.model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        if out[-1] == loaded.tokenizer.eos_token_id:
            break
    loaded.exclude([])
    return loaded.tokenizer.decode(out, skip_special_tokens=True)


def main() -> None:
    from flexolmo.model.runtime import load_model
    from flexolmo.serve.server import ModelServer, ServeOptions
    from flexolmo.serve.threaded import running_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flexolmo-bench-serve"))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per stream")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(build_model(args.workdir))
    masks = allow_lists(loaded.expert_names[1:4], args.streams)
    texts = prompts(args.streams * args.requests)
    different = [(prompt, masks[index % args.streams]) for index, prompt in enumerate(texts)]
    same = [(prompt, None) for prompt in texts]
    server = ModelServer(loaded, ServeOptions(max_batch=args.streams))
    with running_server(server) as url:
        run_http(url, same[: args.streams], args.streams, 4)  # warm-up, not measured
        modes = {"different_masks": run_http(url, different, args.streams, args.max_tokens),
                 "same_mask": run_http(url, same, args.streams, args.max_tokens)}
    modes["generate_sequential"] = run_generate(loaded, different, args.max_tokens)
    expected = [solo_text(loaded, prompt, experts, args.max_tokens) for prompt, experts in different]
    mismatches = sum(got != want for got, want in zip(modes["different_masks"]["texts"], expected))
    for mode in modes.values():
        mode.pop("texts")
    result = {
        "command": shlex.join(["benchmarks/bench_serve.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"shape": SMALL_SHAPE, "experts": loaded.expert_names, "top_k": 2},
        "streams": args.streams, "requests": len(texts), "max_tokens": args.max_tokens, "modes": modes,
        "different_masks_over_same_mask": round(modes["different_masks"]["tokens_per_s"]
                                                / modes["same_mask"]["tokens_per_s"], 3),
        "different_masks_over_sequential_generate": round(modes["different_masks"]["tokens_per_s"]
                                                          / modes["generate_sequential"]["tokens_per_s"], 3),
        "responses_differing_from_solo_run": mismatches, "errors": 0,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
