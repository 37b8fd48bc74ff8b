"""What a demo run is: its settings, its domains, its two comparison protocols, the rows of its tables, where its
outputs live, and how a finished run is read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

import flexolmo
from flexolmo.coordinator.router_tuning import DEFAULT_STEPS as TUNE_STEPS
from flexolmo.core.errors import FlexOlmoError
from flexolmo.experiments.compute import TrainingRun, training_flops_per_token
from flexolmo.owner.expert import ExpertConfig
from flexolmo.training.loop import OptimConfig, config_digest

CLOSED_DOMAINS = ("code", "math", "legal", "biomedical", "literature")


NO_TUNING = "untuned"  # the router-tuning candidate that keeps the merged model's rows


PUBLIC = "public"


MIXED = "mixed"


# How much training every baseline gets. data_matched (the paper's, sections 4.3-4.4): each dense expert sees
# exactly the owner tokens a FlexOlmo expert sees (expert_steps x owner sequences per step x seq_len, per owner),
# in as many steps; compute is reported, not matched. flop_matched (ours, stricter for FlexOlmo): each dense expert
# trains until five of them cost FlexOlmo's training FLOPs (`DemoConfig.dense_steps`).
PROTOCOLS = {"data_matched": "data-matched (the paper's)", "flop_matched": "FLOP-matched (ours)"}


@dataclass(frozen=True)
class Row:
    """One row of the demo's tables: its name as the paper names it; `shared` when the same model stands in both
    protocols (nothing of it is a dense expert); `ablation` when only `--ablation` builds it."""

    label: str
    shared: bool = False
    ablation: bool = False


ROWS = {
    "public": Row("Public model (the anchor)", shared=True),
    "model_soup": Row("Model soup (public + dense experts, FFNs averaged)"),
    "btm": Row("BTM (the paper's: member weights once per sequence, from the context)"),
    "prompt_routing": Row("Prompt routing (the paper's: classifier fit on public proxy documents only)"),
    "btx_ffn_untuned": Row("BTX (FFN-only dense experts, no coordinated training), router untuned"),
    "btx_ffn": Row("BTX (FFN-only dense experts, no coordinated training)"),
    "flexolmo_untuned": Row("FlexOlmo without router tuning", shared=True),
    "flexolmo": Row("FlexOlmo", shared=True),
    "model_soup_full": Row("Model soup (the paper's: full-model dense experts, every weight averaged)", ablation=True),
    "btm_full": Row("BTM (the paper's, full-model dense experts)", ablation=True),
    "prompt_routing_full": Row("Prompt routing (the paper's, full-model dense experts)", ablation=True),
    "btx_untuned": Row("BTX (the paper's: full-model dense experts, non-FFN weights averaged), router untuned",
                       ablation=True),
    "btx": Row("BTX (the paper's: full-model dense experts, non-FFN weights averaged)", ablation=True),
    "btm_per_position": Row("BTM (per-position, ours)", ablation=True),
    "prompt_routing_private": Row("Prompt routing (needs pooled private data: fit on the owners' documents)",
                                  ablation=True),
    **{f"dense_{d}": Row(f"Dense expert alone: {d}", ablation=True) for d in CLOSED_DOMAINS},
    "unrestricted": Row("Unrestricted: anchor FFNs on all closed data pooled (upper bound)", ablation=True),
    "flexolmo_owner_only": Row("FlexOlmo, experts on owner text only (public share 0)", shared=True, ablation=True),
    "flexolmo_random_init": Row("FlexOlmo, random router rows", shared=True, ablation=True),
    "flexolmo_bias_dropped_untuned": Row("FlexOlmo trained with the negative bias, bias dropped, untuned",
                                         shared=True, ablation=True),
    "flexolmo_bias_untuned": Row("FlexOlmo trained with the negative bias, bias applied, untuned", shared=True,
                                 ablation=True),
}

# Bump when a row's meaning or an artefact's path changes: a run directory of another layout is refused, so no
# cached result of an older meaning is read as a new one.
LAYOUT = 2


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


# ExpertConfig fields the demo sets for every expert; every other field keeps train-expert's default.
_DEMO_SET_EXPERT_FIELDS = {"anchor", "data", "heldout", "name", "out", "eval_max_sequences", "public_share", "optim"}


def expert_defaults() -> dict:
    """train-expert's defaults for what the demo does not set (router init, router lr multiple, z-loss, bias...)."""
    placeholder = ExpertConfig(anchor=Path("anchor"), data=[Path("data")], name="owner", out=Path("out"))
    return placeholder.model_dump(mode="json", exclude=_DEMO_SET_EXPERT_FIELDS)


def finished_demo_config(out: Path) -> "DemoConfig":
    """The settings of the finished demo under `out`, for work that builds on its models (the benchmarks)."""
    if not (out / "results.json").exists():
        raise FlexOlmoError(f"{out} holds no finished demo; run `flexolmo demo --out {out}` first")
    recorded = json.loads((out / "demo_config.json").read_text())
    config = DemoConfig(**{**recorded["config"], "out": out})
    if recorded.get("digest") != config.digest():
        # Its models would be compared with experts trained now, under other train-expert defaults.
        raise FlexOlmoError(f"{out} holds a demo of an older flexolmo or made under other train-expert defaults; "
                            "run `flexolmo demo --out NEW_DIR` and pass --demo NEW_DIR")
    return config


def shipped_data_dir() -> Path:
    """`data/demo` of the repository this package runs from."""
    return Path(flexolmo.__file__).resolve().parents[2] / "data" / "demo"


class DemoConfig(BaseModel):
    """`flexolmo demo`: sizes of every step; the defaults are the full demo (about 19 minutes on 2 idle cores)."""

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
    tune_lrs: tuple[float, ...] = Field((3e-4, 1e-3), min_length=1,
                                        description="router tuning learning rates tried; the rule in docs/demo.md "
                                                    "keeps the best closed-domain average on validation text")
    btm_top_k: int = Field(2, ge=1, description="members the BTM ensembles keep (per sequence, or per position)")
    eval_max_sequences: int = Field(48, ge=1, description="held-out sequences scored per domain")
    context_tokens: int = Field(32, ge=0, description="leading tokens of each held-out window given as context "
                                "and not scored; BTM and prompt routing choose their members from them")
    router_samples: int = Field(100, ge=2, description="documents per class to fit a prompt router (at most)")
    mixed_documents: int = Field(100, ge=1, description="stitched documents in the mixed-domain set")
    ablation: bool = Field(False, description="also the extra rows: the paper's baselines from full-model dense "
                                               "experts (model soup, BTM, prompt routing, BTX), our stronger "
                                               "baselines (per-position BTM, prompt routing fit on private text), "
                                               "each dense expert alone, the unrestricted upper bound, and the "
                                               "experts of the ablation (owner text only, a random router row, the "
                                               "negative bias)")
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
        """What decides the demo's numbers (the device only places the work): its own settings and the owners'
        training settings it leaves at train-expert's defaults, so a run directory made under other defaults is
        refused rather than reused."""
        # --ablation only adds steps: a run with it extends, and reuses, the run without it.
        return config_digest({**self.model_dump(mode="json", exclude={"out", "device", "ablation"}),
                              "expert_defaults": expert_defaults(), "layout": LAYOUT})

    def owner_sequences(self) -> int:
        """Owner sequences in each batch of a FlexOlmo expert (the rest is public text)."""
        return self.batch_size - round(self.batch_size * self.public_share)

    def dense_optim(self, protocol: str, anchor_config: dict, owners: int = 1,
                    full_model: bool = False) -> OptimConfig:
        """How one dense model trains under `protocol` on `owners` owners' text pooled (1: a dense expert), its
        FFNs only or, with `full_model`, every weight. Data-matched: a FlexOlmo expert's owner sequences per step,
        for its steps (so exactly its owner tokens per owner); FLOP-matched: full batches for `dense_steps` per
        owner."""
        if protocol == "data_matched":
            return self.optim(self.expert_steps * owners).model_copy(update={"batch_size": self.owner_sequences()})
        if protocol == "flop_matched":
            return self.optim(self.dense_steps(anchor_config, dense_kind(full_model)) * owners)
        raise ValueError(f"unknown protocol {protocol!r}")

    def dense_run(self, protocol: str, anchor_config: dict, owners: int = 1, full_model: bool = False) -> TrainingRun:
        """The training run behind one dense model under `protocol` (see `dense_optim`): owner text only."""
        optim = self.dense_optim(protocol, anchor_config, owners, full_model)
        return TrainingRun(dense_kind(full_model), optim.steps, optim.batch_size, optim.batch_size)

    def dense_steps(self, anchor_config: dict, kind: str = "dense_ffn") -> int:
        """Steps of each dense expert (trained as `kind` says) so that five of them cost at least FlexOlmo's
        training: five coordinated experts and every router tuning run (`flexolmo.experiments.compute`); never
        fewer than the owners' steps."""

        flexolmo = sum(run.flops(anchor_config, self.seq_len) for run in flexolmo_runs(self))
        per_dense_step = self.batch_size * self.seq_len * training_flops_per_token(anchor_config, self.seq_len, kind)
        steps = -(-flexolmo // (len(CLOSED_DOMAINS) * per_dense_step))  # ceiling
        return max(self.expert_steps, int(steps))


def dense_kind(full_model: bool) -> str:
    """The training kind (`flexolmo.experiments.compute`) of a dense expert: FFNs only, or every weight."""
    return "dense_full" if full_model else "dense_ffn"


def flexolmo_runs(config: DemoConfig, owner_only: bool = False) -> list:
    """FlexOlmo's training runs: five coordinated experts, then one router tuning per learning rate tried.
    `owner_only`: experts that see owner text only (public share 0), as many owner tokens in as many steps."""

    owner_sequences = config.owner_sequences()
    per_step = owner_sequences if owner_only else config.batch_size
    owners = [TrainingRun("coordinated", config.expert_steps, per_step, owner_sequences)]
    return owners * len(CLOSED_DOMAINS) + tuning_runs(config)


def tuning_runs(config: DemoConfig) -> list:
    """One router tuning per learning rate tried (proxies and public text: no owner tokens)."""
    return [TrainingRun("router_only", config.tune_steps, config.batch_size, 0, top_k=config.top_k)] * \
        len(config.tune_lrs)
