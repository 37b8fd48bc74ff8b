"""The merged checkpoint's format: its config, its record of experts (`flexolmo_experts.json`), which tensors
the format adds, the reader every consumer uses, and the one authentication of a merged model. The counterpart
of `owner.manifest` for packages: the writer (`coordinator.merge`), the runtime, admission and verification all
read a merged model through this module, so none of them imports the writer.

Every command that acts on a merged model (`add`, `remove`, `tune-router`, `sign`, `--exclude` in `eval`,
`eval-tasks`, `audit` and `generate`) calls `authenticate_merged_model` before it acts: with trusted keys it is
`verify MODEL --trusted-keys` (the coordinator's signature over every file, the record, every slot, the log),
and without them it says so on stderr in one loud line."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import MergeError, TrustError
from flexolmo.core.precision import dtype_name
from flexolmo.core.progress import console
from flexolmo.core.tensor_io import DEFAULT_SHARD_BYTES
from flexolmo.core.weights import parse
from flexolmo.model.anchor import (
    ANCHOR_FAMILIES,
    AnchorFamily,
    read_config,
)
from flexolmo.trust.history import check_unchanged, read_history, verify_history
from flexolmo.trust.record import check_record, verify_slots
from flexolmo.trust.signing import COORDINATOR_KEY_NAME, TrustedKeys, verify_directory

MERGED_METADATA_FILE = "flexolmo_experts.json"


MERGED_FORMAT = "flexolmo-merged"


# 3: pre-norm families renormalise the kept routing weights (norm_topk_prob); a version-2 checkpoint of
# such a family computes without it, so it is merged again rather than read under the new rule.
MERGED_FORMAT_VERSION = 3


# Metadata key: the history of router tunings of a checkpoint (`router_tuning.tune_router`).
ROUTER_TUNING_KEY = "router_tuning"


PUBLIC_EXPERT = "public"




@dataclass
class MergedModelInfo:
    """What a merged checkpoint says about itself: its experts, the anchor they share, its top-k."""

    path: Path
    config: dict
    metadata: dict

    @property
    def expert_names(self) -> list[str]:
        return [entry["name"] for entry in self.metadata["experts"]]

    @property
    def anchor_config(self) -> dict:
        return self.metadata["anchor"]["config"]

    @property
    def anchor_fingerprint(self) -> str:
        return self.metadata["anchor"]["fingerprint"]

    @property
    def anchor_fingerprint_scheme(self) -> int:
        """How the recorded fingerprint was computed (`anchor.FINGERPRINT_SCHEME`; 1 when not recorded)."""
        return self.metadata["anchor"].get("fingerprint_scheme", 1)


def read_merged_info(path: Path | str) -> MergedModelInfo:
    """Config and expert metadata of a checkpoint written by `merge`, with one-line errors otherwise."""
    path = Path(path)
    config = read_config(path)
    metadata_file = path / MERGED_METADATA_FILE
    if not metadata_file.exists():
        raise MergeError(f"{path}: not a model merged by flexolmo (no {MERGED_METADATA_FILE})")
    try:
        metadata = json.loads(metadata_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MergeError(f"{metadata_file}: corrupt ({error})") from None
    except OSError as error:
        raise MergeError(f"{metadata_file}: cannot read it ({error.strerror or error})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != MERGED_FORMAT:
        raise MergeError(f"{path}: {MERGED_METADATA_FILE} is not a flexolmo merged-model record")
    if metadata.get("format_version") != MERGED_FORMAT_VERSION:
        raise MergeError(f"{path}: written by another flexolmo version (record format "
                         f"{metadata.get('format_version')!r}, this one reads {MERGED_FORMAT_VERSION}); merge it again")
    problem = _record_problem(metadata)
    if problem:
        raise MergeError(f"{path}: {MERGED_METADATA_FILE} is malformed ({problem}); the checkpoint was altered")
    if len(metadata["experts"]) != config.get("num_experts"):  # top-k is the user's to change
        raise MergeError(f"{path}: {MERGED_METADATA_FILE} does not match config.json; the checkpoint was altered")
    check_record(path, metadata)
    return MergedModelInfo(path, config, metadata)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _record_problem(metadata: dict) -> str | None:
    """What in a record's fields every reader relies on is not what `merge` writes, or None (the names and
    digests of the experts are `trust.record.check_record`'s)."""
    experts, anchor = metadata.get("experts"), metadata.get("anchor")
    if not isinstance(experts, list) or not experts or not all(isinstance(entry, dict) for entry in experts):
        return "'experts' is not a list of objects"
    if not _positive_int(metadata.get("top_k")):
        return "'top_k' is not a positive integer"
    if not isinstance(anchor, dict) or not isinstance(anchor.get("fingerprint"), str):
        return "'anchor' names no fingerprint"
    if not _positive_int(anchor.get("fingerprint_scheme", 1)):
        return "'anchor.fingerprint_scheme' is not a positive integer"
    config = anchor.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return "'anchor.config' names no model type"
    for key in ("num_hidden_layers", "hidden_size"):
        if not _positive_int(config.get(key)):
            return f"'anchor.config.{key}' is not a positive integer"
    for index, entry in enumerate(experts):
        if "router_bias" in entry and not _is_router_bias(entry["router_bias"], config["num_hidden_layers"]):
            return f"expert slot {index}'s 'router_bias' is not one value <= 0 per layer"
    return None


def kept_router_biases(record_experts: list[dict]) -> dict[int, list[float]]:
    """The owners' trained router biases a merged record keeps, by expert slot, one value per layer (each <= 0,
    as `read_merged_info` checks). No merged format carries them; `--router-bias` applies them."""
    return {slot: entry["router_bias"] for slot, entry in enumerate(record_experts) if "router_bias" in entry}


def _is_router_bias(value, layers: int) -> bool:
    """A kept router bias as `merge` writes it: one finite value at or below zero per layer (a positive one would
    take routing, and credit, from the other experts where the bias is applied)."""
    return (isinstance(value, list) and len(value) == layers
            and all(not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and math.isfinite(v))
                    and v <= 0 for v in value))


def verify_merged_model(path: Path | str, trusted_keys: TrustedKeys | None = None) -> dict:
    """Check a merged model: its record is well formed, every slot holds the weights its record names, its
    files are the version its merge log last wrote, and (with `trusted_keys`) the coordinator's key
    (`coordinator.pub` of that directory, no other) signed every file and each member's recorded signer key is
    the trusted key of that name.
    With `trusted_keys` the whole merge log is authenticated too (`trust.history.verify_history`): every record
    follows the one before it, and every signed record carries the coordinator's valid signature.
    Returns {"experts": [...], "signer": Signer or None, "operations": number of logged operations,
    "history": HistoryCheck or None}."""
    path = Path(path)
    info = read_merged_info(path)
    check_unchanged(path)
    family = ANCHOR_FAMILIES[info.anchor_config["model_type"]]
    verify_slots(path, info.metadata, info.expert_names, family.ffn_projections)
    signer = history = None
    if trusted_keys is not None:
        signer = verify_directory(path, trusted_keys)
        if signer.name != COORDINATOR_KEY_NAME:
            raise TrustError(f"{path}: signed by '{signer.name}', not by the coordinator ({COORDINATOR_KEY_NAME}.pub "
                             f"in {trusted_keys.directory}); only the coordinator's key vouches for a merged model")
        for entry in info.metadata["experts"]:
            recorded = entry.get("signer")
            if recorded and trusted_keys.key_id_of(recorded["name"]) != recorded["key_id"]:
                raise TrustError(f"{path}: expert '{entry['name']}' was merged as signed by a key that is not the "
                                 f"trusted key of '{recorded['name']}' in {trusted_keys.directory}")
        history = verify_history(path, trusted_keys)
    return {"experts": info.metadata["experts"], "signer": signer, "operations": len(read_history(path)),
            "history": history}


def authenticate_merged_model(path: Path | str, trusted_keys: TrustedKeys | None, action: str) -> dict | None:
    """What every command that acts on a merged model runs first. With `trusted_keys`: `verify_merged_model`
    with them, so nothing is built on, signed or masked by name unless the coordinator's signature covers the
    files as they are (returns its result). Without: one loud line on stderr saying that `action` trusts
    whoever wrote the files (returns None)."""
    if trusted_keys is not None:
        return verify_merged_model(path, trusted_keys)
    console.print(f"[bold red]warning: {action} acts on {path} unauthenticated (no --trusted-keys): its expert "
                  "names and weights are whatever whoever hosts the files wrote[/]", soft_wrap=True)
    return None


def merged_config(anchor_config: dict, family: AnchorFamily, num_experts: int, top_k: int,
                  dtype: torch.dtype | None = None) -> dict:
    """The anchor's config with the MoE fields set; every architecture field is copied, never defaulted."""
    config = {key: value for key, value in anchor_config.items()
              if key not in ("architectures", "model_type", "transformers_version", "_name_or_path")}
    config.update(family.merged.config_fields(anchor_config))
    config.update(
        model_type=family.moe_model_type,
        architectures=[family.moe_architecture],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=family.normalize_top_k,
        output_router_logits=False,
    )
    if dtype is not None:  # what transformers loads it as with dtype="auto"
        config["dtype"] = dtype_name(dtype)
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name(dtype)
    rope = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is not None:
        config["rope_theta"] = rope_theta  # vLLM reads it top-level; transformers 5 keeps it in rope_parameters
    return config


def check_top_k(top_k: int, num_experts: int) -> int:
    """The one top-k of a merged model: config, record and tables all say this number."""
    if not 1 <= top_k <= num_experts:
        raise MergeError(f"--top-k {top_k} does not fit a model of {num_experts} experts (public + "
                         f"{num_experts - 1}); choose 1 to {num_experts}")
    return top_k


class MergeSettings(BaseModel):
    """How `merge`, `add` and `remove` write a merged checkpoint (the flags of those commands). The fields carry
    no bounds: the writer checks each against the model it writes (`check_top_k`, `shard_bytes`)."""

    top_k: int | None = Field(None, description="experts used per token at inference (1 to the number of experts, "
                                                "public included); add keeps the model's unless given")
    shard_gb: float = Field(DEFAULT_SHARD_BYTES / 1024**3, description="maximum size of one weight shard (GB)")
    save_dtype: Literal["anchor", "float32", "bfloat16"] = Field(
        "anchor", description="dtype of the merged checkpoint: the anchor's own, or float32 to keep experts trained "
                              "in float32 exact")

    def shard_bytes(self) -> int:
        """`shard_gb` as bytes; a positive finite size only."""
        if not math.isfinite(self.shard_gb) or self.shard_gb <= 0:
            raise MergeError(f"--shard-gb must be a positive number of gigabytes, got {self.shard_gb}")
        return max(1, int(self.shard_gb * 1024**3))


def is_extra_tensor(family: AnchorFamily, name: str) -> bool:
    """Whether `name` is one of the zero tensors the family's merged format holds in every layer."""
    return any(parse(extra.template, name) is not None for extra in family.extra_tensors)
