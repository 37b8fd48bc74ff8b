"""A data owner's coordinated training: its expert learns next to the anchor's frozen FFN, then is packaged.

Every decoder layer's FFN becomes a 2-expert FlexMoEBlock: expert 0 is the anchor FFN (frozen), expert 1 an
exact copy (trained); router rows `[r_pub, r_i]` with `r_pub` frozen (shipped with the anchor) and `r_i`
trained, optionally with a bias kept <= 0; softmax, top-2 of 2, no renormalisation; router z-loss. Embeddings,
attention, norms and the LM head stay frozen and get no optimizer state. At step 0 the two experts are equal
and their weights sum to one, so the model computes exactly the anchor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from flexolmo.anchor import Anchor, load_anchor
from flexolmo.data import DEFAULT_HELDOUT_FRACTION, TokenStream, load_token_stream
from flexolmo.errors import CheckpointError, DataError, PackageError
from flexolmo.evaluate import score_stream
from flexolmo.moe import ROUTER_Z_LOSS_COEF, clamp_router_bias, convert_to_moe, decoder_layers, router_z_loss
from flexolmo.package import check_name, write_package
from flexolmo.privacy import DPConfig, prepare_private_training
from flexolmo.provenance import software_versions, utc_now
from flexolmo.public_sample import describe_files, resolve_public_mix
from flexolmo.router_init import (DP_ROUTER_INIT, READS_PRIVATE_DATA, dp_mean_direction_rows, initial_rows,
                                  load_public_rows)
from flexolmo.training import (MixedBatches, OptimConfig, TrainResult, causal_lm_loss, is_main_process,
                               main_process_first, train)
from flexolmo.weights import PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER

OWNER_EXPERT = 1


class ExpertConfig(BaseModel):
    """`flexolmo train-expert`: everything that decides an owner's expert."""

    anchor: Path = Field(description="anchor model directory published by the coordinator")
    data: list[Path] = Field(description="the owner's private training text")
    heldout: list[Path] = Field(default_factory=list, description="held-out files; if empty, a hash split of data")
    name: str = Field(description="expert name, unique among the experts of one merged model")
    out: Path = Field(description="where to write the expert package (a directory)")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, ge=0, lt=1, description="hash-split share held out")
    router_init: str | None = Field(None, description="initialisation of the owner's router row "
                                    "(default: mean_hidden, or public under DP)")
    router_init_sequences: int = Field(64, ge=1, description="owner sequences averaged for the router row")
    negative_bias: bool = Field(False, description="learn a router bias <= 0 for the owner's expert")
    z_loss_coef: float = Field(ROUTER_Z_LOSS_COEF, ge=0, description="router z-loss coefficient")
    public_data: list[Path] = Field(default_factory=list, description="public text mixed into training batches "
                                    "(if empty: the anchor's published public sample)")
    public_share: float | None = Field(None, ge=0, lt=1, description="share of each batch's sequences from public "
                                       "text; None: 0.5 when public text is available, else 0 with a warning")
    eval_max_sequences: int | None = Field(None, ge=1, description="cap on held-out sequences scored")
    dp: DPConfig | None = Field(None, description="train with DP-SGD to this privacy target")
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))


def build_owner_model(anchor: Anchor, owner_rows: list[torch.Tensor], negative_bias: bool) -> torch.nn.Module:
    """The anchor with every FFN turned into the 2-expert block, experts identical, rows [r_pub, r_i]."""
    public_rows = load_public_rows(anchor.path, len(decoder_layers(anchor.model)))
    rows = [torch.stack([public.float(), own.float()]) for public, own in zip(public_rows, owner_rows)]
    return convert_to_moe(anchor.model, rows, num_experts=2, top_k=2,
                          bias_experts=[OWNER_EXPERT] if negative_bias else [])


def owner_trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything but the owner's expert and router row; return what stays trainable, in name order."""
    owned = (f".mlp.experts.{OWNER_EXPERT}.", f".mlp.gate.rows.{OWNER_EXPERT}.")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in owned))
        if param.requires_grad:
            trainable.append((name, param))
    return trainable


def package_tensors(model: torch.nn.Module, projections: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The owner's expert and router row of every layer, under package names."""
    tensors = {}
    for layer_index, layer in enumerate(decoder_layers(model)):
        expert = layer.mlp.experts[OWNER_EXPERT]
        for proj in projections:
            tensors[PACKAGE_FFN.format(layer=layer_index, proj=proj)] = getattr(expert, proj).weight
        row = layer.mlp.gate.rows[OWNER_EXPERT]
        tensors[PACKAGE_ROUTER.format(layer=layer_index)] = row.weight
        if row.bias is not None:
            tensors[PACKAGE_BIAS.format(layer=layer_index)] = row.bias
    return tensors


def load_package_into_owner_model(anchor: Anchor, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Rebuild the owner's training model from the anchor and a package's tensors."""
    layers = len(decoder_layers(anchor.model))
    has_bias = PACKAGE_BIAS.format(layer=0) in tensors
    rows = [tensors[PACKAGE_ROUTER.format(layer=i)][0] for i in range(layers)]
    model = build_owner_model(anchor, rows, has_bias)
    with torch.no_grad():
        for layer_index, layer in enumerate(decoder_layers(model)):
            expert = layer.mlp.experts[OWNER_EXPERT]
            for proj in anchor.family.ffn_projections:
                getattr(expert, proj).weight.copy_(tensors[PACKAGE_FFN.format(layer=layer_index, proj=proj)])
            if has_bias:
                layer.mlp.gate.rows[OWNER_EXPERT].bias.copy_(tensors[PACKAGE_BIAS.format(layer=layer_index)])
    return model


def anchor_record(anchor: Anchor) -> dict:
    """What a package records about the anchor it was trained on."""
    return {"fingerprint": anchor.fingerprint, "model_type": anchor.config["model_type"],
            **{key: anchor.config[key] for key in ("num_hidden_layers", "hidden_size", "intermediate_size")}}


class _ClampBias:
    """Projected gradient step: keep the learned bias <= 0 after every update."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def after_optimizer_step(self, step: int) -> None:
        clamp_router_bias(self.model)


def owner_loss(z_loss_coef: float):
    """Language-model loss plus the router z-loss; reports the language-model part."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor):
        logits = model(input_ids=batch[:, :-1]).logits
        lm_loss = causal_lm_loss(logits, batch[:, 1:])
        return lm_loss + z_loss_coef * router_z_loss(model), lm_loss.detach()

    return loss_fn


def mix_public(owner_stream: TokenStream, config: ExpertConfig, tokenizer) -> tuple[TokenStream, MixedBatches | None]:
    """The owner's stream with public text appended, and a sampler putting `public_share` of every batch there.

    Why: the owner's router row competes only with the frozen public row. Trained on owner text alone, it learns
    "prefer me" everywhere and then takes tokens of every domain after the merge. Public sequences in the batch
    are where the public expert must keep winning. Public text is public, so mixing it in shares nothing (the
    reference implementation's expert mixes also contain general public data).
    """
    if config.public_share == 0:
        return owner_stream, None
    if not config.public_data:
        raise DataError("--public-share needs --public-data (public text, e.g. the coordinator's public corpus)")
    public = load_token_stream(config.public_data, tokenizer, "all", config.text_field)
    stream = TokenStream([*owner_stream.files, *public.files])
    seq_len, batch = config.optim.seq_len, config.optim.batch_size
    public_count = round(batch * config.public_share)
    if not 0 < public_count < batch:
        raise DataError(f"--public-share {config.public_share} of a batch of {batch} leaves no owner or no public "
                        "sequence; change --batch-size or --public-share")
    owner_sequences = owner_stream.num_sequences(seq_len)
    ranges = [(0, owner_sequences), (owner_sequences, stream.num_sequences(seq_len))]
    return stream, MixedBatches(config.optim, ranges, [batch - public_count, public_count])


def train_expert(config: ExpertConfig, resume: bool = False) -> dict:
    """Train an owner's expert per `config`, write its package to `config.out`, return the manifest.

    Under torchrun every rank trains (data parallel, see `training.train`); rank 0 writes the package and
    returns the manifest, the other ranks return an empty dict."""
    check_name(config.name)
    router_init = config.router_init or ("public" if config.dp else "mean_hidden")
    if config.dp and router_init in READS_PRIVATE_DATA:
        raise PackageError(f"--router-init {router_init} reads your data outside the DP mechanism; under DP use "
                           f"--router-init {DP_ROUTER_INIT}, public or random")
    if router_init == DP_ROUTER_INIT and not config.dp:
        raise PackageError(f"--router-init {DP_ROUTER_INIT} is the DP release of mean_hidden; it needs "
                           "--dp-epsilon (without DP use mean_hidden)")
    if config.out.exists():
        raise PackageError(f"{config.out} already exists: choose another --out or remove it")
    public_data, public_share = resolve_public_mix(config.public_data, config.public_share, config.anchor)
    config = config.model_copy(update={"public_data": public_data, "public_share": public_share})
    work = config.out.with_name(config.out.name + ".ckpt")
    if resume and not (work / "checkpoint").exists():
        raise CheckpointError(f"nothing to resume: no checkpoint at {work}; run without --resume")
    dtype = getattr(torch, config.optim.dtype)
    anchor = load_anchor(config.anchor, dtype=dtype, device=config.optim.device)
    optim = config.optim
    split_train, split_heldout = ("all", "all") if config.heldout else ("train", "heldout")
    with main_process_first():  # one process fills the tokenization cache, the others read it
        owner_stream = load_token_stream(config.data, anchor.tokenizer, split_train, config.text_field,
                                         config.heldout_fraction)
        train_stream, sampler = mix_public(owner_stream, config, anchor.tokenizer)
        heldout_stream = load_token_stream(config.heldout or config.data, anchor.tokenizer, split_heldout,
                                           config.text_field, config.heldout_fraction)
    main = is_main_process()  # under torchrun, rank 0 alone evaluates and writes the package
    if main:
        before = score_stream(anchor.model, heldout_stream, optim.seq_len,
                              max_sequences=config.eval_max_sequences, device=optim.device,
                              description="held-out (anchor)")
    prior_releases = []
    if router_init == DP_ROUTER_INIT:
        owner_rows, rate = dp_mean_direction_rows(anchor.model, owner_stream, optim.seq_len,
                                                  config.router_init_sequences, config.dp.router_noise_multiplier,
                                                  optim.seed)
        prior_releases.append((config.dp.router_noise_multiplier, rate, 1))
    else:
        owner_rows = initial_rows(router_init, anchor, owner_stream, optim.seq_len, config.router_init_sequences,
                                  optim.seed)
    torch.manual_seed(optim.seed)
    model = build_owner_model(anchor, owner_rows, config.negative_bias)
    trainable = owner_trainable_parameters(model)
    work.mkdir(parents=True, exist_ok=True)
    hooks = [_ClampBias(model)]
    private = None
    if config.dp:
        # Under DP the owner's sequences are Poisson sampled; the public ones stay a fixed draw per step.
        public = MixedBatches(optim, sampler.ranges[1:], sampler.counts[1:]) if sampler else None
        private = prepare_private_training(model, config.dp, owner_stream.num_sequences(optim.seq_len),
                                           optim.batch_size, optim.steps, optim.grad_accum, optim.seed, public,
                                           prior_releases)
        hooks.append(private.accountant)
    result: TrainResult = train(
        private.model if private else model, trainable, train_stream, optim, work,
        loss_fn=owner_loss(config.z_loss_coef), hooks=hooks, resume=resume, description=f"expert {config.name}",
        make_optimizer=private.make_optimizer if private else None, sampler=private.sampler if private else sampler,
        clip_grad_norm=private is None,
    )
    if private:
        private.detach()
    if not main:
        return {}
    after = score_stream(model, heldout_stream, optim.seq_len, max_sequences=config.eval_max_sequences,
                         device=optim.device, description="held-out (expert)")
    manifest = write_package(config.out, config.name, package_tensors(model, anchor.family.ffn_projections), {
        "anchor": anchor_record(anchor),
        "training": {
            "config": config.model_dump(mode="json", exclude={"anchor", "data", "heldout", "out"}),
            "tokens": optim.steps * optim.tokens_per_step,
            "token_stream_sha256": owner_stream.fingerprint(),
            "train_documents": owner_stream.num_documents,
            "public_share": config.public_share,
            "public_data": describe_files(config.public_data),
            "final_train_loss": result.losses[-1],
            "losses": result.losses,
            "heldout_loss_before": before.loss,
            "heldout_loss_after": after.loss,
            "heldout_bits_per_byte_before": before.bits_per_byte,
            "heldout_bits_per_byte_after": after.bits_per_byte,
            "seconds": result.seconds,
        },
        "privacy": {"dp": private.record() if private else None,
                    "router_init": router_init,
                    "router_row_from_private_data": router_init in READS_PRIVATE_DATA},
        "created": utc_now(),
        "versions": software_versions(),
    })
    shutil.rmtree(work)
    return manifest
