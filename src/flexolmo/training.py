"""One training loop for every stage (anchor pretraining, expert training, dense baselines).

What differs between stages is passed in: which parameters train, how a batch becomes a loss, and hooks that
run around each step (clamping a bias, DP accounting, logging). The loop owns what must be the same
everywhere: the data order, the learning-rate schedule, gradient accumulation, checkpoints and resumption.

Resumption is exact: the batch at step s depends only on (seed, s), the schedule is a function of s, and a
checkpoint holds the trainable tensors, the optimizer state and the loss history. A run killed at any moment
(SIGKILL included) and resumed produces the same losses as a run that was never interrupted.

Data parallelism: launched under `torchrun`, the loop wraps the model in PyTorch's DistributedDataParallel and
each rank takes every world-size-th sequence of the global batch, so N processes run the same optimisation as
one process with the same `batch_size` (up to float summation order). Rank 0 alone shows progress and writes
checkpoints. The model is replicated on every device (DDP, not FSDP).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field

from flexolmo.data import TokenStream
from flexolmo.errors import CheckpointError, DataError, FlexOlmoError
from flexolmo.fileio import atomic_directory
from flexolmo.progress import progress_bar

CHECKPOINT_DIRNAME = "checkpoint"


class OptimConfig(BaseModel):
    """Optimisation settings shared by every training stage."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps before the cosine decay")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    seed: int = Field(0, description="seed for initialisation and data order")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: str = Field("float32", description="parameter dtype: float32 or bfloat16")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def learning_rate(step: int, config: OptimConfig) -> float:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class BatchSampler(Protocol):
    """Chooses the sequence indices of each micro-batch; must depend only on (seed, step, micro) so that a
    resumed run sees the same batches."""

    def indices(self, step: int, micro: int) -> np.ndarray: ...


@dataclass
class ShuffledBatches:
    """Fixed-size batches walking through seeded per-epoch permutations of the sequences."""

    config: OptimConfig
    num_sequences: int

    def indices(self, step: int, micro: int) -> np.ndarray:
        return batch_indices(step, micro, self.config, self.num_sequences)


@dataclass
class MixedBatches:
    """Batches drawing a fixed number of sequences from each of several consecutive ranges of one stream.

    Used to mix public text into an owner's batches: the stream is [owner files..., public files...] and each
    range walks through its own seeded per-epoch permutations, so the mix is exact in every batch.
    """

    config: OptimConfig
    ranges: list[tuple[int, int]]
    counts: list[int]

    def indices(self, step: int, micro: int) -> np.ndarray:
        parts = []
        for part, ((start, stop), count) in enumerate(zip(self.ranges, self.counts)):
            if count:
                sub = self.config.model_copy(update={"batch_size": count, "seed": self.config.seed + 7919 * part})
                parts.append(start + batch_indices(step, micro, sub, stop - start))
        return np.concatenate(parts)


def batch_indices(step: int, micro: int, config: OptimConfig, num_sequences: int) -> np.ndarray:
    """Sequence indices of micro-batch `micro` of step `step`: epochs are seeded permutations, so any
    step's batch can be recomputed without replaying the ones before it."""
    first = (step * config.grad_accum + micro) * config.batch_size
    positions = np.arange(first, first + config.batch_size)
    epochs, offsets = np.divmod(positions, num_sequences)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([config.seed, int(epoch)]).permutation(num_sequences)
        chosen = epochs == epoch
        indices[chosen] = order[offsets[chosen]]
    return indices


def make_batch(stream: TokenStream, indices: np.ndarray, seq_len: int, device: str) -> torch.Tensor:
    """(batch, seq_len + 1) token ids."""
    rows = [stream.sequence(int(index), seq_len) for index in indices]
    return torch.from_numpy(np.stack(rows)).to(device)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in float32."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


# A loss function takes the model and a (batch, seq_len + 1) tensor, returns the loss to minimise and the
# language-model loss to report (they differ when auxiliary terms such as a router z-loss are added).
LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def lm_loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal language modelling."""
    logits = model(input_ids=batch[:, :-1]).logits
    loss = causal_lm_loss(logits, batch[:, 1:])
    return loss, loss.detach()


class TrainHook(Protocol):
    """Something that runs after every optimizer step. A hook with state to carry across a resume (such as a
    privacy accountant) also defines `state() -> dict` and `restore(state: dict)`."""

    def after_optimizer_step(self, step: int) -> None: ...


@dataclass
class TrainResult:
    """What a finished run reports: the loss of every step, tokens seen and wall time of this process."""

    losses: list[float]
    tokens: int
    seconds: float
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a torch.distributed process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


@contextmanager
def distributed_session(device: str) -> Iterator[str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1) and yield this rank's device.

    NCCL on CUDA (one GPU per rank, by LOCAL_RANK), gloo on CPU. Without torchrun this yields `device` and does
    nothing else, so every command runs unchanged in one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it: work that writes a shared cache (tokenization) is then
    done once, and the other ranks read it instead of racing to write it too."""
    rank, world_size = world()
    if world_size > 1 and rank != 0:
        dist.barrier()
    yield
    if world_size > 1 and rank == 0:
        dist.barrier()


def _no_progress(*_args, **_kwargs) -> None:
    """The progress callback of ranks other than 0: one bar per run, not one per process."""


def _mean_across_ranks(value: float, device: str) -> float:
    if world()[1] == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / world()[1]


def config_digest(payload: dict) -> str:
    """Short hash of a run's configuration: a checkpoint may only be resumed by the same configuration."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hook_states(hooks: Sequence[TrainHook]) -> list:
    return [hook.state() if hasattr(hook, "state") else None for hook in hooks]


def check_resume(run_dir: Path, resume: bool) -> None:
    """Refuse a `--resume` with nothing to resume, or a fresh run over an earlier run's checkpoint. Callers run
    this before loading any model, so that a wrong flag costs nothing."""
    exists = (run_dir / CHECKPOINT_DIRNAME).exists()
    if resume and not exists:
        raise CheckpointError(f"nothing to resume: no checkpoint at {run_dir}; run without --resume")
    if not resume and exists:
        raise CheckpointError(
            f"{run_dir / CHECKPOINT_DIRNAME}: a checkpoint of an earlier run exists; pass --resume to continue it "
            "or delete it to start over"
        )


def _save_checkpoint(run_dir: Path, step: int, named_params: Sequence[tuple[str, torch.nn.Parameter]], optimizer,
                     losses: list[float], digest: str, hooks: Sequence[TrainHook]) -> None:
    from safetensors.torch import save_file

    with atomic_directory(run_dir / CHECKPOINT_DIRNAME, overwrite=True) as staging:
        save_file({name: param.detach().cpu().contiguous() for name, param in named_params},
                  str(staging / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(torch.get_rng_state(), staging / "rng.pt")
        (staging / "state.json").write_text(json.dumps(
            {"step": step, "losses": losses, "config": digest, "hooks": _hook_states(hooks)}))


def _load_checkpoint(run_dir: Path, named_params, optimizer, digest: str,
                     hooks: Sequence[TrainHook]) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    checkpoint = run_dir / CHECKPOINT_DIRNAME
    if not (checkpoint / "state.json").exists():
        return 0, []
    try:
        state = json.loads((checkpoint / "state.json").read_text())
        tensors = load_file(str(checkpoint / "trainable.safetensors"))
        optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        rng_state = torch.load(checkpoint / "rng.pt", weights_only=True)
    except Exception as error:  # any unreadable piece means the checkpoint cannot be trusted
        raise CheckpointError(f"{checkpoint}: unreadable checkpoint ({error}); delete it to start over") from None
    if state.get("config") != digest:
        raise CheckpointError(
            f"{checkpoint}: was written by a different configuration; resume with the same flags, "
            "or delete the checkpoint to start over"
        )
    with torch.no_grad():
        for name, param in named_params:
            param.copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(rng_state)
    for hook, hook_state in zip(hooks, state.get("hooks", [])):
        if hook_state is not None:
            hook.restore(hook_state)
    return int(state["step"]), list(state["losses"])


def train(
    model: torch.nn.Module,
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    stream: TokenStream,
    config: OptimConfig,
    run_dir: Path,
    loss_fn: LossFn = lm_loss_fn,
    hooks: Sequence[TrainHook] = (),
    resume: bool = False,
    description: str = "training",
    make_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = None,
    sampler: BatchSampler | None = None,
    clip_grad_norm: bool = True,
) -> TrainResult:
    """Train `named_params` of `model` on `stream` for `config.steps` steps; only they get optimizer state.

    `make_optimizer` wraps or replaces AdamW (DP-SGD passes an Opacus optimizer), `sampler` replaces the
    shuffled batches (DP-SGD samples Poisson batches) and `clip_grad_norm=False` leaves clipping to the
    optimizer (DP-SGD clips per sample).
    """
    num_sequences = stream.num_sequences(config.seq_len)
    if num_sequences < 1:
        raise DataError(
            f"the training data has {stream.num_tokens} tokens, fewer than one sequence of {config.seq_len}; "
            "add data or lower --seq-len"
        )
    rank, world_size = world()
    if config.batch_size % world_size:
        raise DataError(f"--batch-size {config.batch_size} does not split over {world_size} processes; use a "
                        "multiple of the number of processes")
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        if make_optimizer is not None:
            raise FlexOlmoError("DP-SGD training runs in one process; launch it without torchrun")
        # Frozen tensors (the anchor) get no gradient hooks; only the trained ones are all-reduced.
        model = DistributedDataParallel(model, device_ids=[torch.device(config.device).index]
                                        if config.device.startswith("cuda") else None)
    params = [param for _, param in named_params]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    if make_optimizer is not None:
        optimizer = make_optimizer(optimizer)
    sampler = sampler or ShuffledBatches(config, num_sequences)
    digest = config_digest({"optim": config.model_dump(), "params": [name for name, _ in named_params]})
    start, losses = (0, [])
    if resume:
        start, losses = _load_checkpoint(run_dir, named_params, optimizer, digest, hooks)
    else:
        check_resume(run_dir, resume=False)
    model.train()
    began = time.perf_counter()
    tokens_this_process = 0
    bar = progress_bar(description, total=config.steps, start=start) if rank == 0 else nullcontext(_no_progress)
    with bar as advance:
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            optimizer.zero_grad(set_to_none=True)
            step_loss, micro_batches = 0.0, 0
            for micro in range(config.grad_accum):
                indices = sampler.indices(step, micro)[rank::world_size]
                if len(indices) == 0:  # a Poisson batch can be empty: nothing to learn from this draw
                    continue
                batch = make_batch(stream, indices, config.seq_len, config.device)
                loss, lm_loss = loss_fn(model, batch)
                (loss / config.grad_accum).backward()
                step_loss += float(lm_loss)
                micro_batches += 1
            step_loss = _mean_across_ranks(step_loss / max(micro_batches, 1), config.device)
            if micro_batches:
                if clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
            for hook in hooks:
                hook.after_optimizer_step(step)
            losses.append(step_loss)
            tokens_this_process += config.tokens_per_step
            rate = tokens_this_process / max(time.perf_counter() - began, 1e-9)
            advance(1, status=f"loss {step_loss:.3f}  {rate:,.0f} tok/s")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                if rank == 0:
                    _save_checkpoint(run_dir, step + 1, named_params, optimizer, losses, digest, hooks)
                if world_size > 1:
                    dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from
    model.eval()
    return TrainResult(losses, tokens_this_process, time.perf_counter() - began, resumed_from=start)
