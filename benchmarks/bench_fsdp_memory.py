"""Peak memory per rank of sharded expert training (FSDP2) on CPU, against `flexolmo plan`.

    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=src .venv/bin/python benchmarks/bench_fsdp_memory.py

A synthetic OLMo-2 anchor (random weights, 0.51B parameters: hidden 1024, FFN 4096, 24 layers, vocabulary
50,304) is built in every rank, turned into the owner's 2-expert model (0.30B trainable) and trained for a few
steps through `flexolmo.training.loop.train` with each layout: replicated on one process, and FSDP2 over 1, 2 and 4
gloo processes (frozen weights sharded, and at 2 processes also replicated), bf16 compute with float32 master
weights. Per rank it records:
- exact bytes of this rank's part of the frozen weights, trained weights, gradients and AdamW state, read from
  the tensors themselves (`to_local()` of the sharded ones) after an optimizer step;
- measured peak memory of the training steps after the first: the process's peak resident set size (VmHWM,
  reset through /proc/self/clear_refs after the first step) minus its resident size before the model existed.
  `MALLOC_MMAP_THRESHOLD_` makes glibc return freed large blocks to the system, so the full model each rank
  builds before sharding does not linger in the resident set;
- seconds per step (the machine is shared: read ratios within one run, not absolute times);
and compares both with `flexolmo.training.memory_plan.plan_memory` for the same settings.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch

from common import argument_parser, results_file, write_results

RESULTS = results_file("fsdp_memory.json")
ANCHOR = {"model_type": "olmo2", "vocab_size": 50304, "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
          "max_position_embeddings": 1024, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
# (name, processes, fsdp, replicate_frozen)
LAYOUTS = [("replicated", 1, False, False), ("fsdp", 1, True, False), ("fsdp", 2, True, False),
           ("fsdp-replicate-frozen", 2, True, True), ("fsdp", 4, True, False)]


def resident_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class Probe:
    """A training hook: exact per-rank tensor bytes after the first step, then the peak of the later steps."""

    def __init__(self, model, optimizer_holder: dict):
        self.model, self.optimizer_holder, self.record, self.step_times = model, optimizer_holder, {}, []

    def after_optimizer_step(self, step: int) -> None:
        self.step_times.append(time.perf_counter())
        if step == 0:
            params = list(self.model.parameters())
            self.record["frozen"] = sum(local_bytes(p) for p in params if not p.requires_grad)
            self.record["trainable"] = sum(local_bytes(p) for p in params if p.requires_grad)
            self.record["gradients"] = sum(local_bytes(p.grad) for p in params if p.grad is not None)
            optimizer = self.optimizer_holder["optimizer"]
            self.record["optimizer"] = sum(local_bytes(value) for state in optimizer.state.values()
                                           for value in state.values() if torch.is_tensor(value) and value.dim())
            reset_peak()


def run_rank(rank: int, world_size: int, port: int, fsdp: bool, replicate_frozen: bool, settings: dict,
             out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexolmo.core.precision import PrecisionPolicy
    from flexolmo.data.tokens import TokenizedFile, TokenStream
    from flexolmo.model.moe import convert_to_moe
    from flexolmo.owner.owner_model import owner_loss, owner_trainable_parameters
    from flexolmo.training.distributed import FullyShardedStrategy, ReplicatedStrategy
    from flexolmo.training.loop import OptimConfig, train

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    baseline = resident_bytes()
    if fsdp:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ANCHOR), dtype=torch.bfloat16)
    rows = [torch.randn(2, ANCHOR["hidden_size"]) for _ in range(ANCHOR["num_hidden_layers"])]
    convert_to_moe(model, rows, num_experts=2, top_k=2)
    trainable = owner_trainable_parameters(model)
    tokens = np.random.default_rng(0).integers(0, ANCHOR["vocab_size"], 200_000).astype(np.uint32)
    stream = TokenStream([TokenizedFile(Path("synthetic"), tokens, 1, len(tokens))])
    precision = PrecisionPolicy.from_name("bfloat16")
    strategy = FullyShardedStrategy(precision, settings["activation_checkpointing"], replicate_frozen) if fsdp \
        else ReplicatedStrategy(precision, settings["activation_checkpointing"])
    holder: dict = {}
    original_adamw = torch.optim.AdamW

    def capture(*args, **kwargs):  # the loop builds its optimizer itself; keep a handle to count its state
        holder["optimizer"] = original_adamw(*args, **kwargs)
        return holder["optimizer"]

    torch.optim.AdamW = capture
    probe = Probe(model, holder)
    optim = OptimConfig(steps=settings["steps"], batch_size=settings["batch_size"], seq_len=settings["seq_len"],
                        lr=1e-4, warmup_steps=0, checkpoint_every=10**6, dtype="bfloat16")
    began = time.perf_counter()
    train(model, trainable, stream, optim, Path(out) / f"run-{rank}", loss_fn=owner_loss(1e-3), hooks=[probe],
          strategy=strategy, description=f"{world_size} rank(s)")
    torch.optim.AdamW = original_adamw
    probe.record["peak_above_baseline"] = resident_bytes("VmHWM") - baseline
    times = [began, *probe.step_times]
    probe.record["seconds_per_step"] = float(np.median(np.diff(times)[1:]))
    Path(out, f"rank-{rank}.json").write_text(json.dumps(probe.record))
    if fsdp:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    from flexolmo.training.memory_plan import GIB, PlanSettings, plan_memory

    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=4,
                        help="training steps per layout (the peak is measured after the first)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step over all ranks")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (in training and in the plan)")
    parser.add_argument("--layouts", nargs="*", default=None,
                        help="run only these layouts (e.g. fsdp:4), replacing their entries in --out")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        raise SystemExit("set MALLOC_MMAP_THRESHOLD_=65536 (see the docstring) so freed memory leaves the RSS")
    settings = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "activation_checkpointing": args.activation_checkpointing}
    results = {"anchor": ANCHOR, "settings": settings, "machine": {"cpus": os.cpu_count(), "platform":
               platform.platform(), "torch": torch.__version__, "shared": "yes: other agents ran on it"},
               "layouts": []}
    chosen = LAYOUTS
    if args.layouts is not None:
        chosen = [layout for layout in LAYOUTS if f"{layout[0]}:{layout[1]}" in args.layouts]
        if args.out.exists():  # keep the other layouts' entries of an earlier run with the same settings
            earlier = json.loads(args.out.read_text())
            if earlier["settings"] == settings:
                results["layouts"] = [entry for entry in earlier["layouts"]
                                      if f"{entry['layout']}:{entry['processes']}" not in args.layouts]
    for name, world_size, fsdp, replicate_frozen in chosen:
        need = world_size * 3.5 * GIB  # each rank builds the whole owner's model before sharding it
        if available_bytes() < need:
            print(f"skipping {name} x{world_size}: {available_bytes() / GIB:.1f} GiB available, need {need / GIB:.0f}")
            continue
        with tempfile.TemporaryDirectory() as work:
            mp.spawn(run_rank, args=(world_size, free_port(), fsdp, replicate_frozen, settings, work),
                     nprocs=world_size, join=True)
            ranks = [json.loads(Path(work, f"rank-{rank}.json").read_text()) for rank in range(world_size)]
        plan = plan_memory(ANCHOR, PlanSettings(world_size=world_size, batch_size=args.batch_size,
                                                seq_len=args.seq_len, fsdp=fsdp, replicate_frozen=replicate_frozen,
                                                activation_checkpointing=args.activation_checkpointing,
                                                dtype="bfloat16"))
        worst = max(ranks, key=lambda rank: rank["peak_above_baseline"])
        entry = {"layout": name, "processes": world_size, "ranks": ranks, "plan": plan.items,
                 "plan_total": plan.total, "measured_peak": worst["peak_above_baseline"],
                 "plan_error": (plan.total - worst["peak_above_baseline"]) / worst["peak_above_baseline"]}
        results["layouts"].append(entry)
        print(f"{name:>22} x{world_size}: trained state per rank "
              f"{(worst['trainable'] + worst['gradients'] + worst['optimizer']) / GIB:.3f} GiB, "
              f"peak {worst['peak_above_baseline'] / GIB:.2f} GiB, plan {plan.total / GIB:.2f} GiB "
              f"({entry['plan_error']:+.1%}), {worst['seconds_per_step']:.1f} s/step")
    order = [f"{name}:{size}" for name, size, _, _ in LAYOUTS]
    results["layouts"].sort(key=lambda entry: order.index(f"{entry['layout']}:{entry['processes']}"))
    write_results(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
