"""Differentially private expert training (DP-SGD through Opacus), as plug-ins to the one training loop.

What DP-SGD needs from the loop, and where it comes from:
- per-sample gradients of the trainable tensors only: Opacus' `GradSampleModule` around the owner model. Our
  MoE block runs each expert as plain `nn.Linear` calls on the batch-first tensor, which Opacus supports
  exactly (transformers' fused expert block, which flattens the batch, would not be);
- Poisson sampling: every training sequence joins a step's batch independently with rate q = batch / N;
- public text mixed into the batch (`--public-share`): a fixed number of public sequences per step, drawn
  independently of the private data. Each is clipped and noised like a private one; the sensitivity of the
  noised sum to one private sequence is still `max_grad_norm`, so the accounting (rate q over the owner's
  sequences) is unchanged;
- clipping each sample's gradient to `max_grad_norm` and Gaussian noise calibrated so that the planned number of
  steps spends exactly the requested epsilon at delta: Opacus' `DPOptimizer` and its accountant;
- the spent (epsilon, delta) after the steps actually taken, written into the package manifest.

The router row: `mean_hidden` initialisation is a statistic of the private data outside the DP mechanism, so
under DP the owner's row is either that statistic released through the Gaussian mechanism
(`dp_mean_hidden`, a prior release that the accountant composes with training, see `calibrate_noise`), or
the public row (the default under DP), or random; it is then trained under DP like every other trainable
tensor.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.world import world
from flexolmo.training.loop import MixedBatches

ACCOUNTANT = "rdp"


class DPConfig(BaseModel):
    """Target privacy of one expert's training."""

    epsilon: float = Field(gt=0, description="target epsilon, spent over the planned steps")
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta (keep it below 1 / training sequences)")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    router_noise_multiplier: float = Field(
        4.0, gt=0, description="noise of the DP router statistic (--router-init dp_mean_hidden), sensitivity 1")


@dataclass
class PoissonBatches:
    """Each of the owner's sequences (the stream's first `num_sequences`) joins each step's batch with
    probability `sample_rate`, decided by (seed, step) alone; `public` adds a fixed draw of public sequences."""

    num_sequences: int
    sample_rate: float
    seed: int
    public: MixedBatches | None = None

    def indices(self, step: int, micro: int) -> np.ndarray:
        draws = np.random.default_rng([self.seed, step, micro, 0xD9]).random(self.num_sequences)
        private = np.flatnonzero(draws < self.sample_rate)
        if self.public is None:
            return private
        return np.concatenate([private, self.public.indices(step, micro)])


# One release through the Gaussian mechanism: (noise multiplier, sample rate, steps), Opacus' history format.
Release = tuple[float, float, int]


def spent_epsilon(releases: Sequence[Release], delta: float) -> float:
    """Epsilon at `delta` of a sequence of releases, composed by the RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(releases)
    return float(accountant.get_epsilon(delta)) if releases else 0.0


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: Sequence[Release] = ()) -> float:
    """The smallest noise multiplier (to 1e-3) at which `steps` steps after the `prior` releases spend at most
    `epsilon`: Opacus' accountant, searched by bisection."""
    if prior and spent_epsilon(prior, delta) >= epsilon:
        raise FlexOlmoError(f"the router statistic alone spends epsilon {spent_epsilon(prior, delta):.2f} of "
                            f"{epsilon:g}; raise --dp-router-noise or --dp-epsilon")
    low, high = 0.0, 1.0
    while spent_epsilon([*prior, (high, sample_rate, steps)], delta) > epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise FlexOlmoError(f"cannot reach epsilon {epsilon:g} at delta {delta:g} in {steps} steps; raise "
                                "epsilon or lower the steps")
    # A fixed number of halvings (not `while high - low > 1e-3`), so that no slip in the bounds can loop forever.
    for _ in range(math.ceil(math.log2((high - low) / 1e-3))):
        middle = (low + high) / 2
        if spent_epsilon([*prior, (middle, sample_rate, steps)], delta) > epsilon:
            low = middle
        else:
            high = middle
    return high


class PrivacyAccountant:
    """Counts the steps taken (as a training hook) and reports the (epsilon, delta) they and the `prior`
    releases spent. It also owns the noise generator, so that a resumed run draws the same noise as an
    uninterrupted one."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, seed: int,
                 prior: Sequence[Release] = ()):
        from opacus.accountants import RDPAccountant

        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.prior = list(prior)
        self.steps = 0
        self.noise_generator = torch.Generator().manual_seed(seed)
        self._accountant = RDPAccountant()
        self._accountant.history = list(self.prior)

    def after_optimizer_step(self, step: int) -> None:
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps += 1

    def epsilon(self) -> float:
        return spent_epsilon(self._accountant.history, self.delta)

    def state(self) -> dict:
        return {"steps": self.steps, "noise_generator": self.noise_generator.get_state().tolist()}

    def restore(self, state: dict) -> None:
        for _ in range(state["steps"]):
            self.after_optimizer_step(0)
        self.noise_generator.set_state(torch.tensor(state["noise_generator"], dtype=torch.uint8))


@dataclass
class PrivateTraining:
    """Everything the training loop needs to run DP-SGD, and what goes into the manifest afterwards."""

    config: DPConfig
    model: torch.nn.Module
    sampler: PoissonBatches
    accountant: PrivacyAccountant
    noise_multiplier: float
    expected_batch_size: int

    def make_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                           max_grad_norm=self.config.max_grad_norm, expected_batch_size=self.expected_batch_size,
                           generator=self.accountant.noise_generator)

    def detach(self) -> None:
        """Remove Opacus' hooks from the model once training is over (evaluation runs without them)."""
        self.model.remove_hooks()

    def record(self) -> dict:
        """The manifest's `privacy.dp` entry."""
        import opacus

        return {
            "mechanism": "DP-SGD (Opacus), Poisson sampling, per-sample clipping, Gaussian noise",
            "epsilon": self.accountant.epsilon(),
            "epsilon_target": self.config.epsilon,
            "delta": self.config.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "sample_rate": self.sampler.sample_rate,
            "steps": self.accountant.steps,
            "prior_releases": [list(release) for release in self.accountant.prior],
            "accountant": ACCOUNTANT,
            "opacus": opacus.__version__,
        }


def check_dp_settings(grad_accum: int) -> None:
    """The refusals of DP training that need no model or data, so that callers can check them first."""
    if grad_accum != 1:
        raise FlexOlmoError("DP training takes --grad-accum 1; raise --batch-size instead (batches are Poisson "
                            "sampled, so accumulation would change the privacy analysis)")
    if world()[1] > 1:
        raise FlexOlmoError("DP-SGD training runs in one process; launch it without torchrun")


def prepare_private_training(model: torch.nn.Module, config: DPConfig, num_sequences: int, batch_size: int,
                             steps: int, grad_accum: int, seed: int,
                             public: MixedBatches | None = None, prior: Sequence[Release] = ()) -> PrivateTraining:
    """Wrap `model` for per-sample gradients and calibrate the noise for `steps` Poisson-sampled steps.

    `batch_size` is the expected batch: `public`'s sequences per step plus, in expectation, the owner's
    (`num_sequences` of them, at the start of the stream). `prior` are releases made before training (the DP
    router statistic); the noise is calibrated so that they and the training together spend `config.epsilon`."""
    from opacus import GradSampleModule

    # Expected here, and not actionable by a user: frozen inputs (token embeddings) under Opacus' backward hooks,
    # and RDP picking its largest order for small sample rates.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

    check_dp_settings(grad_accum)
    private_batch = batch_size - (sum(public.counts) if public else 0)
    if private_batch >= num_sequences:
        raise FlexOlmoError(f"DP training needs more training sequences ({num_sequences}) than the {private_batch} "
                            "private sequences of a batch; add data or lower --batch-size")
    if config.delta >= 1 / num_sequences:
        raise FlexOlmoError(f"--dp-delta {config.delta:g} is not below 1/N = {1 / num_sequences:.2g} (N = "
                            f"{num_sequences} training sequences); a meaningful delta is smaller")
    sample_rate = private_batch / num_sequences
    noise = calibrate_noise(config.epsilon, config.delta, sample_rate, steps, prior)
    return PrivateTraining(
        config=config,
        model=GradSampleModule(model, batch_first=True, loss_reduction="mean"),
        sampler=PoissonBatches(num_sequences, sample_rate, seed, public),
        accountant=PrivacyAccountant(noise, sample_rate, config.delta, seed, prior),
        noise_multiplier=noise,
        expected_batch_size=batch_size,
    )
