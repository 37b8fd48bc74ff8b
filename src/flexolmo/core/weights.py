"""Tensor names as declarative templates, so a new anchor family is a table row, not new code paths.

Three layouts meet here:
- the dense anchor (transformers OLMo-2, Llama, Mistral, Qwen2, Qwen3): `model.layers.{layer}.mlp.{proj}.weight`;
- the expert package: `layers.{layer}.{proj}.weight`, `layers.{layer}.router.weight` (1, H) and, when trained
  with a negative bias, `layers.{layer}.router.bias` (1,);
- the merged checkpoint (transformers/vLLM `flex_olmo`, `qwen2_moe`, `qwen3_moe`; per-expert names on disk):
  `model.layers.{layer}.mlp.experts.{expert}.{proj}.weight` and `model.layers.{layer}.mlp.gate.weight` (E, H).
Our runtime keeps the merged names for experts and splits the router into rows:
`model.layers.{layer}.mlp.gate.rows.{expert}.weight`.
"""

from __future__ import annotations

import re
from functools import lru_cache

ANCHOR_FFN = "model.layers.{layer}.mlp.{proj}.weight"
MERGED_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
MERGED_ROUTER = "model.layers.{layer}.mlp.gate.weight"
RUNTIME_ROUTER_ROW = "model.layers.{layer}.mlp.gate.rows.{expert}.weight"
RUNTIME_ROUTER_BIAS = "model.layers.{layer}.mlp.gate.rows.{expert}.bias"
PACKAGE_FFN = "layers.{layer}.{proj}.weight"
PACKAGE_ROUTER = "layers.{layer}.router.weight"
PACKAGE_BIAS = "layers.{layer}.router.bias"


@lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template)
    for field, regex in (("layer", r"\d+"), ("expert", r"\d+"), ("proj", r"[A-Za-z_]+")):
        escaped = escaped.replace(re.escape("{" + field + "}"), f"(?P<{field}>{regex})")
    return re.compile(f"^{escaped}$")


def parse(template: str, name: str) -> dict[str, str | int] | None:
    """The placeholders of `name` under `template`, or None when it does not match."""
    match = _pattern(template).match(name)
    if match is None:
        return None
    return {key: int(value) if key in ("layer", "expert") else value for key, value in match.groupdict().items()}


def is_ffn_or_router(name: str) -> bool:
    """Whether a dense anchor tensor is replaced by the mixture (its FFN) rather than shared."""
    return parse(ANCHOR_FFN, name) is not None
