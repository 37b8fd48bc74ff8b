""".venv/bin/python benchmarks/bench_load.py --workdir /tmp/flexolmo-bench-load

(run from the repository root; `--small` is a quick check of the harness whose numbers mean nothing.)

Loading a merged FlexOlmo checkpoint: `flexolmo.model.runtime.load_model` against transformers' own
`AutoModelForCausalLM.from_pretrained` (which builds `FlexOlmoForCausalLM` on the meta device and fills it from
the checkpoint), on the same files, in the same dtype.

Setup (not measured): a synthetic OLMo-2 anchor (hidden 1024, 8 layers, FFN 4096, vocab 50304) and 4 expert
packages, written by `bench_merge.py`'s writers, merged with `flexolmo.coordinator.merge.merge` into a 5-expert model
(640M parameters, 1.3 GB in bf16), with the demo anchor's tokenizer files.

Measured, each load in its own child process (so that its memory is its own), `--repeats` times, best time kept:
- `transformers`: `AutoModelForCausalLM.from_pretrained(merged, dtype=bf16)`;
- `flexolmo`: `load_model(merged, dtype=bf16)` (transformers OLMo-2 with our MoE block; no random
  initialisation, the checkpoint copied in one tensor at a time);
- `random_init`: only `from_config` plus `convert_to_moe` with transformers' random initialisation left on: what
  a loader that initialises before loading pays on top of the copy (the runtime did this before).
Peak memory is the child's VmHWM minus its RSS after imports. Both real loaders' logits on a fixed input are
compared (max |difference|), so a fast but wrong loader cannot pass. Results: a table and
`benchmarks/results/load.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import argument_parser, command_line, results_file, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import read_status, write_anchor, write_expert  # noqa: E402  (sibling benchmark's writers)

REPO = Path(__file__).resolve().parent.parent
DEMO_ANCHOR = REPO / "data" / "demo" / "anchor"
RESULTS = results_file("load.json")
SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "intermediate_size": 4096,
         "vocab_size": 50304}
SMALL_SHAPE = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
               "vocab_size": 4096}
EXPERTS = 4
LOADERS = ("transformers", "flexolmo", "random_init")


def child_main(spec: dict) -> None:
    """Load once and print seconds, memory and (for real loaders) where the logits were saved."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from transformers import AutoModelForCausalLM

    from flexolmo.model.merged_format import read_merged_info
    from flexolmo.model.moe import convert_to_moe
    from flexolmo.model.runtime import _dense_config, load_model

    path, dtype = Path(spec["model"]), torch.bfloat16
    before = read_status()
    start = time.perf_counter()
    if spec["loader"] == "transformers":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif spec["loader"] == "flexolmo":
        model = load_model(path, dtype=dtype).model
    else:
        config = read_merged_info(path).config
        model = AutoModelForCausalLM.from_config(_dense_config(config), dtype=dtype)
        experts = config["num_experts"]
        convert_to_moe(model, [torch.zeros(experts, config["hidden_size"])] * config["num_hidden_layers"],
                       experts, top_k=config["num_experts_per_tok"])
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "baseline_rss": before["VmRSS"], "vm_hwm": read_status()["VmHWM"]}
    if spec["loader"] != "random_init":
        ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save(model(ids).logits.float(), spec["logits"])
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"loader '{spec['loader']}' failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def build_model(workdir: Path, shape: dict) -> Path:
    """Anchor, packages and their merge (skipped when the merge already exists)."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.model.anchor import compute_fingerprint, read_config
    from flexolmo.owner.expert import anchor_record

    merged = workdir / "merged"
    if merged.exists():
        return merged
    anchor = workdir / "anchor"
    if not anchor.exists():
        write_anchor(anchor, shape, seed=0, shard_bytes=1 << 30)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # loaders need one; its vocabulary is not used
            shutil.copyfile(DEMO_ANCHOR / name, anchor / name)
    record = anchor_record(compute_fingerprint(anchor), read_config(anchor))
    packages = []
    for index in range(EXPERTS):
        package = workdir / f"expert{index}"
        if not package.exists():
            write_expert(package, f"expert{index}", shape, seed=index + 1, anchor_record=record)
        packages.append(package)
    merge(anchor, packages, merged, top_k=2)
    return merged


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/flexolmo-bench-load"),
                        help="where the synthetic anchor, packages and merged model are built (reused when present)")
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader, each in a child process; best kept")
    parser.add_argument("--small", action="store_true",
                        help="tiny model (hidden 128, 2 layers): a harness check whose numbers mean nothing")
    parser.add_argument("--results", type=Path,
                        help="JSON output (default benchmarks/results/load.json; with --small, WORKDIR/load.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one load, in a child process
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    sys.path.insert(0, str(REPO / "src"))
    import torch

    shape = SMALL_SHAPE if args.small else SHAPE
    results_path = args.results or (args.workdir / "load.json" if args.small else RESULTS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    merged = build_model(args.workdir, shape)
    checkpoint_bytes = sum(file.stat().st_size for file in merged.glob("*.safetensors"))
    runs: dict[str, list[dict]] = {loader: [] for loader in LOADERS}
    for repeat in range(args.repeats):
        for loader in LOADERS:  # interleaved, so that drift in the machine's speed hits every loader alike
            logits = args.workdir / f"logits-{loader}.pt"
            runs[loader].append(run_child({"loader": loader, "model": str(merged), "logits": str(logits)}))
    best = {loader: min(runs[loader], key=lambda run: run["seconds"]) for loader in LOADERS}
    peak = {loader: max(run["vm_hwm"] - run["baseline_rss"] for run in runs[loader]) for loader in LOADERS}
    difference = float((torch.load(args.workdir / "logits-transformers.pt")
                        - torch.load(args.workdir / "logits-flexolmo.pt")).abs().max())
    summary = {
        "command": command_line(),
        "shape": shape, "experts": 1 + EXPERTS, "checkpoint_bytes": checkpoint_bytes,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "seconds": {loader: best[loader]["seconds"] for loader in LOADERS},
        "peak_memory_bytes": peak,
        "flexolmo_over_transformers_time": best["flexolmo"]["seconds"] / best["transformers"]["seconds"],
        "flexolmo_over_transformers_memory": peak["flexolmo"] / peak["transformers"],
        "flexolmo_memory_over_checkpoint": peak["flexolmo"] / checkpoint_bytes,
        "random_init_over_flexolmo_time": best["random_init"]["seconds"] / best["flexolmo"]["seconds"],
        "max_abs_logit_difference": difference,
        "runs": runs,
    }
    write_results(results_path, summary)
    print(f"checkpoint {checkpoint_bytes / 1e9:.2f} GB, {1 + EXPERTS} experts, bf16, best of {args.repeats}")
    print(f"{'loader':<14}{'seconds':>10}{'peak MB':>10}")
    for loader in LOADERS:
        print(f"{loader:<14}{best[loader]['seconds']:>10.2f}{peak[loader] / 1e6:>10.0f}")
    print(f"flexolmo / transformers: time {summary['flexolmo_over_transformers_time']:.2f}, memory "
          f"{summary['flexolmo_over_transformers_memory']:.2f}; logits max |diff| {difference:.2e}")


if __name__ == "__main__":
    main()
