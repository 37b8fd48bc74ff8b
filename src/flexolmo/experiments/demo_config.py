"""What a demo run is: its settings, its domains, where its outputs live, and how a finished run is read back."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

import flexolmo
from flexolmo.coordinator.router_tuning import DEFAULT_STEPS as TUNE_STEPS
from flexolmo.core.errors import FlexOlmoError
from flexolmo.experiments.compute import TrainingRun, training_flops_per_token
from flexolmo.training.loop import OptimConfig, config_digest

CLOSED_DOMAINS = ("code", "math", "legal", "biomedical", "literature")


NO_TUNING = "untuned"  # the router-tuning candidate that keeps the merged model's rows


PUBLIC = "public"


MIXED = "mixed"


def merged_model_dir(out: Path, method: str, lr: float | None) -> Path:
    """Where a demo under `out` keeps `method`'s merged model: untuned, or router-tuned at `lr`."""
    return out / "models" / (f"{method}_untuned" if lr is None else f"{method}_tuned_lr{lr:g}")


def chosen_model_dir(out: Path, method: str = "flexolmo") -> Path:
    """The model a finished demo under `out` reports as `method`: the candidate its validation text chose."""
    results = out / "results.json"
    try:
        lr = json.loads(results.read_text())["router_tuning"][method]["chosen_lr"]
    except (OSError, ValueError, KeyError) as error:
        raise FlexOlmoError(f"{results} holds no finished demo ({error}); run the demo first") from None
    return merged_model_dir(out, method, lr)


def finished_demo_config(out: Path) -> "DemoConfig":
    """The settings of the finished demo under `out`, for work that builds on its models (the benchmarks)."""
    if not (out / "results.json").exists():
        raise FlexOlmoError(f"{out} holds no finished demo; run `flexolmo demo --out {out}` first")
    return DemoConfig(**{**json.loads((out / "demo_config.json").read_text())["config"], "out": out})


def shipped_data_dir() -> Path:
    """`data/demo` of the repository this package runs from."""
    return Path(flexolmo.__file__).resolve().parents[2] / "data" / "demo"


class DemoConfig(BaseModel):
    """`flexolmo demo`: sizes of every step; the defaults are the full demo (19 minutes on 2 idle cores)."""

    data_dir: Path = Field(default_factory=shipped_data_dir, description="shipped corpora and anchor")
    out: Path = Field(Path("runs/demo"), description="where every artefact and the report go")
    quick: bool = Field(False, description="a 3-minute smoke run: a few steps and sequences; numbers not meaningful")
    expert_steps: int = Field(60, ge=1, description="optimizer steps per owner's expert")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=16)
    lr: float = Field(2e-3, gt=0, description="peak learning rate of expert and dense fine-tuning")
    public_share: float = Field(0.5, ge=0, lt=1, description="share of each owner batch drawn from public text")
    top_k: int = Field(2, ge=1, description="experts per token in the merged model")
    tune_steps: int = Field(TUNE_STEPS, ge=1, description="router tuning steps")
    tune_lrs: tuple[float, ...] = Field((1e-3, 3e-3), min_length=1,
                                        description="router tuning learning rates tried; the best closed-domain "
                                                    "average on validation text is kept")
    btm_top_k: int = Field(2, ge=1, description="experts per position in the BTM ensemble")
    eval_max_sequences: int = Field(48, ge=1, description="held-out sequences scored per domain")
    context_tokens: int = Field(32, ge=0, description="leading tokens of each held-out window given as context "
                                "and not scored; prompt routing chooses its member from them")
    router_samples: int = Field(100, ge=2, description="documents per domain to fit the prompt router")
    mixed_documents: int = Field(100, ge=1, description="stitched documents in the mixed-domain set")
    ablation: bool = Field(False, description="also train the unrestricted upper bound (all closed data pooled) "
                                               "and the ablation's experts: a random router row, the negative bias "
                                               "(five more experts each)")
    seed: int = 0
    device: str = Field("cpu", description="torch device every model trains and runs on")
    dtype: str = Field("float32", pattern="^(float32|bfloat16)$",
                       description="dtype every model trains and runs in")

    @classmethod
    def quick_run(cls, **overrides) -> "DemoConfig":
        settings = dict(quick=True, expert_steps=3, batch_size=2, eval_max_sequences=3, router_samples=8,
                        mixed_documents=12, context_tokens=8, tune_steps=2, out=Path("runs/demo-quick"))
        return cls(**{**settings, **overrides})

    def optim(self, steps: int) -> OptimConfig:
        return OptimConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=max(1, steps // 10), checkpoint_every=max(1, steps // 3), seed=self.seed,
                           device=self.device, dtype=self.dtype)

    def digest(self) -> str:
        """What decides the demo's numbers (the device only places the work)."""
        # --ablation only adds steps: a run with it extends, and reuses, the run without it.
        return config_digest(self.model_dump(mode="json", exclude={"out", "device", "ablation"}))

    def dense_steps(self, anchor_config: dict) -> int:
        """Steps of each dense expert so that five of them cost at least FlexOlmo's training: five coordinated
        experts and every router tuning run (`flexolmo.experiments.compute`); never fewer than the owners' steps."""

        flexolmo = sum(run.flops(anchor_config, self.seq_len) for run in flexolmo_runs(self))
        per_dense_step = self.batch_size * self.seq_len * training_flops_per_token(anchor_config, self.seq_len,
                                                                                    "dense_ffn")
        steps = -(-flexolmo // (len(CLOSED_DOMAINS) * per_dense_step))  # ceiling
        return max(self.expert_steps, int(steps))


def flexolmo_runs(config: DemoConfig) -> list:
    """FlexOlmo's training runs: five coordinated experts, then one router tuning per learning rate tried."""

    owner_sequences = config.batch_size - round(config.batch_size * config.public_share)
    owners = [TrainingRun("coordinated", config.expert_steps, config.batch_size, owner_sequences)]
    tunings = [TrainingRun("router_only", config.tune_steps, config.batch_size, 0, top_k=config.top_k)]
    return owners * len(CLOSED_DOMAINS) + tunings * len(config.tune_lrs)
