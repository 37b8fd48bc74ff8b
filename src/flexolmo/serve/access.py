"""Who may use which expert: API keys (`--keys`), the request's own narrowing, and the signed active set.

A request's mask is the intersection of three things, and the public expert is in all of them:
- what its API key may use (`--keys FILE`: a JSON object from each key to a list of expert names, `["*"]` for
  all; without `--keys`, every caller may use every expert, which suits a server on loopback only);
- the request's `experts` field, which narrows and never widens (an expert the key may not use is a 403);
- the coordinator's signed active set (`--active-set FILE|URL --coordinator-keys DIR`, followed by
  `follow.ActiveSetFollower`). An expert leaving it is masked from the next request on; a set that cannot be
  used makes the server fail closed to the public expert.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError, TrustError
from flexolmo.model.merged_format import PUBLIC_EXPERT

ALL_EXPERTS = "*"


class AccessError(FlexOlmoError):
    """A request that may not run as asked; `status` is its HTTP status (400, 401 or 403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_keys(path: Path | str, expert_names: list[str]) -> dict[str, frozenset[str]]:
    """The `--keys` file as key -> the experts it may use (public always included), checked against the model."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrustError(f"{path}: cannot read the API keys (a JSON object from key to expert names): {error}") \
            from None
    if not isinstance(raw, dict) or not all(isinstance(names, list) for names in raw.values()):
        raise TrustError(f"{path}: must be a JSON object from each API key to a list of expert names")
    keys = {}
    for key, names in raw.items():
        unknown = sorted(set(names) - set(expert_names) - {ALL_EXPERTS})
        if unknown:
            raise TrustError(f"{path}: key {key[:4]}... names expert(s) {', '.join(unknown)} that the model does "
                             f"not have (it has: {', '.join(expert_names)})")
        keys[key] = frozenset(expert_names if ALL_EXPERTS in names else [*names, PUBLIC_EXPERT])
    return keys


def allowed_experts(keys: dict[str, frozenset[str]] | None, api_key: str | None,
                    expert_names: list[str]) -> frozenset[str]:
    """The experts an API key may use; 401 for a missing or unknown key when keys are configured."""
    if keys is None:
        return frozenset(expert_names)
    if not api_key:
        raise AccessError(401, "an API key is required (Authorization: Bearer KEY)")
    if api_key not in keys:
        raise AccessError(401, "unknown API key")
    return keys[api_key]


def requested_experts(allowed: frozenset[str], requested: list[str] | None, expert_names: list[str]) -> set[str]:
    """The request's `experts` narrowing what its key allows: 400 for a name the model lacks, 403 for one the
    key may not use. The public expert is always in."""
    if requested is None:
        return set(allowed)
    unknown = sorted(set(requested) - set(expert_names))
    if unknown:
        raise AccessError(400, f"the model has no expert(s) {', '.join(unknown)} (it has: {', '.join(expert_names)})")
    forbidden = sorted(set(requested) - allowed)
    if forbidden:
        raise AccessError(403, f"this API key may not use expert(s) {', '.join(forbidden)}")
    return {*requested, PUBLIC_EXPERT}


def request_mask(expert_names: list[str], allowed: frozenset[str], requested: list[str] | None,
                 active: tuple[bool, ...]) -> tuple[bool, ...]:
    """The experts one request runs, one flag per expert in the model's order: what its key allows, narrowed by
    its `experts` field (400/403 as `requested_experts`), within the active set's mask `active`. Every backend
    (flexolmo's own scheduler, the vLLM plugin) takes a request's mask from here and nowhere else."""
    names = requested_experts(allowed, requested, expert_names)
    return tuple(name in names and on for name, on in zip(expert_names, active, strict=True))
