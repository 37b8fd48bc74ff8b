"""The anchor: the coordinator's dense public model that every expert starts from.

One function loads and validates an anchor directory; one computes its fingerprint (a hash over its config,
weights, public router rows and tokenizer files) that every expert package carries, so a package can never be
merged into a model built on a different anchor, nor on the same weights with another tokenizer. Supported architectures
are a table, `ANCHOR_FAMILIES`: adding a family means adding a row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexolmo.core.errors import AnchorError
from flexolmo.core.fileio import check_not_staging, digest_tensor, sha256_file
from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import ANCHOR_FFN, MERGED_EXPERT, MERGED_ROUTER
from flexolmo.model.families import (
    MergedFormat,
    Refusal,
    ZeroTensor,
    flex_olmo,
    no_attention_output_bias,
    no_mlp_bias,
    no_sliding_window,
    qwen2_moe,
    qwen3_moe,
    silu_activation,
    standard_head_dim,
)

# The coordinator's public router rows, shipped beside the weights; part of the fingerprint because every
# expert is trained against them.
PUBLIC_ROUTER_FILE = "flexolmo_public_router.safetensors"

# The files a tokenizer is read from (transformers' names). Part of the fingerprint since scheme 2: an expert
# is trained on the token ids they define, and the merged model ships the anchor's copies.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")
# How `compute_fingerprint` hashes an anchor, recorded beside every fingerprint a package or merged model
# carries: 1 covered the config, weights and public rows only (no record of a scheme means 1); 2 also covers
# TOKENIZER_FILES. A fingerprint of another scheme can never match, so it is refused with that reason.
FINGERPRINT_SCHEME = 2

# Config keys that describe how a checkpoint was saved, not what the model computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "use_cache", "flexolmo"}
)


@dataclass(frozen=True)
class AnchorFamily:
    """How one dense architecture maps onto FlexOlmo's mixture of experts: the merged format it is written in,
    tensor-name templates, extra zero tensors the format needs, and what it refuses (one line each)."""

    model_type: str
    merged: MergedFormat
    ffn_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    anchor_ffn: str = ANCHOR_FFN
    merged_expert: str = MERGED_EXPERT
    merged_router: str = MERGED_ROUTER
    # Zero tensors this family needs in the merged format on top of the format's own (e.g. q/k/v biases).
    zero_tensors: tuple[ZeroTensor, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    # OLMo-2 normalises the FFN output before the residual add (post-norm), which cancels the kept routing mass;
    # pre-norm families add it as it is, so their merged models renormalise the kept weights to sum to 1.
    post_norm: bool = False

    @property
    def moe_model_type(self) -> str:
        return self.merged.model_type

    @property
    def moe_architecture(self) -> str:
        return self.merged.architecture

    @property
    def extra_tensors(self) -> tuple[ZeroTensor, ...]:
        """Every zero tensor a merged checkpoint of this family holds, per decoder layer."""
        return self.merged.extra_tensors + self.zero_tensors

    @property
    def normalize_top_k(self) -> bool:
        """Whether a merged model of this family renormalises its kept routing weights (`norm_topk_prob`)."""
        return not self.post_norm

    def refusal(self, config: dict) -> str | None:
        """Why an anchor of this family cannot be merged exactly, or None."""
        return next((reason for check in self.refusals if (reason := check(config)) is not None), None)


# vLLM's MoE formats run SiLU experts only and would drop an FFN bias; every non-OLMo family refuses both.
_MOE_REFUSALS = (silu_activation, no_mlp_bias)

ANCHOR_FAMILIES: dict[str, AnchorFamily] = {
    "olmo2": AnchorFamily(model_type="olmo2", merged=flex_olmo.FORMAT, post_norm=True),
    "llama": AnchorFamily(model_type="llama", merged=qwen2_moe.FORMAT, zero_tensors=qwen2_moe.ZERO_QKV_BIAS,
                          refusals=(*_MOE_REFUSALS, no_attention_output_bias, standard_head_dim)),
    "mistral": AnchorFamily(model_type="mistral", merged=qwen2_moe.FORMAT, zero_tensors=qwen2_moe.ZERO_QKV_BIAS,
                            refusals=(*_MOE_REFUSALS, no_sliding_window, standard_head_dim)),
    "qwen2": AnchorFamily(model_type="qwen2", merged=qwen2_moe.FORMAT,
                          refusals=(*_MOE_REFUSALS, no_sliding_window, standard_head_dim)),
    "qwen3": AnchorFamily(model_type="qwen3", merged=qwen3_moe.FORMAT,
                          refusals=(*_MOE_REFUSALS, no_sliding_window, no_attention_output_bias)),
}
# The merged model types (several families share qwen2_moe).
MERGED_MODEL_TYPES = frozenset(family.moe_model_type for family in ANCHOR_FAMILIES.values())


@dataclass
class Anchor:
    """A loaded anchor: model (eval mode), tokenizer, raw config dict, fingerprint and where it came from."""

    path: Path
    model: Any
    tokenizer: Any
    config: dict
    family: AnchorFamily
    fingerprint: str


def read_config(path: Path | str) -> dict:
    """Read `config.json` of a model directory, with one-line errors for a missing or broken file. Every model
    is read through here, so a staging directory left by a run that did not finish is refused here too."""
    path = Path(path)
    if not path.exists():
        raise AnchorError(f"{path}: no such directory; check the path")
    check_not_staging(path)
    if not path.is_dir():
        raise AnchorError(f"{path}: not a directory; pass the model directory (with config.json)")
    config_file = path / "config.json"
    if not config_file.exists():
        raise AnchorError(f"{path}: no config.json; this is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnchorError(f"{config_file}: corrupt config.json ({error})") from None
    except OSError as error:
        raise AnchorError(f"{config_file}: cannot read it ({error.strerror or error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise AnchorError(f"{config_file}: not a JSON object naming a model_type; this is not a Hugging Face config")
    return config


try:  # transformers 5 validates config fields through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # an older huggingface_hub: configs raise TypeError and ValueError only
    _StrictDataclassError = ValueError
_CONFIG_ERRORS = (TypeError, ValueError, KeyError, _StrictDataclassError)


def complete_config(config: dict, path: Path | str) -> dict:
    """A dense config with every field its transformers class would default filled in.

    A hand-written or older config.json may leave fields out (Mistral's sliding window, Llama's key/value head
    count); copied as it is into a merged format, the merged format's own defaults would silently apply."""
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return json.loads(AutoConfig.for_model(config["model_type"], **fields).to_json_string(use_diff=True))
    except _CONFIG_ERRORS as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AnchorError(f"{path}: config.json is not a valid {config['model_type']} config ({first})") from None


def anchor_family(config: dict, path: Path | str) -> AnchorFamily:
    """The family of a dense anchor config, or an error that lists the supported ones or says which feature of
    this anchor its merged format cannot hold."""
    model_type = config.get("model_type")
    if model_type in ANCHOR_FAMILIES:
        family = ANCHOR_FAMILIES[model_type]
        reason = family.refusal(complete_config(config, path))
        if reason is not None:
            raise AnchorError(f"{path}: this {model_type} anchor cannot be merged into {family.moe_model_type} "
                              f"exactly: {reason}")
        return family
    supported = ", ".join(sorted(ANCHOR_FAMILIES))
    if model_type in MERGED_MODEL_TYPES:
        raise AnchorError(f"{path}: is a mixture of experts ({model_type}), such as a merged FlexOlmo model, not "
                          "a dense anchor; pass the anchor directory")
    raise AnchorError(f"{path}: architecture '{model_type}' is not supported as an anchor (supported: {supported})")


def check_context(max_positions: int | None, seq_len: int, path: Path | str) -> None:
    """A window of `seq_len` tokens fits the model's context (its config's max_position_embeddings)."""
    if max_positions is not None and seq_len > max_positions:
        raise AnchorError(f"--seq-len {seq_len} is longer than the {max_positions} positions {path} was built for "
                          f"(max_position_embeddings); use --seq-len {max_positions} or less")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, in index order when sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as error:
            raise AnchorError(f"{index}: corrupt index ({error})") from None
        files = [path / shard for shard in shards]
    else:
        files = [path / "model.safetensors"]
    missing = [file.name for file in files if not file.exists()]
    if missing:
        raise AnchorError(f"{path}: missing weight file(s) {', '.join(missing)}; only safetensors are read")
    return files


def config_fingerprint_payload(config: dict) -> bytes:
    """Canonical JSON of the fields that decide what the model computes."""
    kept = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, separators=(",", ":")).encode("utf-8")


def compute_fingerprint(path: Path | str) -> str:
    """SHA-256 over the config, every tensor (name, dtype, shape, bytes), the public router rows and the
    tokenizer files present (name and SHA-256 of each of TOKENIZER_FILES; scheme FINGERPRINT_SCHEME), read one
    tensor at a time so that fingerprinting a model of any size takes one tensor of memory."""

    path = Path(path)
    config = read_config(path)
    digest = hashlib.sha256(config_fingerprint_payload(config))
    readers = [LazyReader(path, files=[file.name for file in weight_files(path)])]
    if (path / PUBLIC_ROUTER_FILE).exists():
        readers.append(LazyReader(path, files=[PUBLIC_ROUTER_FILE]))
    for reader in readers:
        for name in sorted(reader.names()):
            try:
                digest_tensor(digest, name, reader.get(name))
            except Exception as error:  # safetensors raises several types for a damaged file
                raise AnchorError(f"{path}: corrupt weights ({error}); re-download or re-create the model") from None
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(f"tokenizer|{name}|{sha256_file(path / name)}\n".encode())
    return digest.hexdigest()


def stored_dtype(path: Path | str) -> torch.dtype:
    """The dtype the model's weights are stored in (that of its first tensor), read from the file header: the
    dtype a merged model keeps by default."""

    reader = LazyReader(path)
    return reader.dtype(reader.names()[0])


def load_tokenizer(path: Path | str):
    """The fast tokenizer saved next to a model; it must have an EOS token to separate documents."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise AnchorError(f"{path}: cannot load the tokenizer ({error})") from None
    return check_tokenizer(tokenizer, path)


def check_tokenizer(tokenizer, path: Path | str):
    """The tokenizer, if it is a fast tokenizer with an EOS token (documents are separated by EOS)."""
    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        raise AnchorError(f"{path}: the tokenizer must be a fast tokenizer with an EOS token")
    return tokenizer


def load_pretrained(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`AutoModelForCausalLM.from_pretrained` with load failures turned into one-line errors."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AnchorError(f"{path}: cannot load the model ({first_line})") from None
    return model.to(device).eval()


def load_anchor(
    path: Path | str, dtype: torch.dtype = torch.float32, device: str = "cpu", with_model: bool = True
) -> Anchor:
    """Load and validate a dense anchor: supported family, readable weights, tokenizer, fingerprint."""
    path = Path(path)
    config = read_config(path)
    family = anchor_family(config, path)
    fingerprint = compute_fingerprint(path)
    tokenizer = load_tokenizer(path)
    model = load_pretrained(path, dtype, device) if with_model else None
    return Anchor(path, model, tokenizer, config, family, fingerprint)
