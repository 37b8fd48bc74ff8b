"""One training loop for every stage (anchor pretraining, expert training, dense baselines).

What differs between stages is passed in: which parameters train, how a batch becomes a loss, and hooks that
run around each step (clamping a bias, DP accounting, logging). The loop owns what must be the same
everywhere: the data order, the learning-rate schedule, gradient accumulation, checkpoints and resumption.

Resumption is exact: the batch at step s depends only on (seed, s), the schedule is a function of s, and a
checkpoint holds the trainable tensors, the optimizer state and the loss history. A run killed at any moment
(SIGKILL included) and resumed produces the same losses as a run that was never interrupted.

A checkpoint also records the run's identity (`run_state`): resuming with other settings or other data is
refused, naming what differs.

Several processes: launched under `torchrun`, each rank takes every world-size-th sequence of the global batch,
so N processes run the same optimisation as one process with the same `batch_size` (up to float summation
order). How the model is spread over them is a strategy object (`flexolmo.training.distributed`): replicated (one
process, or DDP) or sharded (FSDP2). The strategy also applies the precision policy (`precision`) and writes
and reads checkpoints; the loop is the same for all. Rank 0 alone shows progress.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError, FlexOlmoError
from flexolmo.core.precision import PrecisionPolicy
from flexolmo.core.progress import progress_bar
from flexolmo.core.world import world
from flexolmo.data.tokens import TokenStream
from flexolmo.training.distributed import ReplicatedStrategy, TrainingStrategy
from flexolmo.training.run_state import check_identity, check_work_dir, read_state


class OptimConfig(BaseModel):
    """Optimisation settings shared by every training stage."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of the peak")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps before the cosine decay; unset: "
                                     "10% of the steps, at least 1")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="global gradient-norm clip")
    seed: int = Field(0, description="seed for initialisation and data order")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    device: str = Field("cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype: float32, or bfloat16 for "
                                                  "mixed precision (float32 "
                       "master weights and optimizer state, bf16 matmuls, frozen weights stored in bf16)")

    @property
    def warmup(self) -> int:
        """The warmup actually run: the one place its default is decided, for the API and every command."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def learning_rate(step: int, config: OptimConfig) -> float:
    """Linear warmup to the peak, then cosine decay towards `min_lr_ratio * lr`, which step `steps` would reach
    (the last step taken, `steps - 1`, is one cosine step above it)."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
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
    # The trained parameters as the strategy holds them (sharded ones under FSDP), under their names.
    trained: list = field(default_factory=list)


def _no_progress(*_args, **_kwargs) -> None:
    """The progress callback of ranks other than 0: one bar per run, not one per process."""


def _mean_across_ranks(value: float, device: str) -> float:
    if world()[1] == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / world()[1]


def config_digest(payload: dict) -> str:
    """Short hash of a run's configuration (the demo names its finished steps with it)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Optimisation settings that do not change the trained tensors, so a resumed run may change them.
_NOT_IDENTITY = {"device", "checkpoint_every"}


def run_identity(config: OptimConfig, named_params: Sequence[tuple[str, torch.nn.Parameter]],
                 strategy: TrainingStrategy, identity: dict) -> dict:
    """Everything a checkpoint must share with the run that resumes it: the caller's settings and data
    identity, the optimisation settings, the trained tensors and the checkpoint format."""
    return {**identity, "optim": config.model_dump(exclude=_NOT_IDENTITY),
            "trained_tensors": config_digest({"names": [name for name, _ in named_params]}),
            "checkpoint_format": strategy.checkpoint_format}


def _hook_states(hooks: Sequence[TrainHook]) -> list:
    return [hook.state() if hasattr(hook, "state") else None for hook in hooks]


def _restore_hooks(hooks: Sequence[TrainHook], states: list) -> None:
    for hook, hook_state in zip(hooks, states):
        if hook_state is not None:
            hook.restore(hook_state)


def _check_fits(stream: TokenStream, config: OptimConfig, dp: bool) -> int:
    """The number of training sequences, once the data and the batch fit this run's processes."""
    num_sequences = stream.num_sequences(config.seq_len)
    if num_sequences < 1:
        raise DataError(
            f"the training data has {stream.num_tokens} tokens, fewer than one sequence of {config.seq_len}; "
            "add data or lower --seq-len"
        )
    world_size = world()[1]
    if config.batch_size % world_size:
        raise DataError(f"--batch-size {config.batch_size} does not split over {world_size} processes; use a "
                        "multiple of the number of processes")
    if world_size > 1 and dp:
        raise FlexOlmoError("DP-SGD training runs in one process; launch it without torchrun")
    return num_sequences


@dataclass
class _StepParts:
    """What one optimizer step uses besides the model and data; `clip` is None when the optimizer clips."""

    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    loss_fn: LossFn
    strategy: TrainingStrategy
    clip: list[torch.nn.Parameter] | None


def _param_groups(named_params: Sequence[tuple[str, torch.nn.Parameter]], lr_scales: Mapping[str, float]
                  ) -> list[dict]:
    """One optimizer group per learning-rate multiple, in the order the tensors come (scale 1 unless named)."""
    unknown = sorted(set(lr_scales) - {name for name, _ in named_params})
    if unknown:
        raise ValueError(f"lr_scales names tensors that are not trained: {', '.join(unknown)}")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named_params:
        groups.setdefault(float(lr_scales.get(name, 1.0)), []).append(param)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def _optimizer_step(model: torch.nn.Module, stream: TokenStream, config: OptimConfig, step: int,
                    parts: _StepParts) -> float:
    """One optimizer step over `config.grad_accum` micro-batches; returns the mean LM loss over the ranks."""
    rank, world_size = world()
    for group in parts.optimizer.param_groups:
        group["lr"] = learning_rate(step, config) * group.get("lr_scale", 1.0)
    parts.optimizer.zero_grad(set_to_none=True)
    step_loss, micro_batches = 0.0, 0
    for micro in range(config.grad_accum):
        indices = parts.sampler.indices(step, micro)[rank::world_size]
        if len(indices) == 0:  # a Poisson batch can be empty: nothing to learn from this draw
            continue
        batch = make_batch(stream, indices, config.seq_len, config.device)
        with parts.strategy.forward_context(config.device):
            loss, lm_loss = parts.loss_fn(model, batch)
        (loss / config.grad_accum).backward()
        step_loss += float(lm_loss)
        micro_batches += 1
    step_loss = _mean_across_ranks(step_loss / max(micro_batches, 1), config.device)
    if micro_batches:
        if parts.clip is not None:
            parts.strategy.clip_grad_norm(parts.clip, config.grad_clip)
        parts.optimizer.step()
    return step_loss


def _saved_state(run_dir: Path, resume: bool, identity: dict) -> dict | None:
    """The checkpoint to resume from (None: a fresh start), refused when another run's settings made it."""
    check_work_dir(run_dir, resume)
    state = read_state(run_dir) if resume else None
    if state is not None:
        check_identity(run_dir, state, identity)
    return state


def _optimizer(named_params: Sequence[tuple[str, torch.nn.Parameter]], config: OptimConfig,
               lr_scales: Mapping[str, float],
               make_optimizer: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None,
               ) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(_param_groups(named_params, lr_scales), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.95))
    return make_optimizer(optimizer) if make_optimizer is not None else optimizer


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
    strategy: TrainingStrategy | None = None,
    identity: dict | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train `named_params` of `model` on `stream` for `config.steps` steps; only they get optimizer state.

    `make_optimizer` wraps or replaces AdamW (DP-SGD passes an Opacus optimizer), `sampler` replaces the
    shuffled batches (DP-SGD samples Poisson batches) and `clip_grad_norm=False` leaves clipping to the
    optimizer (DP-SGD clips per sample). `strategy` spreads the model over processes (default: replicated, with
    the precision of `config.dtype`); `identity` describes the caller's settings and data, so that a checkpoint
    is resumed only by the same run. `lr_scales` multiplies the learning rate of the named tensors (others: 1),
    so a part of the model (an owner's router row) can learn at its own rate on the same schedule. The trained
    tensors are float32 master weights after the call.
    """
    num_sequences = _check_fits(stream, config, dp=make_optimizer is not None)
    strategy = strategy or ReplicatedStrategy(PrecisionPolicy.from_name(config.dtype))
    scaled = {"lr_scales": dict(sorted(lr_scales.items()))} if lr_scales else {}
    identity = run_identity(config, named_params, strategy, {**(identity or {}), **scaled})
    state = _saved_state(run_dir, resume, identity)
    model, named_params = strategy.prepare(model, named_params, config.device)
    params = [param for _, param in named_params]
    optimizer = _optimizer(named_params, config, lr_scales or {}, make_optimizer)
    sampler = sampler or ShuffledBatches(config, num_sequences)
    start, losses = (0, [])
    if state is not None:
        state = strategy.load_checkpoint(run_dir, model, named_params, optimizer)
        _restore_hooks(hooks, state.get("hooks", []))
        start, losses = int(state["step"]), list(state["losses"])
    model.train()
    began = time.perf_counter()
    tokens_this_process = 0
    main = world()[0] == 0
    bar = progress_bar(description, total=config.steps, start=start) if main else nullcontext(_no_progress)
    with bar as advance:
        for step in range(start, config.steps):
            step_loss = _optimizer_step(model, stream, config, step, _StepParts(
                optimizer, sampler, loss_fn, strategy, params if clip_grad_norm else None))
            for hook in hooks:
                hook.after_optimizer_step(step)
            losses.append(step_loss)
            tokens_this_process += config.tokens_per_step
            rate = tokens_this_process / max(time.perf_counter() - began, 1e-9)
            advance(1, status=f"loss {step_loss:.3f}  {rate:,.0f} tok/s")
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                strategy.save_checkpoint(run_dir, model, named_params, optimizer, {
                    "step": step + 1, "losses": losses, "identity": identity, "hooks": _hook_states(hooks)})
    model.eval()
    return TrainResult(losses, tokens_this_process, time.perf_counter() - began, resumed_from=start,
                       trained=named_params)
