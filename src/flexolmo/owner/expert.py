"""A data owner's coordinated training: its expert learns next to the anchor's frozen FFN, then is packaged.

Every decoder layer's FFN becomes a 2-expert FlexMoEBlock: expert 0 is the anchor FFN (frozen), expert 1 an
exact copy (trained); router rows `[r_pub, r_i]` with `r_pub` frozen (shipped with the anchor) and `r_i`
trained, optionally with a bias kept <= 0; softmax, top-2 of 2, no renormalisation; router z-loss. Embeddings,
attention, norms and the LM head stay frozen and get no optimizer state. At step 0 the two experts are equal
and their weights sum to one, so the model computes the anchor up to rounding: the softmax weights sum to one
only in floating point, and two weighted expert outputs are added where the anchor has one (measured on the demo
anchor, 8 windows of code: max |logit difference| 1.1e-5 in float32, 0.125 in bfloat16).
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError, PackageError
from flexolmo.core.fileio import atomic_write_json, check_outside_inputs
from flexolmo.core.precision import dtype_name
from flexolmo.core.provenance import software_versions, utc_now
from flexolmo.core.world import broadcast_from_main, is_main_process, main_process_first
from flexolmo.data.documents import DEFAULT_HELDOUT_FRACTION
from flexolmo.data.public_sample import describe_files, resolve_public_mix
from flexolmo.data.tokens import JoinedStreams, TokenStream, load_token_stream, tokenizer_fingerprint
from flexolmo.evaluation.scoring import DEFAULT_EVAL_MAX_SEQUENCES, Score, score_stream
from flexolmo.model.anchor import (
    FINGERPRINT_SCHEME,
    Anchor,
    check_context,
    load_anchor,
    load_pretrained,
    read_config,
    stored_dtype,
)
from flexolmo.model.moe import ROUTER_Z_LOSS_COEF
from flexolmo.model.router_init import (
    DP_ROUTER_INIT,
    READS_PRIVATE_DATA,
    dp_mean_direction_rows,
    initial_rows,
)
from flexolmo.owner.manifest import commit, owner_report_path, split_training_facts
from flexolmo.owner.owner_model import (
    ClampBias,
    build_owner_model,
    load_package_into_owner_model,
    owner_loss,
    owner_trainable_parameters,
    package_tensors,
    router_lr_scales,
)
from flexolmo.owner.package import check_name, write_package
from flexolmo.owner.privacy import DPConfig, check_dp_settings, prepare_private_training
from flexolmo.training.distributed import ParallelConfig, make_strategy
from flexolmo.training.loop import MixedBatches, OptimConfig, TrainResult, train
from flexolmo.training.run_state import (
    check_identity,
    check_work_dir,
    read_state,
    work_dir_for,
    work_directory,
)
from flexolmo.trust.signing import check_signing_key


class ExpertConfig(BaseModel):
    """`flexolmo train-expert`: everything that decides an owner's expert."""

    anchor: Path = Field(description="anchor model directory published by the coordinator")
    data: list[Path] = Field(description="the owner's private training text")
    heldout: list[Path] = Field(default_factory=list, description="held-out files; if empty, a hash split of data")
    name: str = Field(description="expert name, unique among the experts of one merged model")
    out: Path = Field(description="where to write the expert package (a directory)")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, ge=0, lt=1, description="hash-split share held out")
    router_init: str | None = Field(None, description="initialisation of the owner's router row; unset: "
                                    "mean_hidden, or public under DP")
    router_init_sequences: int = Field(1024, ge=1, description="owner sequences averaged for the router row (all "
                                       "of them when fewer); 1024 chosen on validation text "
                                       "(benchmarks/docs/router-init.md)")
    negative_bias: bool = Field(False, description="learn a router bias <= 0 for the owner's expert")
    negative_bias_start: float = Field(0.0, le=0, allow_inf_nan=False,
                                       description="where that bias starts, in router-logit units (needs "
                                                   "--negative-bias; the paper leaves it uninitialised). Below 0 "
                                                   "helps only where the bias is applied at inference "
                                                   "(--router-bias), which the standard checkpoint cannot do: 0 "
                                                   "kept (benchmarks/docs/ablation.md)")
    router_lr_scale: float = Field(0.3, gt=0, allow_inf_nan=False,
                                   description="the owner's router row learns at this multiple of --lr (its FFN "
                                               "at --lr), on the same schedule; 0.3 chosen on validation text "
                                               "(benchmarks/docs/router-lr.md)")
    z_loss_coef: float = Field(ROUTER_Z_LOSS_COEF, ge=0, description="router z-loss coefficient")
    public_data: list[Path] = Field(default_factory=list, description="public text mixed into training batches "
                                    "(if empty: the anchor's published public sample)")
    public_share: float | None = Field(None, ge=0, lt=1, description="share of each batch's sequences from public "
                                       "text; None: 0.5 when public text is available, else 0 with a warning")
    eval_max_sequences: int = Field(DEFAULT_EVAL_MAX_SEQUENCES, ge=1, description="held-out sequences scored "
                                    "before and after training (the first ones)")
    dp: DPConfig | None = Field(None, description="train with DP-SGD to this privacy target")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3))
    parallel: ParallelConfig = Field(default_factory=ParallelConfig,
                                     description="sharding and activation checkpointing")


def anchor_record(fingerprint: str, config: dict) -> dict:
    """What a package records about the anchor it was trained on: its fingerprint and `config.json`'s shape
    (taken apart so that a tool writing packages need not load the anchor's weights)."""
    return {"fingerprint": fingerprint, "fingerprint_scheme": FINGERPRINT_SCHEME, "model_type": config["model_type"],
            **{key: config[key] for key in ("num_hidden_layers", "hidden_size", "intermediate_size")}}


def mix_public(owner_stream: TokenStream, config: ExpertConfig,
               tokenizer) -> tuple[TokenStream | JoinedStreams, MixedBatches | None]:
    """The owner's windows joined with public windows, and a sampler putting `public_share` of every batch there.

    Why: the owner's router row competes only with the frozen public row. Trained on owner text alone, it learns
    "prefer me" everywhere and then takes tokens of every domain after the merge. Public sequences in the batch
    are where the public expert must keep winning. Public text is public, so mixing it in shares nothing (the
    reference implementation's expert mixes also contain general public data). The two are cut into windows
    separately (`JoinedStreams`), so a public window never holds an owner token: under DP, public windows are
    drawn outside the Poisson sampling and the accountant, so an owner token inside one would be unprotected.
    """
    if config.public_share == 0:
        return owner_stream, None
    public = load_token_stream(config.public_data, tokenizer, "all", config.text_field)
    joined = JoinedStreams([owner_stream, public])
    batch = config.optim.batch_size
    public_count = round(batch * config.public_share)  # 0 < public_count < batch: checked by _check_settings
    return joined, MixedBatches(config.optim, joined.ranges(config.optim.seq_len), [batch - public_count, public_count])


def training_facts(config: ExpertConfig, owner_stream: TokenStream, result: TrainResult, before: Score, after: Score,
                   heldout_dtype: torch.dtype) -> dict:
    """Every field of the manifest's training record, before privacy decides which of them a package releases."""
    return {
        "config": config.model_dump(mode="json", exclude={"anchor", "data", "heldout", "out", "public_data"}),
        "tokens": config.optim.steps * config.optim.tokens_per_step,
        "public_share": config.public_share,
        "public_data": describe_files(config.public_data),
        "train_documents": owner_stream.num_documents,
        "final_train_loss": result.losses[-1],
        "losses": result.losses,
        "heldout_loss_before": before.loss,
        "heldout_loss_after": after.loss,
        "heldout_bits_per_byte_before": before.bits_per_byte,
        "heldout_bits_per_byte_after": after.bits_per_byte,
        "heldout_dtype": dtype_name(heldout_dtype),
        "seconds": result.seconds,
    }


def write_owner_package(config: ExpertConfig, tensors: dict[str, torch.Tensor], facts: dict, stream_sha256: str,
                        sign_key: Path | None, fields: dict) -> dict:
    """Write the package (what the owner releases) and, beside it, the owner's report (everything, kept local).

    The package carries a salted commitment to the token stream, never its hash; the salt, the hash and the
    owner's paths go into the report alone. Under DP the package releases none of `manifest.OUTSIDE_DP`."""
    commitment, salt = commit(stream_sha256)
    facts = {**facts, "token_stream_commitment": commitment}
    report_path = owner_report_path(config.out)
    atomic_write_json(report_path, {
        "note": "the owner's own record of this package: keep it, never send it (the package holds what is "
                "released)",
        "package": str(config.out), "name": config.name, "training": facts,
        "token_stream_sha256": stream_sha256, "commitment_salt": salt,
        "data": [str(path) for path in config.data], "heldout": [str(path) for path in config.heldout],
        "public_data": [str(path) for path in config.public_data], "created": fields["created"],
    })
    try:
        released = split_training_facts(facts, config.dp is not None)
        return write_package(config.out, config.name, tensors,
                             {"anchor": fields["anchor"], "training": released, **fields}, sign_key)
    except BaseException:
        report_path.unlink(missing_ok=True)
        raise


def _streams(config: ExpertConfig, anchor: Anchor) -> tuple[TokenStream, TokenStream, MixedBatches | None,
                                                             TokenStream]:
    """The owner's training stream, what training reads (public text mixed in), its sampler, and the held-out
    stream."""
    split_train, split_heldout = ("all", "all") if config.heldout else ("train", "heldout")
    with main_process_first():  # one process fills the tokenization cache, the others read it
        owner_stream = load_token_stream(config.data, anchor.tokenizer, split_train, config.text_field,
                                         config.heldout_fraction)
        train_stream, sampler = mix_public(owner_stream, config, anchor.tokenizer)
        heldout_stream = load_token_stream(config.heldout or config.data, anchor.tokenizer, split_heldout,
                                           config.text_field, config.heldout_fraction)
    return owner_stream, train_stream, sampler, heldout_stream


def _owner_rows(config: ExpertConfig, router_init: str, anchor: Anchor,
                owner_stream: TokenStream) -> tuple[list[torch.Tensor], list[tuple]]:
    """The owner's initial router rows (rank 0's, on every rank) and the DP releases they already spent."""
    optim, prior_releases = config.optim, []
    if router_init == DP_ROUTER_INIT:
        owner_rows, rate = dp_mean_direction_rows(anchor.model, owner_stream, optim.seq_len,
                                                  config.router_init_sequences, config.dp.router_noise_multiplier,
                                                  optim.seed)
        prior_releases.append((config.dp.router_noise_multiplier, rate, 1))
    else:
        owner_rows = initial_rows(router_init, anchor, owner_stream, optim.seq_len, config.router_init_sequences,
                                  optim.seed)
    return broadcast_from_main(owner_rows, optim.device), prior_releases


def _evaluate_and_package(config: ExpertConfig, anchor: Anchor, tensors: dict[str, torch.Tensor],
                          streams: tuple[TokenStream, TokenStream], result: TrainResult, privacy: dict,
                          sign_key: Path | None) -> dict:
    """Score the expert as the merged model will run it, and write the package; returns its manifest."""
    owner_stream, heldout_stream = streams
    eval_dtype = stored_dtype(anchor.path)  # what `merge` keeps by default
    before, after = score_as_merged(anchor, tensors, heldout_stream, eval_dtype, config)
    facts = training_facts(config, owner_stream, result, before, after, eval_dtype)
    return write_owner_package(config, tensors, facts, owner_stream.fingerprint(), sign_key, {
        "anchor": anchor_record(anchor.fingerprint, anchor.config), "privacy": privacy, "created": utc_now(),
        "versions": software_versions(),
    })


def _checked_start(config: ExpertConfig, resume: bool, sign_key: Path | None) -> tuple[ExpertConfig, str, Path]:
    """Before anything is loaded: `config` with its public mix resolved, the router initialisation it implies
    and its checked work directory; refused combinations, keys and contexts in one line."""
    router_init = config.router_init or ("public" if config.dp else "mean_hidden")
    public_data, public_share = resolve_public_mix(config.public_data, config.public_share, config.anchor)
    config = config.model_copy(update={"public_data": public_data, "public_share": public_share})
    _check_settings(config, router_init)
    if sign_key is not None:
        check_signing_key(sign_key, config.name)
    work = work_dir_for(config.out)
    check_work_dir(work, resume)
    check_context(read_config(config.anchor).get("max_position_embeddings"), config.optim.seq_len, config.anchor)
    return config, router_init, work


def train_expert(config: ExpertConfig, resume: bool = False, sign_key: Path | None = None) -> dict:
    """Train an owner's expert per `config`, write its package to `config.out` (signed with `sign_key` when
    given) and the owner's report beside it; return the package's manifest.

    Under torchrun every rank trains (see `training.train` and `flexolmo.training.distributed`); rank 0 writes the
    package and returns the manifest, the other ranks return an empty dict."""
    config, router_init, work = _checked_start(config, resume, sign_key)
    optim = config.optim
    strategy = make_strategy(config.parallel, optim.dtype)
    anchor = load_anchor(config.anchor, with_model=False)
    owner_stream, train_stream, sampler, heldout_stream = _streams(config, anchor)
    public_stream = train_stream.streams[1] if sampler else None
    identity = run_identity(config, anchor, owner_stream, public_stream, heldout_stream)
    if resume:  # refused before the model is loaded; `train` checks the optimisation settings too
        check_identity(work, read_state(work), identity, only_given=True)
    anchor.model = load_pretrained(anchor.path, strategy.precision.frozen, optim.device)
    owner_rows, prior_releases = _owner_rows(config, router_init, anchor, owner_stream)
    if config.parallel.fsdp:  # built in host memory; sharding moves one layer at a time to the device
        anchor.model.to("cpu")
    torch.manual_seed(optim.seed)
    model = build_owner_model(anchor, owner_rows, config.negative_bias, config.negative_bias_start)
    anchor.model = None
    trainable = owner_trainable_parameters(model)
    hooks = [ClampBias(model)]
    private = None
    with work_directory(work, resume):
        if config.dp:
            # Under DP the owner's sequences are Poisson sampled; the public ones stay a fixed draw per step.
            public = MixedBatches(optim, sampler.ranges[1:], sampler.counts[1:]) if sampler else None
            private = prepare_private_training(model, config.dp, owner_stream.num_sequences(optim.seq_len),
                                               optim.batch_size, optim.steps, optim.grad_accum, optim.seed, public,
                                               prior_releases)
            hooks.append(private.accountant)
        result: TrainResult = train(
            private.model if private else model, trainable, train_stream, optim, work,
            loss_fn=owner_loss(config.z_loss_coef), hooks=hooks, resume=resume,
            description=f"expert {config.name}", make_optimizer=private.make_optimizer if private else None,
            sampler=private.sampler if private else sampler, clip_grad_norm=private is None, strategy=strategy,
            identity=identity, lr_scales=router_lr_scales(trainable, config.router_lr_scale),
        )
        if private:
            private.detach()
        tensors = package_tensors(model, anchor.family.ffn_projections, strategy.gather)
        del model, trainable, hooks
        result.trained = []
        _free(optim.device)
        if not is_main_process():  # under torchrun, rank 0 alone evaluates and writes the package
            return {}
        privacy = {"dp": private.record() if private else None, "router_init": router_init,
                   "router_row_from_private_data": router_init in READS_PRIVATE_DATA}
        manifest = _evaluate_and_package(config, anchor, tensors, (owner_stream, heldout_stream), result, privacy,
                                         sign_key)
    shutil.rmtree(work)
    return manifest


def _check_settings(config: ExpertConfig, router_init: str) -> None:
    """Refuse combinations that cannot work, before anything is loaded."""
    check_name(config.name)
    if config.dp and router_init in READS_PRIVATE_DATA:
        raise PackageError(f"--router-init {router_init} reads your data outside the DP mechanism; under DP use "
                           f"--router-init {DP_ROUTER_INIT}, public or random")
    if router_init == DP_ROUTER_INIT and not config.dp:
        raise PackageError(f"--router-init {DP_ROUTER_INIT} is the DP release of mean_hidden; it needs "
                           "--dp-epsilon (without DP use mean_hidden)")
    if config.dp and config.parallel.fsdp:
        raise PackageError("--fsdp cannot be combined with --dp-epsilon: DP-SGD (Opacus per-sample gradients) "
                           "runs in one process on an unsharded model; drop --fsdp")
    if config.dp and config.parallel.activation_checkpointing:
        raise PackageError("--activation-checkpointing cannot be combined with --dp-epsilon: Opacus records "
                           "activations in forward hooks, which a recomputed layer would run twice")
    if config.parallel.replicate_frozen and not config.parallel.fsdp:
        raise PackageError("--replicate-frozen only applies with --fsdp (without it every weight is replicated)")
    if config.dp:
        check_dp_settings(config.optim.grad_accum)
    if config.negative_bias_start and not config.negative_bias:
        raise PackageError(f"--negative-bias-start {config.negative_bias_start:g} sets where the router bias starts; "
                           "add --negative-bias, or drop --negative-bias-start")
    if config.public_share and not config.public_data:
        raise DataError("--public-share needs --public-data (public text, e.g. the coordinator's public corpus)")
    batch = config.optim.batch_size
    if config.public_share and not 0 < round(batch * config.public_share) < batch:
        raise DataError(f"--public-share {config.public_share} of a batch of {batch} leaves no owner or no public "
                        "sequence; change --batch-size or --public-share")
    if config.out.exists():
        raise PackageError(f"{config.out} already exists: choose another --out or remove it")
    check_outside_inputs(config.out, [("anchor", config.anchor)])


def run_identity(config: ExpertConfig, anchor: Anchor, owner: TokenStream, public: TokenStream | None,
                 heldout: TokenStream) -> dict:
    """What a checkpoint must share with the run that resumes it, besides the optimisation settings: every
    setting that decides the expert, and the identity of the anchor, the tokenizer and each data file."""
    settings = config.model_dump(mode="json", exclude={"anchor", "data", "heldout", "public_data", "out", "optim",
                                                       "parallel", "eval_max_sequences"})
    return {"settings": settings, "anchor": anchor.fingerprint, "tokenizer": tokenizer_fingerprint(anchor.tokenizer),
            "data": [file.file_sha256 for file in owner.files],
            "public_data": [file.file_sha256 for file in public.files] if public else [],
            "heldout": [file.file_sha256 for file in heldout.files]}


def score_as_merged(anchor: Anchor, tensors: dict[str, torch.Tensor], heldout: TokenStream, dtype: torch.dtype,
                    config: ExpertConfig) -> tuple[Score, Score]:
    """Held-out scores of the anchor and of [public, owner] as a merged model in `dtype` computes them: the
    anchor's weights in `dtype`, the package's tensors rounded to `dtype`, computed in `dtype`."""
    optim = config.optim
    base = dataclasses.replace(anchor, model=load_pretrained(anchor.path, dtype, optim.device))
    before = score_stream(base.model, heldout, optim.seq_len, max_sequences=config.eval_max_sequences,
                          device=optim.device, description=f"held-out (anchor, {dtype_name(dtype)})")
    model = load_package_into_owner_model(base, tensors)
    after = score_stream(model, heldout, optim.seq_len, max_sequences=config.eval_max_sequences,
                         device=optim.device, description=f"held-out (expert, {dtype_name(dtype)})")
    return before, after


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

