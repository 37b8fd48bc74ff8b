"""`flex_olmo`: the merged format of OLMo-2 anchors (transformers >= 4.57, vLLM >= 0.11.1).

FlexOlmo is OLMo-2 with OLMoE's sparse block in place of the FFN, so the anchor's config carries over as it is
and the format needs no field or tensor beyond the experts and the router.
"""

from __future__ import annotations

from flexolmo.model.families import MergedFormat


def config_fields(anchor_config: dict) -> dict:
    return {}


FORMAT = MergedFormat(model_type="flex_olmo", architecture="FlexOlmoForCausalLM", config_fields=config_fields)
