"""What an artefact flexolmo makes holds: `describe(path)` recognises an expert package, an anchor, a dense
model or a merged model and lists what it holds, as fields, tables and a JSON record, for `flexolmo inspect`.

Only headers and small JSON files are read, except for an anchor's fingerprint, which hashes its weights once
(the same fingerprint every package of the anchor records). Nothing here prints: the command line does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError, PackageError
from flexolmo.core.tensor_io import LazyReader
from flexolmo.model.anchor import ANCHOR_FAMILIES, PUBLIC_ROUTER_FILE, compute_fingerprint, read_config
from flexolmo.model.merged_format import kept_router_biases, read_merged_info
from flexolmo.owner.manifest import describe_disclosure
from flexolmo.owner.package import MANIFEST_FILE, load_package
from flexolmo.trust.signing import SIGNATURE_FILE

PACKAGE, ANCHOR, DENSE, MERGED = "expert package", "anchor", "dense model", "merged model"
_MOE_TYPES = {family.moe_model_type: family for family in ANCHOR_FAMILIES.values()}
# Beside a dense model: what `flexolmo pretrain` and the dense baselines record about how it was made.
_PRETRAIN_RECORD = "flexolmo_pretrain.json"
_DENSE_RECORD = "flexolmo_dense.json"


@dataclass
class DescriptionTable:
    """A table of a description: a title, column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[object]]


@dataclass
class Description:
    """What an artefact is (`kind`) and holds: `fields` (name, value) first, then `tables`; `record` is the
    same for machines (JSON)."""

    kind: str
    path: Path
    fields: list[tuple[str, str]]
    tables: list[DescriptionTable] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def artefact_kind(path: Path | str) -> str:
    """PACKAGE, ANCHOR, DENSE or MERGED, or a one-line error saying why `path` is none of them."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).exists():
        return PACKAGE
    model_type = read_config(path).get("model_type")  # errors in one line for a missing path or config
    if model_type in _MOE_TYPES:
        return MERGED
    if model_type in ANCHOR_FAMILIES:
        return ANCHOR if (path / PUBLIC_ROUTER_FILE).exists() else DENSE
    raise FlexOlmoError(f"{path}: a '{model_type}' model, which flexolmo does not make or read (supported: "
                        f"{', '.join(sorted([*ANCHOR_FAMILIES, *_MOE_TYPES]))})")


def check_is_package(path: Path | str) -> None:
    """When `path` is a model rather than an expert package, a one-line refusal saying what it is and which
    command applies; anything else is left to the package reader's own errors."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST_FILE).exists() or not (path / "config.json").exists():
        return
    kind = artefact_kind(path)
    hint = {ANCHOR: f"check a package against it with `flexolmo verify PACKAGE --anchor {path}`",
            MERGED: f"check a merged model with `flexolmo verify {path}`",
            DENSE: "packages are verified against an anchor"}[kind]
    raise PackageError(f"{path} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not an expert package: {hint}; "
                       f"`flexolmo inspect {path}` describes it")


def describe(path: Path | str) -> Description:
    """Recognise `path` and describe it."""
    path = Path(path)
    kind = artefact_kind(path)
    return {PACKAGE: describe_package, ANCHOR: describe_dense, DENSE: describe_dense,
            MERGED: describe_merged}[kind](path)


# -- expert package -----------------------------------------------------------------------------------------

def describe_package(path: Path) -> Description:
    """A package's manifest (verified first: a damaged package is refused, not described), with what each of its
    fields reveals about the owner's data."""

    manifest = load_package(path, with_tensors=False).manifest
    training = manifest["training"]
    dp = manifest["privacy"]["dp"]
    values = sum(_numel(tensor["shape"]) for tensor in manifest["tensors"].values())
    if training.get("heldout_loss_before") is None:
        heldout = "withheld (not covered by DP; in the owner's report)"
    else:
        heldout = (f"{training['heldout_loss_before']:.4f} -> {training['heldout_loss_after']:.4f} "
                   f"({training.get('heldout_dtype') or 'float32'})")
    fields = [
        ("kind", PACKAGE),
        ("name", manifest["name"]),
        ("format version", str(manifest["format_version"])),
        ("anchor fingerprint", manifest["anchor"]["fingerprint"]),
        ("tensors", f"{len(manifest['tensors'])} ({values:,} values)"),
        ("tokens trained", f"{training['tokens']:,}"),
        ("held-out loss before -> after", heldout),
        ("differential privacy", "none" if not dp else f"epsilon {dp['epsilon']:.3g}, delta {dp['delta']:.3g}"),
        ("router row", _router_row(manifest["privacy"])),
        ("signature", "present (check who signed with `flexolmo verify --trusted-keys`)"
         if (path / SIGNATURE_FILE).exists() else "none: anyone could have written this package"),
        ("created", manifest.get("created", "-")),
        ("flexolmo version", manifest.get("versions", {}).get("flexolmo", "-")),
    ]
    disclosure = DescriptionTable("what this manifest reveals about the owner's data", ["field", "value", "reveals"],
                                  [list(row) for row in describe_disclosure(manifest)])
    return Description(PACKAGE, path, fields, [disclosure], record=manifest)


def _router_row(privacy: dict) -> str:
    """How the router row started, and whether that read private data outside any DP mechanism."""
    init = privacy.get("router_init", "-")
    if privacy.get("router_row_from_private_data"):
        return f"{init} (a statistic of the training data, not covered by DP)"
    releases = _object(privacy.get("dp")).get("prior_releases") or []
    return f"{init} (released under DP, counted in epsilon)" if releases else init


# -- anchor and dense models --------------------------------------------------------------------------------

def describe_dense(path: Path) -> Description:
    """An anchor (a dense model with public router rows) or another dense model flexolmo made."""
    config = read_config(path)
    family = ANCHOR_FAMILIES[config["model_type"]]
    reader = LazyReader(path)
    has_rows = (path / PUBLIC_ROUTER_FILE).exists()
    kind = ANCHOR if has_rows else DENSE
    fields = [("kind", kind), ("family", f"{family.model_type} (merged into {family.moe_model_type})")]
    if has_rows:
        fields += [("fingerprint", compute_fingerprint(path)),
                   ("public router rows", f"present ({len(LazyReader(path, files=[PUBLIC_ROUTER_FILE]).names())} "
                                          "layers)")]
    else:
        fields.append(("public router rows", "absent: `flexolmo init-router` adds them to make it an anchor"))
    fields += _shape_fields(config, reader)
    record: dict = {"kind": kind, "config": config, "public_router_rows": has_rows}
    if (path / _PRETRAIN_RECORD).exists():
        summary = _read_json(path / _PRETRAIN_RECORD)
        fields += [("made by", "flexolmo pretrain"),
                   ("tokens trained", f"{summary.get('tokens_trained', 0):,}"),
                   ("held-out bits/byte", f"{summary.get('heldout', {}).get('bits_per_byte', float('nan')):.4f}")]
        record["pretrain"] = summary
    if (path / _DENSE_RECORD).exists():
        summary = _read_json(path / _DENSE_RECORD)
        fields += [("made by", f"flexolmo baseline ({summary.get('kind', '-')})"),
                   ("anchor fingerprint", summary.get("anchor", {}).get("fingerprint", "-"))]
        record["dense"] = summary
    return Description(kind, path, fields, record=record)


# -- merged model -------------------------------------------------------------------------------------------

# Further rows of a merged model, each from a file of its directory, shown when that file exists: the place for
# the signers of the model and its merge history once merges record them. Each takes the model directory and
# returns (field, value) rows, or none when its file is absent.
MERGED_EXTRAS: list[Callable[[Path], list[tuple[str, str]]]] = []


def describe_merged(path: Path) -> Description:
    """A merged model: its experts, top-k, format, dtype, size, the anchor it was built on."""

    info = read_merged_info(path)
    config, metadata = info.config, info.metadata
    reader = LazyReader(path)
    files = reader.files()
    experts = config["num_experts"]
    top_k = config["num_experts_per_tok"]
    recorded = metadata.get("top_k")
    fields = [
        ("kind", MERGED),
        ("format", f"{config['model_type']} ({', '.join(config.get('architectures', []))}), {len(files)} "
                   "safetensors file(s), per-expert tensor names"),
        ("experts", f"{experts}: {', '.join(info.expert_names)}"),
        ("top-k", str(top_k) + (f" (the merge recorded {recorded})" if recorded not in (None, top_k) else "")),
        ("anchor fingerprint", info.anchor_fingerprint),
        *_shape_fields(config, reader, experts=experts, top_k=top_k),
        ("router biases", _router_biases(metadata["experts"])),
        ("created", str(metadata.get("created", "-"))),
        ("flexolmo version", str(_object(metadata.get("versions")).get("flexolmo", "-"))),
    ]
    for extra in MERGED_EXTRAS:
        fields += extra(path)
    table = DescriptionTable("experts", ["expert", "name", "source", "tokens trained", "differential privacy",
                                         "router row"],
                             [_expert_row(index, entry) for index, entry in enumerate(metadata["experts"])])
    return Description(MERGED, path, fields, [table], record={"kind": MERGED, "config": config, **metadata})


def _router_biases(entries: list[dict]) -> str:
    """The owners' trained router biases the record keeps: what `--router-bias` would apply, each as its mean
    over layers."""
    kept = [f"{entries[slot]['name']} {sum(per_layer) / len(per_layer):.3g}"
            for slot, per_layer in kept_router_biases(entries).items()]
    if not kept:
        return "none"
    return f"{', '.join(kept)} (mean over layers; transformers drops them, --router-bias applies them)"


def _object(value) -> dict:
    """`value` when it is a JSON object, else an empty one: a record's manifest was verified when its package
    was merged, but the record may have been edited since, and describing it must not fail on that."""
    return value if isinstance(value, dict) else {}


def _expert_row(index: int, entry: dict) -> list[object]:
    manifest = _object(entry.get("manifest"))
    tokens = _object(manifest.get("training")).get("tokens")
    privacy = _object(manifest.get("privacy"))
    epsilon = _object(privacy.get("dp")).get("epsilon")
    dp = "none" if not privacy.get("dp") else f"epsilon {epsilon:.3g}" if isinstance(epsilon, (int, float)) else "?"
    return [index, entry["name"], entry.get("source", "-"), f"{tokens:,}" if isinstance(tokens, int) else "-",
            dp if manifest else "-", _router_row(privacy) if manifest else "public row"]


# -- shared pieces ------------------------------------------------------------------------------------------

def _shape_fields(config: dict, reader: LazyReader, experts: int = 1, top_k: int = 1) -> list[tuple[str, str]]:
    """Dtype, parameter count (and, for a mixture, the parameters one token uses) and the model's shape."""
    names = reader.names()
    dtypes = sorted({str(reader.dtype(name)).removeprefix("torch.") for name in names})
    total = sum(_numel(reader.shape(name)) for name in names)
    parameters = f"{total:,}"
    if experts > top_k:
        per_expert = sum(_numel(reader.shape(name)) for name in names if ".mlp.experts.0." in name)
        parameters += f" ({total - (experts - top_k) * per_expert:,} used per token)"
    return [("dtype", ", ".join(dtypes)), ("parameters", parameters),
            ("shape", f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, FFN "
                      f"{config.get('intermediate_size')}, vocabulary {config.get('vocab_size')}")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FlexOlmoError(f"{path}: corrupt ({error})") from None


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total
