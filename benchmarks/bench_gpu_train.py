"""GPU checks of expert training (issue 12): bf16 throughput and model FLOPs utilisation at the OLMo-2 1B shape
against dense FFN fine-tuning, and the NCCL path of `--fsdp` on one GPU. NOT YET RUN: no GPU was lent to the
session that wrote it; benchmarks/docs/sharded-training.md has no number from it.

    PYTHONPATH=src python benchmarks/bench_gpu_train.py --anchor benchmarks/anchors/OLMo-2-0425-1B

Synthetic weights of the anchor's shape (only its config.json is read) and random tokens; every variant runs
through `flexolmo.training.loop.train` with `--dtype bfloat16` (float32 master weights, bf16 compute), the same batch
shape and the same steps, in this one process, alternating variants over `--rounds`:
- `dense`: the anchor with its FFNs trainable (dense FFN fine-tuning, the cost every expert method pays);
- `coordinated`: FlexOlmo's owner model (frozen FFN next to a trained copy), replicated strategy (autocast);
- `coordinated-fsdp`: the same model through FSDP2 on a one-process NCCL group (the `--fsdp` code path,
  `MixedPrecisionPolicy`, sharded checkpoint at the last step).
Reported per variant: tokens/s over the steps after warm-up, MFU = model FLOPs per token (matmuls of the
forward pass, the input gradients and the trained weights' gradients; `bench_train_expert.flops_per_token`)
x tokens/s / the GPU's peak dense bf16 FLOP/s (`--peak-tflops`, default from the device name), peak memory
(`torch.cuda.max_memory_allocated`) against `flexolmo plan`, and the losses of the two coordinated variants
against each other (they differ by autocast against FSDP's bf16 casting only).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import argument_parser, results_file, write_results

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_expert import flops_per_token  # noqa: E402  (the same FLOP count as the CPU benchmark)

RESULTS = results_file("gpu_train.json")
# Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
VARIANTS = ("dense", "coordinated", "coordinated-fsdp")


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def after_optimizer_step(self, step: int) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def build(variant: str, config: dict, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexolmo.experiments.baselines import dense_parameters
    from flexolmo.model.moe import convert_to_moe
    from flexolmo.owner.owner_model import owner_loss, owner_trainable_parameters
    from flexolmo.training.loop import lm_loss_fn

    torch.manual_seed(0)
    fields = {key: value for key, value in config.items() if key not in ("model_type", "architectures")}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields),
                                                 dtype=torch.bfloat16)
    if variant == "dense":
        return model, dense_parameters(model, full_model=False), lm_loss_fn
    rows = [torch.randn(2, config["hidden_size"], device=device) for _ in range(config["num_hidden_layers"])]
    convert_to_moe(model, rows, num_experts=2, top_k=2)
    return model, owner_trainable_parameters(model), owner_loss(1e-3)


def run(variant: str, config: dict, args, stream) -> dict:
    from flexolmo.core.precision import PrecisionPolicy
    from flexolmo.core.world import distributed_session
    from flexolmo.training.distributed import FullyShardedStrategy, ReplicatedStrategy
    from flexolmo.training.loop import OptimConfig, train

    precision = PrecisionPolicy.from_name("bfloat16")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    optim = OptimConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        lr=1e-4, warmup_steps=1, checkpoint_every=10**6, device="cuda", dtype="bfloat16")
    timer = StepTimer()
    fsdp = variant == "coordinated-fsdp"
    with distributed_session("cuda", always=fsdp) as device, tempfile.TemporaryDirectory() as work:
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_initialized() else None
        model, trainable, loss_fn = build(variant, config, "cpu" if fsdp else device)
        strategy = (FullyShardedStrategy(precision, args.activation_checkpointing) if fsdp
                    else ReplicatedStrategy(precision, args.activation_checkpointing))
        optim.device = device
        result = train(model, trainable, stream, optim, Path(work), loss_fn=loss_fn, hooks=[timer],
                       strategy=strategy, description=variant)
        del model, trainable
    seconds = timer.times[-1] - timer.times[args.warmup - 1]
    return {"tokens_per_second": args.steps * optim.tokens_per_step / seconds, "losses": result.losses,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(), "backend": backend}


def main() -> None:
    from flexolmo.data.tokens import TokenizedFile, TokenStream
    from flexolmo.training.memory_plan import PlanSettings, plan_memory

    parser = argument_parser(__doc__)
    parser.add_argument("--anchor", type=Path, default=Path(__file__).parent / "anchors" / "OLMo-2-0425-1B",
                        help="directory whose config.json gives the shape")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones, per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (in training and in the plan)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_train.py needs a CUDA GPU; the CPU measurements are bench_fsdp_memory.py")
    device_name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)
    if peak is None:
        raise SystemExit(f"unknown peak FLOP/s for {device_name}; pass --peak-tflops")
    config = json.loads((args.anchor / "config.json").read_text())
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], 50_000_000).astype(np.uint32)
    stream = TokenStream([TokenizedFile(Path("synthetic"), tokens, 1, len(tokens))])

    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            runs[variant].append(run(variant, config, args, stream))
    report = {"command": " ".join(["python", *sys.argv]), "device": device_name, "peak_tflops": peak,
              "torch": torch.__version__, "platform": platform.platform(), "anchor": str(args.anchor),
              "batch_size": args.batch_size, "seq_len": args.seq_len,
              "activation_checkpointing": args.activation_checkpointing, "variants": {}}
    for variant, measured in runs.items():
        kind = "dense" if variant == "dense" else "coordinated"
        flops = flops_per_token(config, args.seq_len, kind)
        best = max(run_["tokens_per_second"] for run_ in measured)
        plan = plan_memory(config, PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len,
                                                fsdp=variant == "coordinated-fsdp",
                                                activation_checkpointing=args.activation_checkpointing,
                                                dtype="bfloat16"))
        report["variants"][variant] = {
            "tokens_per_second": [run_["tokens_per_second"] for run_ in measured], "best_tokens_per_second": best,
            "flops_per_token": flops, "mfu": flops * best / (peak * 1e12),
            "peak_memory_bytes": max(run_["peak_memory_bytes"] for run_ in measured),
            "plan_bytes": plan.total if kind == "coordinated" else None, "backend": measured[0]["backend"],
            "losses": measured[0]["losses"]}
    coordinated, sharded = (report["variants"][name]["losses"] for name in ("coordinated", "coordinated-fsdp"))
    report["max_loss_difference_fsdp_vs_replicated"] = max(abs(a - b) for a, b in zip(coordinated, sharded))
    report["coordinated_over_dense_tokens_per_second"] = (report["variants"]["coordinated"]["best_tokens_per_second"]
                                                          / report["variants"]["dense"]["best_tokens_per_second"])
    write_results(args.out, report)
    for variant, entry in report["variants"].items():
        print(f"{variant:>17}: {entry['best_tokens_per_second']:,.0f} tok/s, MFU {entry['mfu']:.1%}, peak "
              f"{entry['peak_memory_bytes'] / 2**30:.1f} GiB" + (f" (plan {entry['plan_bytes'] / 2**30:.1f})"
                                                                if entry["plan_bytes"] else "")
              + (f", backend {entry['backend']}" if entry["backend"] else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
