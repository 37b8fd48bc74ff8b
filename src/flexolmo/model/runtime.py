"""Load any model flexolmo works with (a dense anchor or dense expert, or a merged FlexOlmo checkpoint) into
one runtime, and mask experts on it.

A merged checkpoint runs as the anchor's own dense transformers model (OLMo-2, Llama, Mistral, Qwen2, Qwen3:
the architecture recorded in its metadata) with each FFN replaced by our FlexMoEBlock, so attention, norms and
generation stay transformers' code, and the same block that owners trained is the one that serves. The merged
format's extra tensors (a zero shared expert, zero q/k/v biases) have no place in the dense model; they are
checked to be zero instead. Tests check this runtime against transformers' own class for the merged format
(`FlexOlmoForCausalLM`, `Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`) on the same directory.
Exclusion is a mask, not a rewrite: excluded experts get router logit -inf, which equals removing them; top-k
is then capped at the number of experts left. Names are resolved through the merged model's record, and each
excluded slot is checked against its recorded digest first, so an exclusion never masks another expert than
the one named. Only the coordinator's signature binds names to slots (anyone can recompute the unkeyed slot
digests), so with trusted keys a merged model is authenticated before it loads (`authenticate_merged_model`),
and an exclusion without them says on stderr that it trusts whoever wrote the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from flexolmo.core.devices import check_device
from flexolmo.core.errors import AnchorError, MergeError, TrustError
from flexolmo.core.progress import console
from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import RUNTIME_ROUTER_ROW, parse
from flexolmo.model.anchor import (
    ANCHOR_FAMILIES,
    MERGED_MODEL_TYPES,
    AnchorFamily,
    anchor_family,
    load_pretrained,
    load_tokenizer,
    read_config,
)
from flexolmo.model.merged_format import (
    PUBLIC_EXPERT,
    MergedModelInfo,
    authenticate_merged_model,
    is_extra_tensor,
    kept_router_biases,
    merged_config,
    read_merged_info,
)
from flexolmo.model.moe import convert_to_moe, set_active_experts, set_router_bias
from flexolmo.trust.record import verify_slots
from flexolmo.trust.signing import TrustedKeys

# Written by transformers or by hand without changing what the model computes.
_FREE_CONFIG_KEYS = frozenset({"transformers_version", "num_experts_per_tok", "torch_dtype", "dtype", "use_cache"})


@dataclass
class LoadedModel:
    """A model ready to run: the module, its tokenizer, and its experts' names (empty for dense models)."""

    path: Path
    model: torch.nn.Module
    tokenizer: object
    expert_names: list[str] = field(default_factory=list)
    record: dict | None = None  # a merged model's flexolmo_experts.json
    router_bias: bool = False  # the owners' kept router biases are applied (`load_model(router_bias=True)`)

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_names)

    @property
    def biased_experts(self) -> list[str]:
        """The experts whose trained router bias this model applies (none unless loaded with `router_bias`)."""
        if not self.router_bias:
            return []
        return [self.expert_names[slot] for slot in kept_router_biases(self.record["experts"])]

    def exclude(self, names: Sequence[str]) -> None:
        """Mask the named experts (all others active); an empty list re-enables every expert."""
        if names and not self.is_moe:
            raise MergeError(f"{self.path} is a dense model; it has no experts to exclude")
        unknown = sorted(set(names) - set(self.expert_names))
        if unknown:
            raise MergeError(f"{self.path} has no expert(s) {', '.join(unknown)} "
                             f"(it has: {', '.join(self.expert_names)})")
        if self.is_moe:
            if PUBLIC_EXPERT in names:
                raise MergeError(f"cannot exclude '{PUBLIC_EXPERT}': it is the anchor's own FFN, which every other "
                                 "expert was trained next to; exclude owners' experts only")
            family = ANCHOR_FAMILIES[self.record["anchor"]["config"]["model_type"]]
            verify_slots(self.path, self.record, list(names), family.ffn_projections)
            set_active_experts(self.model, [name not in names for name in self.expert_names])


def _dense_config(anchor_config: dict):
    from transformers import AutoConfig

    fields = {key: value for key, value in anchor_config.items()
              if key not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(anchor_config["model_type"], **fields)


def _check_config(info: MergedModelInfo, family: AnchorFamily) -> None:
    """config.json must be what the merge wrote from the recorded anchor config (top-k aside): transformers reads
    config.json, this runtime the anchor config, and they must describe the same model."""
    config = info.config
    expected = merged_config(info.anchor_config, family, config["num_experts"], config["num_experts_per_tok"])
    changed = sorted(key for key in set(config) | set(expected)
                     if key not in _FREE_CONFIG_KEYS and config.get(key) != expected.get(key))
    if changed:
        raise MergeError(f"{info.path}: config.json differs from the anchor config the merge recorded (field "
                         f"{changed[0]}); the checkpoint was altered: merge it again")


def _load_merged(path: Path, dtype: torch.dtype, device: str, router_bias: bool = False) -> LoadedModel:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    info = read_merged_info(path)
    family = anchor_family(info.anchor_config, path)
    _check_config(info, family)
    config = info.config
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    experts = config["num_experts"]
    # Every weight is overwritten from the checkpoint, so random initialisation would only cost time (minutes
    # at 7B); building on the target device avoids a second copy of the model in host memory.
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(_dense_config(info.anchor_config), dtype=dtype)
        convert_to_moe(model, [torch.zeros(experts, hidden)] * num_layers, experts,
                       top_k=config["num_experts_per_tok"], normalize_top_k=bool(config["norm_topk_prob"]))
    _copy_weights(path, model, family, tied_head=bool(config.get("tie_word_embeddings")))
    if router_bias:
        _install_router_bias(model, info.metadata["experts"])
    return LoadedModel(path, model.eval(), load_tokenizer(path), info.expert_names, info.metadata, router_bias)


@torch.no_grad()
def _install_router_bias(model: torch.nn.Module, entries: list[dict]) -> None:
    """Give each expert with a learned router bias (kept by the merge in its metadata entry) that bias again.

    The merged formats have no router bias, so transformers computes the checkpoint without it; flexolmo's
    runtime (`--router-bias` on eval, eval-tasks, generate and serve) and the vLLM plugin (`load_llm(...,
    router_bias=True)`) apply it on request."""
    biases = kept_router_biases(entries)
    for slot, per_layer in biases.items():
        set_router_bias(model, slot, per_layer)
    if not biases:
        console.print("note: no expert of this model was trained with a router bias; --router-bias changes nothing")


def _runtime_tensors(name: str, reader: LazyReader, family: AnchorFamily) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint tensor under its runtime name(s): the stacked router matrix becomes one row per expert, and
    the format's extra zero tensors have none (after checking they are zero)."""
    if is_extra_tensor(family, name):
        if reader.get(name).any():
            raise AnchorError(f"{reader.path}: tensor {name} must be all zeros (it only fills the "
                              f"{family.moe_model_type} format); the checkpoint was altered: merge it again")
        return []
    router = parse(family.merged_router, name)
    if router is None:
        return [(name, reader.get(name))]
    return [(RUNTIME_ROUTER_ROW.format(layer=router["layer"], expert=expert), row[None])
            for expert, row in enumerate(reader.get(name))]


@torch.no_grad()
def _copy_weights(path: Path, model: torch.nn.Module, family: AnchorFamily, tied_head: bool) -> None:
    """Copy the checkpoint into `model` one tensor at a time, so that memory is the model plus one tensor."""
    targets = model.state_dict()
    reader = LazyReader(path)
    loaded, unexpected = set(), []
    for name in reader.names():
        for target_name, tensor in _runtime_tensors(name, reader, family):
            target = targets.get(target_name)
            if target is None:
                unexpected.append(target_name)
            elif target.shape != tensor.shape:
                raise AnchorError(f"{path}: tensor {target_name} has shape {tuple(tensor.shape)}, its config "
                                  f"implies {tuple(target.shape)}")
            else:
                target.copy_(tensor)
                loaded.add(target_name)
    missing = [name for name in targets if name not in loaded and not (tied_head and name == "lm_head.weight")]
    if missing or unexpected:
        raise AnchorError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    if tied_head:
        model.tie_weights()


def load_model(path: Path | str, exclude: Sequence[str] = (), dtype: torch.dtype = torch.float32,
               device: str = "cpu", router_bias: bool = False,
               trusted_keys: TrustedKeys | None = None) -> LoadedModel:
    """Load a dense or merged model directory, with `exclude` experts masked. `router_bias=True` applies the
    owners' learned router biases that a merged checkpoint keeps in its record (not read by transformers, so the
    result is then a model that flexolmo's runtime and its vLLM plugin compute). With `trusted_keys` a merged
    model must verify against them first (a dense model, which flexolmo never signs, is refused); without them,
    excluding experts by name warns that the names are not authenticated."""
    path = Path(path)
    check_device(device)
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type in MERGED_MODEL_TYPES:
        if trusted_keys is not None or exclude:
            authenticate_merged_model(path, trusted_keys, "--exclude" if exclude else "loading")
        loaded = _load_merged(path, dtype, device, router_bias)
    elif router_bias and model_type in ANCHOR_FAMILIES:
        raise AnchorError(f"{path}: a dense model has no experts, so no router bias to apply: leave out --router-bias")
    elif trusted_keys is not None and model_type in ANCHOR_FAMILIES:
        raise TrustError(f"{path}: a dense model, which no coordinator signs; --trusted-keys authenticates merged "
                         "models only: leave it out")
    elif model_type in ANCHOR_FAMILIES:
        loaded = LoadedModel(path, load_pretrained(path, dtype, device), load_tokenizer(path))
    else:
        supported = ", ".join(sorted([*ANCHOR_FAMILIES, *MERGED_MODEL_TYPES]))
        raise AnchorError(f"{path}: architecture '{model_type}' is not supported (supported: {supported})")
    loaded.exclude(list(exclude))
    return loaded


class GenerationSettings(BaseModel):
    """How `generate_text` continues a prompt (the flags of `flexolmo generate`). Checked where used, with the
    flag's name in the message."""

    max_new_tokens: int = Field(64, description="tokens to generate")
    temperature: float = Field(0.0, description="sampling temperature; 0 decodes greedily")
    seed: int = Field(0, description="seed for sampling")


@torch.no_grad()
def generate_text(loaded: LoadedModel, prompt: str, settings: GenerationSettings | None = None) -> str:
    """The prompt's continuation (greedy when the temperature is 0)."""
    settings = settings or GenerationSettings()
    max_new_tokens, temperature = settings.max_new_tokens, settings.temperature
    if max_new_tokens < 1:
        raise MergeError("--max-new-tokens must be at least 1")
    if not temperature >= 0 or temperature == float("inf"):
        raise MergeError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    torch.manual_seed(settings.seed)
    device = next(loaded.model.parameters()).device
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise MergeError("the prompt is empty")
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = loaded.model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=loaded.tokenizer.pad_token_id,
                                   eos_token_id=loaded.tokenizer.eos_token_id, **sampling)
    return loaded.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
