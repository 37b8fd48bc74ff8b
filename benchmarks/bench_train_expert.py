"""Throughput and peak memory of coordinated expert training against dense FFN fine-tuning, side by side.

    .venv/bin/python benchmarks/bench_train_expert.py --anchor data/demo/anchor --data data/demo/code.train.jsonl.gz

Both variants train the same anchor's FFN-sized parameters on the same data with the same batch shape through
the same loop (`flexolmo.training.loop.train`):
- dense: the anchor with its FFNs trainable (everything else frozen);
- coordinated: FlexOlmo's 2-expert block per layer, the anchor FFN frozen next to a trainable copy.

Coordinated training does more work per token: the frozen expert's forward and its backward to the input. The
predicted throughput ratio (dense FLOPs / coordinated FLOPs per token) counts the matmul FLOPs of both,
forward, input-gradient and weight-gradient. The predicted memory ratio counts exactly what each variant must
hold: weights, gradients and Adam state of the trainable tensors, and every tensor saved for backward in one
step (counted with `torch.autograd.graph.saved_tensors_hooks`). Measured: tokens/s over timed steps after
warm-up, alternating the variants in one process; peak memory as the rise of the process's peak RSS above its
resident size before training, each variant in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexolmo.data.tokens import load_token_stream
from flexolmo.experiments.baselines import dense_parameters
from flexolmo.experiments.compute import training_flops_per_token
from flexolmo.model.anchor import load_anchor
from flexolmo.model.router_init import initial_rows
from flexolmo.owner.owner_model import build_owner_model, owner_loss, owner_trainable_parameters
from flexolmo.training.loop import OptimConfig, lm_loss_fn, make_batch, train

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("train_expert.json")


def build(variant: str, anchor_dir: Path, data: Path, seq_len: int):
    anchor = load_anchor(anchor_dir)
    stream = load_token_stream([data], anchor.tokenizer, "all")
    if variant == "dense":
        model = anchor.model
        return model, dense_parameters(model, full_model=False), stream, lm_loss_fn
    rows = initial_rows("mean_hidden", anchor, stream, seq_len, 16, 0)
    model = build_owner_model(anchor, rows, negative_bias=False)
    return model, owner_trainable_parameters(model), stream, owner_loss(1e-3)


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def after_optimizer_step(self, step: int) -> None:
        self.times.append(time.perf_counter())


def timed_run(variant: str, args) -> float:
    """Tokens per second over the steps after warm-up."""
    model, trainable, stream, loss_fn = build(variant, args.anchor, args.data, args.seq_len)
    optim = OptimConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                        lr=1e-4, warmup_steps=1, checkpoint_every=10_000)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, trainable, stream, optim, Path(run_dir), loss_fn=loss_fn, hooks=[timer],
              description=f"{variant} (timing)")
    seconds = timer.times[-1] - timer.times[args.warmup - 1]
    return args.steps * optim.tokens_per_step / seconds


def flops_per_token(config: dict, seq_len: int, variant: str) -> float:
    """Matmul FLOPs per training token (`flexolmo.experiments.compute`, the one count every report uses)."""
    return training_flops_per_token(config, seq_len, "dense_ffn" if variant == "dense" else "coordinated")


def memory_accounting(variant: str, args) -> dict:
    """Bytes a step must hold: all weights, trainable gradients + Adam state, tensors saved for backward."""
    model, trainable, stream, loss_fn = build(variant, args.anchor, args.data, args.seq_len)
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for _, p in trainable)
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = make_batch(stream, torch.arange(args.batch_size).numpy(), args.seq_len, "cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    saved = sum(seen.values())
    return {"weights": weights, "trainable_state": 3 * trainable_bytes, "saved_for_backward": saved,
            "total": weights + 3 * trainable_bytes + saved}


def measure_peak_in_subprocess(variant: str, args) -> dict:
    """Rise of peak RSS over the resident size before training, in a fresh process."""
    code = f"""
import json, sys, tempfile, resource
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bench_train_expert as bench
from flexolmo.training.loop import OptimConfig, train
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
model, trainable, stream, loss_fn = bench.build({variant!r}, Path({str(args.anchor)!r}), Path({str(args.data)!r}),
                                               {args.seq_len})
optim = OptimConfig(steps=3, batch_size={args.batch_size}, seq_len={args.seq_len}, lr=1e-4, warmup_steps=1,
                    checkpoint_every=10_000)
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
with tempfile.TemporaryDirectory() as run_dir:
    train(model, trainable, stream, optim, Path(run_dir), loss_fn=loss_fn, description='memory')
print(json.dumps({{'rss_before': before, 'peak': status('VmHWM')}}))
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    measured = json.loads(output.stdout.strip().splitlines()[-1])
    measured["rise"] = measured["peak"] - measured["rss_before"]
    return measured


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--anchor", type=Path, default=Path("data/demo/anchor"), help="the anchor both variants train")
    parser.add_argument("--data", type=Path, default=Path("data/demo/code.train.jsonl.gz"),
                        help="the training text both variants read")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones, per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = json.loads((args.anchor / "config.json").read_text())

    throughput = {"dense": [], "coordinated": []}
    for _ in range(args.rounds):
        for variant in throughput:
            throughput[variant].append(timed_run(variant, args))
    best = {variant: max(values) for variant, values in throughput.items()}
    flops = {variant: flops_per_token(config, args.seq_len, variant) for variant in throughput}
    predicted_speed = flops["dense"] / flops["coordinated"]
    measured_speed = best["coordinated"] / best["dense"]

    accounting = {variant: memory_accounting(variant, args) for variant in throughput}
    peaks = {variant: measure_peak_in_subprocess(variant, args) for variant in throughput}
    # The model is loaded before the peak is reset, so the measured rise is what training adds on top of the
    # weights: trainable state and activations. Predict the same quantity from the accounting.
    def training_bytes(variant: str) -> int:
        return accounting[variant]["trainable_state"] + accounting[variant]["saved_for_backward"]

    predicted_memory = training_bytes("dense") / training_bytes("coordinated")
    measured_memory = peaks["dense"]["rise"] / peaks["coordinated"]["rise"]
    predicted_total = accounting["dense"]["total"] / accounting["coordinated"]["total"]

    result = {
        "command": command_line(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()},
        "shape": {"batch_size": args.batch_size, "seq_len": args.seq_len, "anchor": str(args.anchor),
                  **{k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}},
        "tokens_per_second": throughput,
        "best_tokens_per_second": best,
        "flops_per_token": flops,
        "throughput_ratio": {"predicted": predicted_speed, "measured": measured_speed,
                             "measured_over_predicted": measured_speed / predicted_speed},
        "memory_accounting_bytes": accounting,
        "memory_measured_bytes": peaks,
        "memory_ratio": {"predicted": predicted_memory, "measured": measured_memory,
                         "measured_over_predicted": measured_memory / predicted_memory,
                         "predicted_total_including_weights": predicted_total},
    }
    write_results(args.out, result)
    print(json.dumps({k: result[k] for k in ("best_tokens_per_second", "throughput_ratio", "memory_ratio")},
                     indent=2))


if __name__ == "__main__":
    main()
