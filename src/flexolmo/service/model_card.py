"""The model card (`README.md` in a published version, as model hubs expect): members, the licence and the
data each owner declared with its signed submission, what each expert's manifest records of its training,
and the attestation (which carries the same declarations, signed by the coordinator)."""

from __future__ import annotations

import json
from pathlib import Path

from flexolmo.owner.package import read_manifest

NOT_DECLARED = "not declared"


def _cell(text: str) -> str:
    """Owner-written text made safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _expert_line(expert: dict, package: Path, declared: dict) -> str:
    manifest = read_manifest(package)
    training, privacy = manifest["training"], manifest["privacy"]
    dp = privacy.get("dp")
    dp_words = f"DP epsilon {dp['epsilon']:.3g} (delta {dp['delta']:.1e})" if dp else "no DP"
    public = ", ".join(f["name"] for f in training.get("public_data", [])) or "none"
    return (f"| {expert['name']} | `{expert['package_sha256'][:16]}...` | "
            f"{_cell(declared.get('licence', NOT_DECLARED))} | {_cell(declared.get('data', NOT_DECLARED))} | "
            f"{training.get('tokens', '?')} tokens, {training.get('train_documents') or '?'} private documents, "
            f"public share {training.get('public_share', 0):.2f} (public files: {public}) | {dp_words} |")


def model_card(number: int, experts: list[dict], packages: list[Path], statement: dict,
               declarations: dict[str, dict] | None = None) -> str:
    declarations = declarations or {}
    rows = "\n".join(_expert_line(expert, path, declarations.get(expert["name"], {}))
                     for expert, path in zip(experts, packages))
    return f"""# FlexOlmo consortium model, version {number}

A mixture of experts merged by the consortium's coordinator from the anchor (the public expert) and the
experts below, each trained privately by its owner and admitted by the consortium service. Any owner may
withdraw: servers follow the coordinator's signed active set and stop using a withdrawn expert at once, and
this version is then marked withdrawn.

Anchor fingerprint: `{statement['predicate']['anchor']['fingerprint']}`

The licence and the data description are each owner's own words, sent with its signed submission (the
coordinator has not checked them; "{NOT_DECLARED}" where the owner gave none); the training and privacy
columns are what the expert's signed package manifest records. Use of the model is bound by every licence
below.

| expert (member) | package SHA-256 | licence, as its owner declared | data, as its owner declared | \
training, from its manifest | privacy |
|---|---|---|---|---|---|
{rows}

## Verify

The directory is signed by the coordinator (`model.sig`, OpenSSF model-signing format); `attestation.intoto.json`
is a DSSE envelope over the in-toto statement below, signed with the same key (each input's `annotations` are
its owner's declaration). One command checks all of it:
`flexolmo coordinator verify THIS_DIRECTORY --public-key coordinator.pub`.

```json
{json.dumps(statement, indent=1, sort_keys=True)}
```
"""
