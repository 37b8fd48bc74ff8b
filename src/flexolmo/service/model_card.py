"""The model card (`README.md` in a published version, as model hubs expect): members, what each expert was
trained on as its owner declared in its manifest, licences, and the attestation."""

from __future__ import annotations

import json
from pathlib import Path

from flexolmo.owner.package import read_manifest


def _expert_line(expert: dict, package: Path) -> str:
    manifest = read_manifest(package)
    training, privacy = manifest["training"], manifest["privacy"]
    dp = privacy.get("dp")
    # The package format has no licence field yet, so the card says so rather than guess.
    dp_words = f"DP epsilon {dp['epsilon']:.3g} (delta {dp['delta']:.1e})" if dp else "no DP"
    public = ", ".join(f["name"] for f in training.get("public_data", [])) or "none"
    return (f"| {expert['name']} | `{expert['package_sha256'][:16]}...` | {training.get('tokens', '?')} tokens, "
            f"{training.get('train_documents') or '?'} private documents, public share "
            f"{training.get('public_share', 0):.2f} (public files: {public}) | {dp_words} | not declared |")


def model_card(number: int, experts: list[dict], packages: list[Path], statement: dict) -> str:
    rows = "\n".join(_expert_line(expert, path) for expert, path in zip(experts, packages))
    return f"""# FlexOlmo consortium model, version {number}

A mixture of experts merged by the consortium's coordinator from the anchor (the public expert) and the
experts below, each trained privately by its owner and admitted by the consortium service. Any owner may
withdraw: servers follow the coordinator's signed active set and stop using a withdrawn expert at once, and
this version is then marked withdrawn.

Anchor fingerprint: `{statement['predicate']['anchor']['fingerprint']}`

| expert (member) | package SHA-256 | trained on, as its owner declared | privacy | licence |
|---|---|---|---|---|
{rows}

## Verify

The directory is signed by the coordinator (`model.sig`, OpenSSF model-signing format); `attestation.intoto.json`
is a DSSE envelope over the in-toto statement below, signed with the same key. One command checks all of it:
`flexolmo coordinator verify THIS_DIRECTORY --public-key coordinator.pub`.

```json
{json.dumps(statement, indent=1, sort_keys=True)}
```
"""
