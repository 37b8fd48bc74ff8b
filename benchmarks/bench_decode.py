""".venv/bin/python benchmarks/bench_decode.py --workdir /tmp/flexolmo-bench-load

(run from the repository root; the workdir is shared with `bench_load.py`, whose merged model is reused when it
exists; `--small` is a quick check of the harness whose numbers mean nothing.)

Running a merged FlexOlmo checkpoint: flexolmo's runtime (`flexolmo.model.runtime.load_model`: transformers' OLMo-2
with each FFN replaced by our FlexMoEBlock) against transformers' own `FlexOlmoForCausalLM`
(`AutoModelForCausalLM.from_pretrained`), both loaded from the same directory in the same dtype, in one process.

Model (not measured): `bench_load.py`'s synthetic 5-expert merge (hidden 1024, 8 layers, FFN 4096, vocab 50304,
top-2 of 5; 640M parameters), built in --workdir when missing.

Measured, for each runtime, `--rounds` times with the two runtimes alternated (and the first of each round
swapped every round, so that drift in the machine's speed hits both alike), best round kept, in wall time and
in this process's CPU time (on a machine shared with other work, CPU time with `--threads 1` is the steadier
of the two: it leaves out the time spent waiting for a core):
- `decode_b1`: greedy `generate` of `--new-tokens` tokens after a 32-token prompt, batch 1 (tokens/s);
- `decode_b8`: the same with 8 different prompts at once (tokens/s over the batch);
- `forward`: one forward of `--long-batch` x `--long-seq` tokens without a cache (tokens/s);
- `decode_b1_masked` (flexolmo only): `decode_b1` with one expert masked by `exclude`, which must cost nothing;
- `block_T` for T = 1, 8 and the long forward's token count: layer 0's MoE block alone (our FlexMoEBlock against
  transformers' FlexOlmoSparseMoeBlock) on the same hidden states, `--block-reps` alternated calls, best kept.
  Short calls, so best-of-many finds quiet moments even on a busy machine (`--blocks-only` runs just these).
Before timing, outputs are compared and the script stops if they differ: generated tokens must be equal, and
the long forward's logits within `--tolerance` (max |difference|). Results: a table and
`benchmarks/results/decode.json` (with `--small`, a file in --workdir).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from common import argument_parser, results_file, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import SHAPE, SMALL_SHAPE, build_model  # noqa: E402  (sibling benchmark's model)

REPO = Path(__file__).resolve().parent.parent
RESULTS = results_file("decode.json")
PROMPT_TOKENS = 32
DECODE_BATCH = 8
WORKLOADS = ("decode_b1", "decode_b8", "forward")


def prompts(batch: int, vocab: int, seed: int):
    import torch

    return torch.randint(2, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new_tokens: int):
    """Exactly `new_tokens` greedy tokens per row (end-of-text suppressed, so every run does the same work)."""
    import torch

    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)
    return out[:, ids.shape[1]:]


def long_forward(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def timed(function, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def block_timings(models: dict, hidden_size: int, token_counts: list[int], reps: int) -> dict:
    """Best seconds of one call of layer 0's MoE block per runtime, for each token count; outputs compared."""
    import torch

    blocks = {name: model.model.layers[0].mlp for name, model in models.items()}
    dtype = next(blocks["flexolmo"].parameters()).dtype
    timings = {}
    for tokens in token_counts:
        hidden = torch.randn(1, tokens, hidden_size, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        best = {name: float("inf") for name in blocks}
        with torch.inference_mode():
            difference = float((blocks["flexolmo"](hidden) - blocks["transformers"](hidden)).abs().max())
            for _ in range(reps if tokens < 256 else max(3, reps // 50)):
                for name, block in blocks.items():
                    start = time.perf_counter()
                    block(hidden)
                    best[name] = min(best[name], time.perf_counter() - start)
        timings[f"block_{tokens}"] = {"seconds": best, "max_abs_difference": difference,
                                      "flexolmo_over_transformers": best["transformers"] / best["flexolmo"]}
    return timings


def check_equal(models: dict, inputs: dict, new_tokens: int, tolerance: float) -> dict:
    """Stop unless both runtimes give the same greedy tokens and logits within `tolerance`."""
    checks = {}
    for workload in ("decode_b1", "decode_b8"):
        tokens = {name: greedy(model, inputs[workload], new_tokens) for name, model in models.items()}
        if not (tokens["flexolmo"] == tokens["transformers"]).all():
            raise SystemExit(f"{workload}: greedy tokens differ between the runtimes")
        checks[f"{workload}_tokens_equal"] = True
    logits = {name: long_forward(model, inputs["forward"]).float() for name, model in models.items()}
    difference = float((logits["flexolmo"] - logits["transformers"]).abs().max())
    scale = float(logits["transformers"].abs().max())
    if difference > tolerance:
        raise SystemExit(f"forward: max |logit difference| {difference:.2e} exceeds the tolerance {tolerance:g}")
    checks.update(forward_max_abs_logit_difference=difference, forward_max_abs_logit=scale,
                  forward_tokens_equal=bool((logits["flexolmo"].argmax(-1) == logits["transformers"].argmax(-1))
                                            .all()))
    return checks


def parse_args() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flexolmo-bench-load"),
                        help="where the merged model is built, or reused (shared with bench_load.py)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated rounds of every workload per runtime; the best is kept")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per decode run")
    parser.add_argument("--long-batch", type=int, default=8, help="batch size of the long forward")
    parser.add_argument("--long-seq", type=int, default=256, help="sequence length of the long forward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype both runtimes load the model in")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |logit difference| allowed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--block-reps", type=int, default=200, help="calls per runtime of each small block")
    parser.add_argument("--blocks-only", action="store_true", help="time only the MoE blocks")
    parser.add_argument("--small", action="store_true",
                        help="tiny model (hidden 128, 2 layers): a harness check whose numbers mean nothing")
    parser.add_argument("--results", type=Path,
                        help="JSON output (default benchmarks/results/decode.json; with --small, WORKDIR/decode.json)")
    return parser.parse_args()


def load_both(merged: Path, dtype_name: str):
    """flexolmo's loaded model and both runtimes' modules, {"flexolmo", "transformers"}, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexolmo.model.runtime import load_model

    dtype = getattr(torch, dtype_name)
    ours = load_model(merged, dtype=dtype)
    models = {"flexolmo": ours.model, "transformers": AutoModelForCausalLM.from_pretrained(merged, dtype=dtype)}
    for model in models.values():
        model.eval()
    return ours, models


def workload_inputs(args: argparse.Namespace, vocab: int) -> tuple[dict, dict]:
    """The input ids of each workload, and the tokens one run of it produces or reads."""
    import torch

    inputs = {"decode_b1": prompts(1, vocab, seed=1), "decode_b8": prompts(DECODE_BATCH, vocab, seed=2),
              "forward": torch.randint(2, vocab, (args.long_batch, args.long_seq),
                                       generator=torch.Generator().manual_seed(3))}
    tokens_per_run = {"decode_b1": args.new_tokens, "decode_b8": DECODE_BATCH * args.new_tokens,
                      "forward": args.long_batch * args.long_seq}
    return inputs, tokens_per_run


def print_blocks(blocks: dict) -> None:
    print(f"{'block (layer 0)':<18}{'flexolmo ms':>16}{'transformers ms':>20}{'ratio':>8}{'max |diff|':>12}")
    for name, timing in blocks.items():
        print(f"{name:<18}{timing['seconds']['flexolmo'] * 1e3:>16.3f}{timing['seconds']['transformers'] * 1e3:>20.3f}"
              f"{timing['flexolmo_over_transformers']:>8.2f}{timing['max_abs_difference']:>12.1e}")


def run_description(args: argparse.Namespace, shape: dict, ours, models: dict, blocks: dict) -> dict:
    """What every result file records: the command, the model, the software and the block timings."""
    import torch
    import transformers

    return {"command": "python " + shlex.join(sys.argv), "shape": shape, "experts": len(ours.expert_names),
            "top_k": models["transformers"].config.num_experts_per_tok, "dtype": args.dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
            "experts_implementation": models["transformers"].config._experts_implementation, "blocks": blocks}


def alternated_rounds(ours, models: dict, inputs: dict, args: argparse.Namespace, masked_expert: str):
    """(wall, CPU) seconds of every run per workload and runtime, the first runtime swapped every round, and
    the seconds each `exclude` of `masked_expert` took."""

    def run(name: str, workload: str) -> tuple[float, float]:
        if workload == "forward":
            return timed(long_forward, models[name], inputs[workload])
        return timed(greedy, models[name], inputs[workload], args.new_tokens)

    runs: dict[str, dict[str, list[tuple[float, float]]]] = {w: {"flexolmo": [], "transformers": []}
                                                             for w in WORKLOADS}
    runs["decode_b1_masked"] = {"flexolmo": []}
    exclude_seconds = []
    for round_ in range(args.rounds):
        order = ["flexolmo", "transformers"] if round_ % 2 == 0 else ["transformers", "flexolmo"]
        for workload in WORKLOADS:
            for name in order:
                runs[workload][name].append(run(name, workload))
        exclude_seconds.append(timed(ours.exclude, [masked_expert])[0])
        runs["decode_b1_masked"]["flexolmo"].append(run("flexolmo", "decode_b1"))
        ours.exclude([])
    return runs, exclude_seconds


def summarise(common: dict, args: argparse.Namespace, runs: dict, exclude_seconds: list[float],
              tokens_per_run: dict, checks: dict, masked_expert: str) -> dict:
    """The result file's contents: every run's seconds, the best round's rates and the runtimes' ratios."""
    seconds = {w: {name: [wall for wall, _ in times] for name, times in by_name.items()}
               for w, by_name in runs.items()}
    cpu_seconds = {w: {name: [cpu for _, cpu in times] for name, times in by_name.items()}
                   for w, by_name in runs.items()}
    best = {w: {name: min(times) for name, times in by_name.items()} for w, by_name in seconds.items()}
    best_cpu = {w: {name: min(times) for name, times in by_name.items()} for w, by_name in cpu_seconds.items()}
    rate = {w: {name: tokens_per_run[w.removesuffix("_masked")] / s for name, s in by_name.items()}
            for w, by_name in best.items()}
    return {
        **common, "rounds": args.rounds,
        "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS, "decode_batch": DECODE_BATCH,
        "long_forward": [args.long_batch, args.long_seq], "checks": checks, "masked_expert": masked_expert,
        "exclude_seconds": min(exclude_seconds),
        "tokens_per_second": rate,
        "flexolmo_over_transformers": {w: rate[w]["flexolmo"] / rate[w]["transformers"] for w in WORKLOADS},
        "flexolmo_over_transformers_cpu_time": {w: best_cpu[w]["transformers"] / best_cpu[w]["flexolmo"]
                                                for w in WORKLOADS},
        "masked_over_unmasked_decode_b1": rate["decode_b1_masked"]["flexolmo"] / rate["decode_b1"]["flexolmo"],
        "seconds": seconds, "cpu_seconds": cpu_seconds,
    }


def print_summary(merged: Path, summary: dict, args: argparse.Namespace, threads: int) -> None:
    rate, checks = summary["tokens_per_second"], summary["checks"]
    print(f"{merged}: {summary['experts']} experts, top-{summary['top_k']}, {args.dtype}, "
          f"{threads} threads, best of {args.rounds} alternated rounds")
    print(f"{'workload':<18}{'flexolmo tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}{'ratio (CPU time)':>18}")
    for workload in WORKLOADS:
        print(f"{workload:<18}{rate[workload]['flexolmo']:>16.1f}{rate[workload]['transformers']:>20.1f}"
              f"{summary['flexolmo_over_transformers'][workload]:>8.2f}"
              f"{summary['flexolmo_over_transformers_cpu_time'][workload]:>18.2f}")
    print(f"{'decode_b1_masked':<18}{rate['decode_b1_masked']['flexolmo']:>16.1f}{'-':>20}"
          f"{summary['masked_over_unmasked_decode_b1']:>8.2f} (vs flexolmo unmasked; exclude took "
          f"{summary['exclude_seconds'] * 1e3:.2f} ms)")
    print(f"greedy tokens equal; long forward max |logit diff| {checks['forward_max_abs_logit_difference']:.2e} "
          f"(max |logit| {checks['forward_max_abs_logit']:.1f})")


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMALL_SHAPE if args.small else SHAPE
    results_path = args.results or (args.workdir / "decode.json" if args.small else RESULTS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    merged = build_model(args.workdir, shape)
    ours, models = load_both(merged, args.dtype)
    inputs, tokens_per_run = workload_inputs(args, shape["vocab_size"])
    blocks = block_timings(models, shape["hidden_size"], [1, 8, args.long_batch * args.long_seq], args.block_reps)
    print_blocks(blocks)
    common = run_description(args, shape, ours, models, blocks)
    if args.blocks_only:
        write_results(results_path, common)
        return
    checks = check_equal(models, inputs, args.new_tokens, args.tolerance)
    masked_expert = ours.expert_names[1]
    runs, exclude_seconds = alternated_rounds(ours, models, inputs, args, masked_expert)
    summary = summarise(common, args, runs, exclude_seconds, tokens_per_run, checks, masked_expert)
    write_results(results_path, summary)
    print_summary(merged, summary, args, torch.get_num_threads())


if __name__ == "__main__":
    main()
