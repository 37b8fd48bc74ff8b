"""Coordinator-side router tuning: train only the router rows of a merged model on the owners' proxies.

Each owner sends a proxy file (`flexolmo select-proxy`): hashes of public documents that look like its data.
The coordinator resolves them against its own public text, then trains every router row (public row
included) of the merged model, at the model's own top-k, on batches of proxy documents mixed with public text,
through the one training loop (checkpoints, exact `--resume`). Nothing else trains: the new checkpoint is
written through the merge module's write path with only the router matrices replaced, so every other tensor is
bit-identical, and opt-out stays exact (removing a tuned row equals masking it). `flexolmo_experts.json`
records the tuning under `router_tuning`: proxy files by digest, data, settings and losses.

Proxies are refused when their expert is not in the model (an owner who opted out must not steer the router)
or was trained with DP (the selection reads private data outside the DP mechanism).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from flexolmo.coordinator.merge import replace_router_rows
from flexolmo.coordinator.proxies import check_proxies, resolve_proxies, write_proxy_text
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import CheckpointError, DataError, ProxyError
from flexolmo.core.fileio import atomic_write_json, check_outside_inputs, sha256_file
from flexolmo.core.provenance import software_versions, utc_now
from flexolmo.data.public_sample import describe_files
from flexolmo.data.tokens import TokenStream, load_token_stream
from flexolmo.model.merged_format import MERGED_METADATA_FILE, authenticate_merged_model, read_merged_info
from flexolmo.model.moe import ROUTER_Z_LOSS_COEF, moe_blocks
from flexolmo.model.runtime import load_model
from flexolmo.owner.owner_model import owner_loss
from flexolmo.training.loop import MixedBatches, OptimConfig, config_digest, train

# Chosen on the demo's validation text (benchmarks/docs/router-tuning.md).
DEFAULT_STEPS = 40
DEFAULT_LR = 1e-3
SETTINGS_FILE = "tune_settings.json"
PROXY_TEXT_FILE = "proxies.jsonl.gz"


class TuneConfig(BaseModel):
    """`flexolmo tune-router`: everything that decides a router tuning."""

    model: Path = Field(description="merged model directory to tune")
    public: list[Path] = Field(description="the coordinator's public text: proxies are resolved in it, and it is "
                                           "mixed into every batch")
    proxies: list[Path] = Field(description="proxy files from the owners (`flexolmo select-proxy`)")
    out: Path = Field(description="tuned model directory to write")
    public_share: float = Field(0.5, ge=0, lt=1, description="share of each batch's sequences from public text")
    z_loss_coef: float = Field(ROUTER_Z_LOSS_COEF, ge=0, description="router z-loss coefficient")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=DEFAULT_STEPS, lr=DEFAULT_LR))


def mixed_stream(first: TokenStream, second: TokenStream, optim: OptimConfig,
                 second_share: float) -> tuple[TokenStream, MixedBatches]:
    """`first` then `second` as one stream, and batches with `second_share` of their sequences from `second`.

    No window crosses from one part into the other: `first` keeps only the windows it fills, and `second`'s
    windows start at the first window boundary after `first` ends."""
    seq_len, batch = optim.seq_len, optim.batch_size
    count = round(batch * second_share)
    if not (0 <= count < batch) or (second_share > 0 and count == 0):
        raise DataError(f"--public-share {second_share} of a batch of {batch} leaves no proxy or no public "
                        "sequence; change --batch-size or --public-share")
    stream = TokenStream([*first.files, *second.files])
    first_windows = first.num_sequences(seq_len)
    second_start = math.ceil(first.num_tokens / seq_len)
    if first_windows < 1 or (count and stream.num_sequences(seq_len) <= second_start):
        raise DataError(f"too little proxy or public text for one sequence of {seq_len} tokens; lower --seq-len "
                        "or pass more proxies or public text")
    ranges = [(0, first_windows), (second_start, stream.num_sequences(seq_len))]
    return stream, MixedBatches(optim, ranges, [batch - count, count])


def router_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the router rows (every expert's, the public one included)."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(".mlp.gate.rows." in name and name.endswith(".weight"))
        if param.requires_grad:
            trainable.append((name, param))
    return trainable


def _settings(config: TuneConfig, records: list[dict]) -> dict:
    """What a checkpoint of this tuning may only be resumed with."""
    return {"model_metadata_sha256": sha256_file(config.model / MERGED_METADATA_FILE),
            "proxies": sorted(record["sha256"] for record in records),
            "public": [entry["sha256"] for entry in describe_files(config.public)],
            "public_share": config.public_share, "z_loss_coef": config.z_loss_coef}


def _prepare_work(work: Path, settings: dict, resume: bool) -> None:
    settings_file = work / SETTINGS_FILE
    digest = config_digest(settings)
    if resume:
        if not settings_file.exists():
            raise CheckpointError(f"nothing to resume: no tuning run at {work}; run without --resume")
        if json.loads(settings_file.read_text()).get("digest") != digest:
            raise CheckpointError(f"{work}: was started with another model, proxies or public text; resume with "
                                  "the same inputs, or delete it to start over")
    elif work.exists():
        raise CheckpointError(f"{work}: an earlier tuning run exists; pass --resume to continue it or delete it")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, {"digest": digest, "settings": settings})


def tune_router(config: TuneConfig, resume: bool = False, trust: CoordinatorTrust | None = None) -> dict:
    """Tune the router rows of `config.model` on the proxies and public text; write `config.out` (logged, and
    signed with `trust.sign_key` when given); return the new checkpoint's metadata. The model is authenticated
    first with `trust.trusted_keys` (else a warning says it is not)."""

    if config.out.exists():
        raise ProxyError(f"{config.out} already exists: choose another --out or remove it")
    check_outside_inputs(config.out, [("model", config.model)])
    if not config.proxies:
        raise ProxyError("no proxy files given; pass the owners' files with --proxies")
    authenticate_merged_model(config.model, trust.trusted_keys if trust else None, "tune-router")
    info = read_merged_info(config.model)
    records = check_proxies(info, config.proxies)
    texts = resolve_proxies(records, config.public, config.text_field)
    work = config.out.with_name(config.out.name + ".ckpt")
    _prepare_work(work, _settings(config, records), resume)
    optim = config.optim
    try:
        write_proxy_text(texts, work / PROXY_TEXT_FILE)
        loaded = load_model(config.model, dtype=getattr(torch, optim.dtype), device=optim.device)
        proxy_stream = load_token_stream([work / PROXY_TEXT_FILE], loaded.tokenizer, "all", config.text_field)
        public_stream = load_token_stream(config.public, loaded.tokenizer, "all", config.text_field)
        stream, sampler = mixed_stream(proxy_stream, public_stream, optim, config.public_share)
    except BaseException:
        if not resume:  # nothing was trained yet: leave no run behind that would ask for --resume
            shutil.rmtree(work, ignore_errors=True)
        raise
    torch.manual_seed(optim.seed)
    result = train(loaded.model, router_parameters(loaded.model), stream, optim, work,
                   loss_fn=owner_loss(config.z_loss_coef), resume=resume, description="router tuning",
                   sampler=sampler)
    rows = [block.gate.weight().detach().float().cpu() for block in moe_blocks(loaded.model)]
    record = {
        "tuned_experts": loaded.expert_names,
        "base_model_metadata_sha256": sha256_file(config.model / MERGED_METADATA_FILE),
        "proxies": [{"name": r["name"], "file": Path(r["file"]).name, "sha256": r["sha256"],
                     "documents": len(r["proxies"]), "embedder": r.get("selection", {}).get("embedder")}
                    for r in records],
        "public": describe_files(config.public),
        "proxy_documents": len(texts),
        "proxy_tokens": proxy_stream.num_tokens,
        "public_share": config.public_share,
        "z_loss_coef": config.z_loss_coef,
        "optim": optim.model_dump(),
        "tokens": optim.steps * optim.tokens_per_step,
        "losses": result.losses,
        "created": utc_now(),
        "versions": software_versions(),
    }
    metadata = replace_router_rows(config.model, rows, config.out, record, trust=trust)
    shutil.rmtree(work)
    return metadata
