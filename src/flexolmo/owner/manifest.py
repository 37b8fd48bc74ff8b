"""The expert package's manifest as a typed record, and what each of its fields reveals about the owner's data.

The manifest is everything a package says in words (its tensors say the rest). Reading one goes through
`ExpertManifest`, so a field that is missing, of the wrong type or unknown is refused in one line before
anything else trusts it.

What a manifest may carry depends on differential privacy. A DP guarantee covers what the DP mechanism
released (the tensors) and nothing else, so under DP the manifest holds no number computed from the owner's
data outside the mechanism: no training losses, no held-out scores on the owner's documents, no document
count, no hash of the token stream. Those stay in the owner's report (`<package>.owner.json`, beside the package
and never inside it). Without DP the package keeps the training summary, which helps the coordinator judge
it, and replaces the raw token-stream hash (which confirms a guessed dataset exactly) by a salted commitment
whose salt stays with the owner. No field holds a file path.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "flexolmo-expert"
FORMAT_VERSION = 2
NAME_REGEX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_HEX64 = r"^[0-9a-f]{64}$"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
OWNER_REPORT_SUFFIX = ".owner.json"
# Training facts computed from the owner's data outside any DP mechanism: released only without DP.
OUTSIDE_DP = ("train_documents", "final_train_loss", "losses", "heldout_loss_before", "heldout_loss_after",
              "heldout_bits_per_byte_before", "heldout_bits_per_byte_after", "token_stream_commitment", "seconds")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnchorRecord(_Strict):
    """The anchor the expert was trained on."""

    fingerprint: str = Field(pattern=_HEX64, description="SHA-256 over the anchor's config, weights, public rows "
                             "and tokenizer files")
    fingerprint_scheme: int = Field(default=1, ge=1, description="how the fingerprint was computed: 1 without the "
                                    "tokenizer files (packages written before it was recorded), 2 with them")
    model_type: str = Field(description="the anchor's transformers model type")
    num_hidden_layers: int = Field(ge=1, description="decoder layers")
    hidden_size: int = Field(ge=1, description="model width")
    intermediate_size: int = Field(ge=1, description="FFN width")


class TensorRecord(_Strict):
    """Shape and dtype of one tensor of `expert.safetensors`."""

    shape: list[int] = Field(description="tensor shape")
    dtype: Literal[FLOAT_DTYPES] = Field(description="floating dtype")


class DPRecord(_Strict):
    """The DP mechanism's parameters and the privacy it spent (`privacy.PrivateTraining.record`)."""

    mechanism: str = Field(description="what was run")
    epsilon: float = Field(ge=0, allow_inf_nan=False, description="epsilon spent (accountant)")
    epsilon_target: float = Field(gt=0, allow_inf_nan=False, description="epsilon asked for")
    delta: float = Field(gt=0, lt=1, description="delta")
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False, description="Gaussian noise / clipping norm")
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False, description="per-sample clipping norm")
    sample_rate: float = Field(gt=0, le=1, description="Poisson sampling rate of the owner's sequences")
    steps: int = Field(ge=1, description="optimizer steps taken")
    prior_releases: list[tuple[float, float, int]] = Field(description="releases before training (noise, q, n)")
    accountant: str = Field(description="accountant that composed the releases")
    opacus: str = Field(description="Opacus version")


class PrivacyRecord(_Strict):
    """How private the package is, and where its router row came from."""

    dp: DPRecord | None = Field(description="the DP record, or null without DP")
    router_init: str = Field(description="how the owner's router row started")
    router_row_from_private_data: bool = Field(description="whether that start read private data outside DP")


class PublicFile(_Strict):
    """A public text file mixed into an owner's batches, named without copying it."""

    name: str = Field(description="the file's name (no directory)")
    sha256: str = Field(pattern=_HEX64, description="SHA-256 of the file's bytes")


class TrainingRecord(_Strict):
    """The training summary; the fields of OUTSIDE_DP are null under DP."""

    config: dict[str, Any] = Field(description="hyperparameters (no paths)")
    tokens: int = Field(ge=0, description="planned tokens: steps x batch x sequence length")
    public_share: float = Field(ge=0, lt=1, description="share of each batch from public text")
    public_data: list[PublicFile] = Field(description="each public file mixed into training, by name and SHA-256")
    train_documents: int | None = Field(None, ge=0, description="the owner's training documents")
    final_train_loss: float | None = Field(None, description="last step's training loss")
    losses: list[float] | None = Field(None, description="training loss of every step")
    heldout_loss_before: float | None = Field(None, description="anchor's loss on the owner's held-out text")
    heldout_loss_after: float | None = Field(None, description="expert's loss on the owner's held-out text")
    heldout_bits_per_byte_before: float | None = Field(None, description="the same in bits per byte")
    heldout_bits_per_byte_after: float | None = Field(None, description="the same in bits per byte")
    heldout_dtype: str | None = Field(None, description="dtype the held-out scores were computed in: the one "
                                                        "merge keeps by default")
    token_stream_commitment: str | None = Field(None, pattern=_HEX64,
                                                description="HMAC-SHA256 of the token-stream hash, salt kept by "
                                                            "the owner")
    seconds: float | None = Field(None, ge=0, description="training wall time")


class ExpertManifest(_Strict):
    """`manifest.json` of an expert package (format version 2)."""

    format: Literal[FORMAT] = Field(description="always flexolmo-expert")
    format_version: Literal[FORMAT_VERSION] = Field(description="manifest layout version")
    name: str = Field(pattern=NAME_REGEX, description="the expert's name (its owner's key name)")
    anchor: AnchorRecord
    training: TrainingRecord
    privacy: PrivacyRecord
    created: str = Field(description="UTC time the package was written")
    versions: dict[str, str] = Field(description="software versions")
    tensors: dict[str, TensorRecord] = Field(description="every tensor of expert.safetensors")
    tensors_sha256: str = Field(pattern=_HEX64, description="SHA-256 over the tensors (name, dtype, shape, bytes)")
    file_sha256: str = Field(pattern=_HEX64, description="SHA-256 of expert.safetensors")

    @model_validator(mode="after")
    def _nothing_outside_dp(self) -> ExpertManifest:
        if self.privacy.dp is not None:
            released = [name for name in OUTSIDE_DP if getattr(self.training, name) is not None]
            if released:
                raise ValueError(f"a DP package must not release {', '.join(released)} (not covered by epsilon)")
            if self.privacy.router_row_from_private_data:
                raise ValueError("a DP package's router row must not come from private data outside DP")
        return self


def describe_validation(error: ValidationError) -> str:
    """The first problems of a manifest on one line: `training.losses: input should be a valid list; ...`."""
    problems = []
    for item in error.errors()[:3]:
        message = item["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {message}" if where else message)
    more = len(error.errors()) - 3
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def commit(token_stream_sha256: str) -> tuple[str, str]:
    """A hiding commitment to the token stream: (HMAC-SHA256 keyed by a fresh random salt, the salt).

    The owner keeps the salt; revealing it and the data later proves which data trained the package, while the
    commitment alone confirms nothing about a guessed dataset."""
    salt = secrets.token_hex(32)
    return hmac.new(bytes.fromhex(salt), bytes.fromhex(token_stream_sha256), hashlib.sha256).hexdigest(), salt


def split_training_facts(facts: dict, under_dp: bool) -> dict:
    """The part of the training facts a package may release: all of them without DP, none of OUTSIDE_DP under
    DP. `facts` holds every field of TrainingRecord; the owner's report keeps the full dict."""
    return {key: (None if under_dp and key in OUTSIDE_DP else value) for key, value in facts.items()}


def owner_report_path(package: Path | str) -> Path:
    """Where the owner's local report of a package goes: beside the package directory, never inside it."""
    package = Path(package)
    return package.with_name(package.name + OWNER_REPORT_SUFFIX)


def _format_float(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def describe_disclosure(manifest: dict) -> list[tuple[str, str, str]]:
    """For every field group of a manifest: (field, its value in short, what it reveals about the owner's data)."""
    training, privacy = manifest["training"], manifest["privacy"]
    dp = privacy["dp"]
    covered = f"covered by DP (epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.3g})" if dp else "NOT covered by DP"
    rows = [
        ("name, anchor", manifest["name"], "chosen by the owner; nothing about the data"),
        ("training.config", f"{len(training['config'])} settings", "hyperparameters chosen by the owner"),
        ("training.tokens", f"{training['tokens']:,}", "steps x batch x sequence length (planned, not counted)"),
        ("public data", f"{len(training['public_data'])} file(s) by name and SHA-256", "public text only"),
    ]
    if dp:
        rows.append(("privacy.dp", f"epsilon {dp['epsilon']:.3g}", "the mechanism's parameters; the sample rate "
                     "with the batch size gives the number of training sequences (treated as public by DP-SGD)"))
        rows.append(("training summary", "withheld", "losses, held-out scores, document count and token-stream "
                     "hash stay in the owner's report (not covered by DP)"))
    else:
        documents = training["train_documents"]
        rows += [
            ("training.train_documents", "-" if documents is None else f"{documents:,}",
             "how many documents the owner has"),
            ("training.losses", f"{len(training['losses'] or [])} values",
             "training loss per step on the owner's batches"),
            ("training.heldout_*", f"{_format_float(training['heldout_loss_before'])} -> "
             f"{_format_float(training['heldout_loss_after'])}", "the expert's quality on the owner's held-out text"),
            ("training.token_stream_commitment", (training["token_stream_commitment"] or "-")[:16] + "...",
             "nothing without the salt in the owner's report; with it, which data trained the expert"),
        ]
    router = privacy["router_init"]
    if privacy["router_row_from_private_data"]:
        row_note = "a statistic of the owner's data (mean hidden state), NOT covered by DP"
    elif dp and dp["prior_releases"]:
        row_note = "the owner's mean hidden state released under DP, counted in epsilon"
    else:
        row_note = "started without private data; training moved it" + (" under DP" if dp else "")
    rows.append(("router row", router, row_note))
    rows.append(("expert weights", f"{len(manifest['tensors'])} tensors", f"trained on the owner's data; {covered}"))
    return rows
