""".venv/bin/python benchmarks/bench_merge.py --workdir /tmp/flexolmo-bench-merge

(run from the repository root; `--small` is a one-minute check of the harness whose numbers mean nothing,
`--estimate` prints the sizes and the disk space the run needs and writes nothing.)

Merge of a synthetic OLMo-2 anchor of at least 1B parameters with 4 expert packages, timed against a plain file
copy of the same bytes, with peak memory set against the output size.

Setup (not measured): a random bf16 anchor shaped like OLMo-1B (hidden 2048, 16 layers, 16 heads, FFN 8192,
vocab 50304, untied head; 1.28B parameters) is written tensor by tensor through `flexolmo.core.tensor_io.ShardedWriter`,
so the whole model is never in memory; its public router rows are written with `save_public_rows`. Then 4 expert
packages (per layer gate/up/down bf16 and a (1, hidden) router row) are written one at a time with
`write_package`, each carrying the anchor's fingerprint. Values are a seeded random block per tensor, repeated to
fill it: the merge copies bytes and never looks at values.

Measured, each in its own child process so that its memory is its own:
- copy: `shutil.copyfile` of every file the merge reads (anchor shards, public router rows, the 4 packages'
  `expert.safetensors`) into a scratch directory;
- merge: `flexolmo.coordinator.merge.merge(anchor, packages, out, top_k=2, shard_bytes=S)` for S = 512 MiB and S = 2 GiB
  (merge's default). The merge also verifies its inputs first (anchor fingerprint over every tensor, SHA-256
  of every package file); that share is timed separately and reported.
Before each measured run the parent flushes dirty pages (`os.sync`, untimed) and reads every input file once
(like `cat files > /dev/null`), so both the copy and the merges start from a warm page cache. Timings stop when
the operation returns; the `os.sync` that then writes the output's remaining dirty pages to disk is timed
separately and reported (`sync_s`). Memory: the peak RSS is the child's own VmHWM (exact; getrusage's
`ru_maxrss` is not used, as Linux carries it across execve from the forking parent). The parent also polls the
child's /proc/PID/status every 20 ms for RssAnon (memory the process allocated) and RssFile (file pages mapped
into it: safetensors memory-maps its inputs, and those pages count in RSS although the kernel can drop them at
will). Each child's RSS after its imports, before the operation, is reported as its baseline.

Afterwards each output is checked: it opens lazily with `LazyReader`, has `model.safetensors.index.json`, the
expected tensor count, and sampled tensors equal their sources. Results: a table on stdout and
`benchmarks/results/merge.json` (with `--small`, a file under /tmp unless `--results` is given). The scratch
data is deleted at the end unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import argument_parser, write_results

REPO = Path(__file__).resolve().parent.parent
MIB = 1024**2
POLL_SECONDS = 0.02

FULL_SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
              "intermediate_size": 8192, "vocab_size": 50304}
SMALL_SHAPE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 1024, "vocab_size": 4096}
FULL_SHARDS_MIB = (512, 2048)          # merge shard sizes measured; 2048 MiB is merge's default
SMALL_SHARDS_MIB = (2, 8)
FULL_ANCHOR_SHARD_MIB = 1024
SMALL_ANCHOR_SHARD_MIB = 2
BF16 = 2
FP32 = 4
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------------
# Shapes and sizes (no torch needed, so --estimate is instant)
# ----------------------------------------------------------------------------------------------------------

def anchor_specs(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a transformers OLMo-2 model (untied head, no biases), in file order."""
    hidden, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((f"{prefix}.self_attn.{proj}.weight", (hidden, hidden)))
        specs.append((f"{prefix}.self_attn.q_norm.weight", (hidden,)))
        specs.append((f"{prefix}.self_attn.k_norm.weight", (hidden,)))
        specs.append((f"{prefix}.post_attention_layernorm.weight", (hidden,)))
        specs.append((f"{prefix}.post_feedforward_layernorm.weight", (hidden,)))
        specs.append((f"{prefix}.mlp.gate_proj.weight", (inter, hidden)))
        specs.append((f"{prefix}.mlp.up_proj.weight", (inter, hidden)))
        specs.append((f"{prefix}.mlp.down_proj.weight", (hidden, inter)))
    specs.append(("model.norm.weight", (hidden,)))
    specs.append(("lm_head.weight", (vocab, hidden)))
    return specs


def sizes(shape: dict, experts: int) -> dict:
    """Parameter counts and bytes of the inputs and of the merged output."""
    layers, hidden, inter = shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]
    anchor_params = sum(math.prod(s) for _, s in anchor_specs(shape))
    ffn_params = layers * 3 * hidden * inter                      # one expert's FFN, all layers
    shared_params = anchor_params - ffn_params
    package_bytes = ffn_params * BF16 + layers * hidden * FP32     # + router rows (fp32), headers ignored
    output_params = shared_params + (1 + experts) * ffn_params + layers * (1 + experts) * hidden
    bytes_in = anchor_params * BF16 + layers * hidden * FP32 + experts * package_bytes
    bytes_out = output_params * BF16
    return {"anchor_params": anchor_params, "expert_ffn_params": ffn_params, "output_params": output_params,
            "anchor_bytes": anchor_params * BF16, "package_bytes": package_bytes, "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            # inputs stay on disk; the copy and each merge output are deleted before the next run
            "peak_disk_bytes": bytes_in + max(bytes_in, bytes_out)}


# ----------------------------------------------------------------------------------------------------------
# Memory of a process
# ----------------------------------------------------------------------------------------------------------

def read_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in bytes ({} once it is gone)."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in wanted:
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


# ----------------------------------------------------------------------------------------------------------
# Children: the measured operations
# ----------------------------------------------------------------------------------------------------------

def child_main(spec: dict) -> None:
    """Run one measured operation and print its result as one JSON line."""
    result: dict = {}
    if spec["op"] == "copy":
        before = read_status()
        start = time.perf_counter()
        out = Path(spec["out"])
        out.mkdir(parents=True)
        for source, target in spec["files"]:
            shutil.copyfile(source, out / target)
        result["seconds"] = time.perf_counter() - start
    else:
        sys.path.insert(0, str(REPO / "src"))
        import flexolmo.coordinator.merge as merge_module

        verify_seconds = {"anchor_fingerprint": 0.0, "packages": 0.0}

        def timed(key, function):
            def wrapper(*args, **kwargs):
                begin = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    verify_seconds[key] += time.perf_counter() - begin
            return wrapper

        # Time the input verification the merge does before writing (same functions, only wrapped).
        merge_module.compute_fingerprint = timed("anchor_fingerprint", merge_module.compute_fingerprint)
        merge_module._verified_packages = timed("packages", merge_module._verified_packages)
        before = read_status()
        start = time.perf_counter()
        merge_module.merge(spec["anchor"], [Path(p) for p in spec["packages"]], spec["out"], top_k=spec["top_k"],
                           shard_bytes=spec["shard_bytes"])
        result["seconds"] = time.perf_counter() - start
        result["verify_seconds"] = verify_seconds
    result["baseline"] = before
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve, so a child's ru_maxrss (and the
    # parent's RUSAGE_CHILDREN) would include the RSS of the forking parent; VmHWM is this image's own peak.
    result["vm_hwm_bytes"] = read_status()["VmHWM"]
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict, log_dir: Path) -> dict:
    """Run `spec` in a fresh interpreter, polling its memory; returns the child's result plus the peaks."""
    stdout = log_dir / f"child-{spec['label']}.out"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    begin = time.perf_counter()
    with open(stdout, "w") as handle:
        process = subprocess.Popen(command, stdout=handle)
        while process.poll() is None:
            for key, value in read_status(process.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            time.sleep(POLL_SECONDS)
    process_seconds = time.perf_counter() - begin
    lines = [line for line in stdout.read_text().splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        raise SystemExit(f"measured child '{spec['label']}' failed (exit {process.returncode}); see stderr above")
    result = json.loads(lines[-1][len("RESULT "):])
    result["polled_peak"] = peaks
    result["process_seconds"] = process_seconds
    return result


# ----------------------------------------------------------------------------------------------------------
# Setup: synthetic anchor and packages (not measured)
# ----------------------------------------------------------------------------------------------------------

def filled(shape: tuple[int, ...], seed: int, dtype):
    """A tensor of `shape` made of a seeded N(0, 0.02) block repeated: distinct per seed, cheap to make."""
    import torch

    numel = math.prod(shape)
    block = min(numel, 1 << 20)
    generator = torch.Generator().manual_seed(seed)
    base = (torch.randn(block, generator=generator) * 0.02).to(dtype)
    return base.repeat(-(-numel // block))[:numel].reshape(shape).clone()


def write_anchor(anchor_dir: Path, shape: dict, seed: int, shard_bytes: int) -> None:
    import torch
    from transformers import Olmo2Config

    from flexolmo.core.fileio import atomic_directory, atomic_write_json
    from flexolmo.core.tensor_io import ShardedWriter
    from flexolmo.model.router_init import save_public_rows

    config = Olmo2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
        pad_token_id=1,
    ).to_dict()
    config.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"], dtype="bfloat16")
    with atomic_directory(anchor_dir) as staging:
        atomic_write_json(staging / "config.json", config)
        writer = ShardedWriter(staging, shard_bytes)
        for index, (name, tensor_shape) in enumerate(anchor_specs(shape)):
            if len(tensor_shape) == 1:   # RMSNorm weights: ones, as initialised
                tensor = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensor = filled(tensor_shape, seed * 1_000_003 + index, torch.bfloat16)
            writer.add(name, tensor)
            del tensor
        writer.finish()
        generator = torch.Generator().manual_seed(seed + 1)
        rows = [torch.randn(shape["hidden_size"], generator=generator) * 0.02
                for _ in range(shape["num_hidden_layers"])]
        save_public_rows(anchor_dir, rows, staging=staging)


def write_expert(out: Path, name: str, shape: dict, seed: int, anchor_record: dict,
                 router_bias: float | None = None) -> None:
    """A synthetic expert package of `shape`; with `router_bias`, that (negative) router bias in every layer."""
    import torch

    from flexolmo.core.provenance import software_versions, utc_now
    from flexolmo.core.weights import PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER
    from flexolmo.owner.package import write_package

    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for offset, proj in enumerate(PROJECTIONS):
            proj_shape = (hidden, inter) if proj == "down_proj" else (inter, hidden)
            tensors[PACKAGE_FFN.format(layer=layer, proj=proj)] = filled(
                proj_shape, seed * 1_000_003 + layer * 10 + offset, torch.bfloat16)
        generator = torch.Generator().manual_seed(seed * 7919 + layer)
        tensors[PACKAGE_ROUTER.format(layer=layer)] = torch.randn(1, hidden, generator=generator) * 0.02
        if router_bias is not None:
            tensors[PACKAGE_BIAS.format(layer=layer)] = torch.tensor([router_bias])
    # A complete manifest (the package schema refuses a partial one), declaring what the package is: synthetic.
    write_package(out, name, tensors, {
        "anchor": anchor_record,
        "training": {"config": {"kind": "synthetic benchmark package"}, "tokens": 0, "public_share": 0.0,
                     "public_data": []},
        "privacy": {"dp": None, "router_init": "synthetic", "router_row_from_private_data": False},
        "created": utc_now(), "versions": software_versions()})
    del tensors
    gc.collect()


# ----------------------------------------------------------------------------------------------------------
# Verification of a merged output
# ----------------------------------------------------------------------------------------------------------

def verify_output(out: Path, anchor_dir: Path, packages: list[Path], shape: dict, shard_bytes: int) -> dict:
    import torch
    from safetensors import safe_open

    from flexolmo.core.tensor_io import INDEX_FILE, LazyReader
    from flexolmo.core.weights import ANCHOR_FFN, MERGED_EXPERT, MERGED_ROUTER, PACKAGE_FFN, PACKAGE_ROUTER
    from flexolmo.model.router_init import load_public_rows
    from flexolmo.owner.package import TENSOR_FILE

    layers, experts = shape["num_hidden_layers"], 1 + len(packages)
    reader = LazyReader(out)
    names = reader.names()
    anchor_tensors = len(anchor_specs(shape))
    expected = anchor_tensors - 3 * layers + layers * (3 * experts + 1)
    problems = []
    if not (out / INDEX_FILE).exists():
        problems.append(f"no {INDEX_FILE}")
    if len(names) != expected:
        problems.append(f"{len(names)} tensors, expected {expected}")
    config = json.loads((out / "config.json").read_text())
    if config.get("model_type") != "flex_olmo" or config.get("num_experts") != experts:
        problems.append(f"config: model_type {config.get('model_type')}, num_experts {config.get('num_experts')}")
    # Sampled contents: the last layer's down_proj of every expert and the router, against their sources.
    last = layers - 1
    anchor = LazyReader(anchor_dir)
    if not torch.equal(reader.get(MERGED_EXPERT.format(layer=last, expert=0, proj="down_proj")),
                       anchor.get(ANCHOR_FFN.format(layer=last, proj="down_proj"))):
        problems.append("expert 0 differs from the anchor FFN")
    router = reader.get(MERGED_ROUTER.format(layer=last))
    if list(router.shape) != [experts, shape["hidden_size"]]:
        problems.append(f"router shape {list(router.shape)}")
    elif not torch.equal(router[0], load_public_rows(anchor_dir, layers)[last].to(router.dtype)):
        problems.append("router row 0 is not the public row")
    for index, package in enumerate(packages, start=1):
        with safe_open(package / TENSOR_FILE, framework="pt") as handle:
            if not torch.equal(reader.get(MERGED_EXPERT.format(layer=last, expert=index, proj="down_proj")),
                               handle.get_tensor(PACKAGE_FFN.format(layer=last, proj="down_proj"))):
                problems.append(f"expert {index} differs from its package")
            if not torch.equal(router[index], handle.get_tensor(PACKAGE_ROUTER.format(layer=last))[0].to(router.dtype)):
                problems.append(f"router row {index} differs from its package")
    shard_files = sorted(p for p in out.glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in shard_files)
    # A shard holds at most shard_bytes of tensors, or one larger tensor alone (plus its JSON header).
    largest_tensor = BF16 * shape["hidden_size"] * max(shape["vocab_size"], shape["intermediate_size"])
    if largest_shard > max(shard_bytes, largest_tensor) + MIB:
        problems.append(f"a shard of {largest_shard} bytes exceeds shard_bytes {shard_bytes}")
    if problems:
        raise SystemExit(f"merged output {out} failed verification: " + "; ".join(problems))
    return {"tensors": len(names), "expected_tensors": expected, "index": True, "shards": len(shard_files),
            "largest_shard_bytes": largest_shard,
            "parameters": sum(math.prod(reader.shape(name)) for name in names), "sampled_tensors_equal": True}


# ----------------------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------------------

def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(files: list[Path]) -> float:
    """Read every input once (like `cat files > /dev/null`) so the measured run starts from a warm cache."""
    begin = time.perf_counter()
    buffer = bytearray(16 * MIB)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - begin


def timed_sync() -> float:
    begin = time.perf_counter()
    os.sync()
    return time.perf_counter() - begin


def machine() -> dict:
    meminfo = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_bytes": meminfo["MemTotal"],
            "mem_available_bytes_at_start": meminfo["MemAvailable"], "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version()}


def mb(value: float) -> float:
    return round(value / 1e6, 1)


def summarise(result: dict) -> dict:
    """Peak memory figures of one measured child, in MB (1e6 bytes)."""
    return {
        "peak_rss_mb": mb(result["vm_hwm_bytes"]),
        "peak_rss_anon_mb": mb(result["polled_peak"]["RssAnon"]),
        "peak_rss_file_mb": mb(result["polled_peak"]["RssFile"]),
        "baseline_rss_mb": mb(result["baseline"].get("VmRSS", 0)),
        "baseline_rss_anon_mb": mb(result["baseline"].get("RssAnon", 0)),
        "baseline_rss_file_mb": mb(result["baseline"].get("RssFile", 0)),
    }


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A plain-text table (readable in logs of any width)."""
    cells = [header, *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(title)
    for number, row in enumerate(cells):
        print("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths))))
        if number == 0:
            print("  ".join("-" * width for width in widths))


def parse_args() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "flexolmo-bench-merge",
                        help="scratch directory (created; must not exist)")
    parser.add_argument("--small", action="store_true", help="tiny model (hidden 256, 2 layers): a harness check")
    parser.add_argument("--estimate", action="store_true", help="print sizes and disk needed, write nothing")
    parser.add_argument("--experts", type=int, default=4, help="expert packages written and merged")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token in the merged model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic anchor and expert weights")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON output (default benchmarks/results/merge.json; with --small, under /tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the anchor, packages and the merged output (default shard size)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def print_estimate(shape: dict, experts: int, expected: dict, work: Path) -> tuple[Path, int]:
    """Print the sizes and the disk the run needs; returns the existing folder probed and its free bytes."""
    probe = work if work.exists() else next(p for p in work.parents if p.exists())
    free = shutil.disk_usage(probe).free
    print(f"model: {shape}; {experts} experts")
    print(f"anchor {expected['anchor_params'] / 1e9:.3f}B params ({expected['anchor_bytes'] / 1e9:.2f} GB); "
          f"output {expected['output_params'] / 1e9:.3f}B params ({expected['bytes_out'] / 1e9:.2f} GB); "
          f"bytes read by the merge {expected['bytes_in'] / 1e9:.2f} GB")
    print(f"disk needed at peak: {expected['peak_disk_bytes'] / 1e9:.2f} GB (inputs + the largest output); "
          f"free on {probe}: {free / 1e9:.1f} GB")
    return probe, free


def refuse_unrunnable(args: argparse.Namespace, expected: dict, work: Path, probe: Path, free: int) -> None:
    if not args.small and expected["anchor_params"] < 1e9:
        raise SystemExit("the full benchmark must use an anchor of at least 1B parameters")
    if free < expected["peak_disk_bytes"] * 1.05:
        raise SystemExit(f"not enough free disk in {probe}")
    if work.exists():
        raise SystemExit(f"{work} already exists: remove it or choose another --workdir")


def write_inputs(work: Path, shape: dict, args: argparse.Namespace, anchor_shard: int):
    """Setup, not measured: the anchor and the expert packages. Returns (anchor dir, packages, seconds)."""
    from flexolmo.model.anchor import compute_fingerprint, read_config
    from flexolmo.owner.expert import anchor_record

    setup_start = time.perf_counter()
    anchor_dir = work / "anchor"
    write_anchor(anchor_dir, shape, args.seed, anchor_shard)
    print(f"anchor written in {time.perf_counter() - setup_start:.1f} s")
    record = anchor_record(compute_fingerprint(anchor_dir), read_config(anchor_dir))
    packages = []
    for number in range(1, args.experts + 1):
        package = work / "packages" / f"expert{number}"
        write_expert(package, f"expert{number}", shape, args.seed + 100 * number, record)
        packages.append(package)
        print(f"package {number} written ({time.perf_counter() - setup_start:.1f} s)")
    return anchor_dir, packages, time.perf_counter() - setup_start


def anchor_files_of(anchor_dir: Path) -> list[Path]:
    """The anchor's weight files (its shards, or its single file) and its public router rows."""
    from flexolmo.core.tensor_io import INDEX_FILE, SINGLE_FILE
    from flexolmo.model.anchor import PUBLIC_ROUTER_FILE

    index = json.loads((anchor_dir / INDEX_FILE).read_text()) if (anchor_dir / INDEX_FILE).exists() else None
    anchor_files = ([anchor_dir / f for f in sorted(set(index["weight_map"].values()))] if index
                    else [anchor_dir / SINGLE_FILE])
    anchor_files.append(anchor_dir / PUBLIC_ROUTER_FILE)
    return anchor_files


def measure_copy(work: Path, anchor_files: list[Path], packages: list[Path], inputs: list[Path]) -> dict:
    """The baseline: a plain copy of every file the merge reads, from a warm page cache, in a child process."""
    from flexolmo.owner.package import TENSOR_FILE

    os.sync()
    warm_seconds = warm(inputs)
    copy_targets = [[str(f), f.name] for f in anchor_files] + [
        [str(package / TENSOR_FILE), f"{package.name}.{TENSOR_FILE}"] for package in packages]
    copy = run_child({"op": "copy", "label": "copy", "files": copy_targets, "out": str(work / "copy")}, work)
    copy["sync_seconds"] = timed_sync()
    copy["warm_read_seconds"] = warm_seconds
    copy["bytes_out"] = dir_bytes(work / "copy")
    shutil.rmtree(work / "copy")
    print(f"copy: {copy['seconds']:.2f} s")
    return copy


def measure_merges(args: argparse.Namespace, work: Path, shape: dict, shards_mib: tuple[int, ...],
                   anchor_dir: Path, packages: list[Path], inputs: list[Path]) -> dict[int, dict]:
    """One merge per shard size, smallest first, each verified; the last (merge's default size) is kept with
    --keep."""
    merges = {}
    for shard_mib in shards_mib:
        out = work / f"merged-{shard_mib}MiB"
        os.sync()
        warm_seconds = warm(inputs)
        result = run_child({"op": "merge", "label": f"merge-{shard_mib}MiB", "anchor": str(anchor_dir),
                            "packages": [str(p) for p in packages], "out": str(out), "top_k": args.top_k,
                            "shard_bytes": shard_mib * MIB}, work)
        result["sync_seconds"] = timed_sync()
        result["warm_read_seconds"] = warm_seconds
        result["bytes_out"] = dir_bytes(out)
        result["shard_bytes"] = shard_mib * MIB
        result["verification"] = verify_output(out, anchor_dir, packages, shape, shard_mib * MIB)
        gc.collect()  # close the verification's memory maps, so deleting the output frees its disk space
        merges[shard_mib] = result
        print(f"merge (shards of {shard_mib} MiB): {result['seconds']:.2f} s, verified")
        if not (args.keep and shard_mib == shards_mib[-1]):
            shutil.rmtree(out)
    return merges


def merge_entry(shard_mib: int, result: dict, copy: dict) -> dict:
    """One merge's report entry: its times, their ratio to the copy's, its memory and its verification."""
    from flexolmo.core.tensor_io import DEFAULT_SHARD_BYTES

    memory = summarise(result)
    verify_total = sum(result["verify_seconds"].values())
    return {
        "shard_bytes": result["shard_bytes"],
        "shard_mib": shard_mib,
        "is_merge_default_shard_size": shard_mib * MIB == DEFAULT_SHARD_BYTES,
        "merge_seconds": round(result["seconds"], 3),
        "of_which_verify_inputs_seconds": {k: round(v, 3) for k, v in result["verify_seconds"].items()},
        "of_which_write_seconds": round(result["seconds"] - verify_total, 3),
        "sync_after_seconds": round(result["sync_seconds"], 3),
        "process_seconds_incl_interpreter_and_imports": round(result["process_seconds"], 3),
        "ratio_merge_over_copy": round(result["seconds"] / copy["seconds"], 3),
        "ratio_merge_over_copy_incl_sync": round((result["seconds"] + result["sync_seconds"])
                                                 / (copy["seconds"] + copy["sync_seconds"]), 3),
        **memory,
        "peak_rss_above_baseline_mb": round(memory["peak_rss_mb"] - memory["baseline_rss_mb"], 1),
        "peak_rss_anon_above_baseline_mb": round(memory["peak_rss_anon_mb"]
                                                 - memory["baseline_rss_anon_mb"], 1),
        "output_mb": mb(result["bytes_out"]),
        "ratio_peak_rss_over_output": round(result["vm_hwm_bytes"] / result["bytes_out"], 4),
        "ratio_peak_rss_anon_over_output": round(result["polled_peak"]["RssAnon"] / result["bytes_out"], 4),
        "verification": result["verification"],
        "warm_read_seconds_before": round(result["warm_read_seconds"], 3),
    }


def print_report_table(args: argparse.Namespace, expected: dict, info: dict, copy: dict,
                       merges: dict[int, dict], entries: list[dict]) -> None:
    copy_mem = summarise(copy)
    rows = [["copy (shutil.copyfile)", "-", f"{copy['seconds']:.2f}", f"{copy['sync_seconds']:.2f}", "1.00",
             copy_mem["peak_rss_mb"], copy_mem["peak_rss_anon_mb"], copy_mem["peak_rss_file_mb"],
             mb(copy["bytes_out"]), f"{copy['vm_hwm_bytes'] / copy['bytes_out']:.4f}"]]
    for (shard_mib, result), entry in zip(merges.items(), entries):
        rows.append([f"merge (top-k {args.top_k})", f"{shard_mib} MiB", f"{result['seconds']:.2f}",
                     f"{result['sync_seconds']:.2f}", f"{entry['ratio_merge_over_copy']:.2f}",
                     entry["peak_rss_mb"], entry["peak_rss_anon_mb"], entry["peak_rss_file_mb"],
                     entry["output_mb"], f"{entry['ratio_peak_rss_over_output']:.4f}"])
    title = (f"merge of a {expected['anchor_params'] / 1e9:.2f}B-parameter anchor + {args.experts} experts vs "
             f"a copy of the same bytes ({'SMALL harness check, numbers meaningless; ' if args.small else ''}"
             f"warm page cache; {info['nproc']} cores; MB = 1e6 bytes)")
    print_table(title, ["operation", "shard", "seconds", "+sync s", "vs copy", "peak RSS MB", "peak anon MB",
                        "peak file MB", "output MB", "RSS/output"], rows)


METHOD = {
    "isolation": "each measured operation runs in a fresh child interpreter",
    "cache": "before each run: os.sync() (untimed), then every input file read once "
             "(cat > /dev/null); copy and merges all start from a warm page cache",
    "timing": "seconds = from just before the operation to its return (excludes interpreter start "
              "and imports); sync_after_seconds = the os.sync() right after, flushing what the "
              "operation left dirty in the page cache",
    "peak_rss": "the child's VmHWM from /proc/self/status at its end: exact, and its own (getrusage "
                "ru_maxrss is not used: Linux keeps it across execve, so it includes the forking "
                "parent's RSS)",
    "peak_rss_anon / peak_rss_file": f"max of RssAnon / RssFile in /proc/PID/status polled every "
                                     f"{POLL_SECONDS * 1000:.0f} ms by the parent (may miss "
                                     "spikes shorter than that); RssFile counts the safetensors "
                                     "memory-mapped input pages, which the kernel can reclaim",
    "baseline": "RSS of the child after its imports, just before the operation",
    "mb": "1 MB = 1e6 bytes",
}


def copy_report(copy: dict) -> dict:
    return {
        "method": "shutil.copyfile of every file the merge reads (sendfile on Linux), into one directory",
        "seconds": round(copy["seconds"], 3),
        "sync_after_seconds": round(copy["sync_seconds"], 3),
        "process_seconds_incl_interpreter": round(copy["process_seconds"], 3),
        **summarise(copy),
        "output_mb": mb(copy["bytes_out"]),
        "ratio_peak_rss_over_output": round(copy["vm_hwm_bytes"] / copy["bytes_out"], 4),
        "warm_read_seconds_before": round(copy["warm_read_seconds"], 3),
    }


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return

    shape = SMALL_SHAPE if args.small else FULL_SHAPE
    shards_mib = SMALL_SHARDS_MIB if args.small else FULL_SHARDS_MIB
    anchor_shard = (SMALL_ANCHOR_SHARD_MIB if args.small else FULL_ANCHOR_SHARD_MIB) * MIB
    results_path = args.results or (Path(tempfile.gettempdir()) / "flexolmo-bench-merge-small.json" if args.small
                                    else REPO / "benchmarks" / "results" / "merge.json")
    expected = sizes(shape, args.experts)
    work = args.workdir.resolve()
    probe, free = print_estimate(shape, args.experts, expected, work)
    if args.estimate:
        return
    refuse_unrunnable(args, expected, work, probe, free)

    sys.path.insert(0, str(REPO / "src"))
    from flexolmo.core.provenance import software_versions
    from flexolmo.owner.package import TENSOR_FILE

    info = machine()
    command = shlex.join([os.path.relpath(sys.executable, Path.cwd()) if sys.executable.startswith(str(Path.cwd()))
                          else sys.executable, *sys.argv])
    work.mkdir(parents=True)
    try:
        anchor_dir, packages, setup_seconds = write_inputs(work, shape, args, anchor_shard)
        anchor_files = anchor_files_of(anchor_dir)
        inputs = anchor_files + [package / TENSOR_FILE for package in packages]
        copy = measure_copy(work, anchor_files, packages, inputs)
        merges = measure_merges(args, work, shape, shards_mib, anchor_dir, packages, inputs)
        entries = [merge_entry(shard_mib, result, copy) for shard_mib, result in merges.items()]
        print_report_table(args, expected, info, copy, merges, entries)
        report = {
            "benchmark": "merge",
            "command": command,
            "cwd": str(Path.cwd()),
            "small": args.small,
            "shape": shape,
            "experts": args.experts,
            "top_k": args.top_k,
            "dtype": "bfloat16 (router rows float32 in the inputs, bfloat16 in the output)",
            "anchor_params": expected["anchor_params"],
            "expert_ffn_params": expected["expert_ffn_params"],
            "output_params": entries[-1]["verification"]["parameters"],
            "anchor_weight_files": len(anchor_files) - 1,
            "anchor_shard_bytes": anchor_shard,
            "bytes_in": sum(f.stat().st_size for f in inputs),
            "bytes_out": merges[shards_mib[-1]]["bytes_out"],
            "copy": copy_report(copy),
            "merge": entries,
            "setup_seconds_not_measured": round(setup_seconds, 1),
            "method": METHOD,
            "machine": info,
            "versions": software_versions(),
        }
        write_results(results_path, report)
    finally:
        if args.keep:
            print(f"scratch data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
