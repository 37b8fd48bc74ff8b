"""The coordinator's merge: anchor + expert packages -> one transformers/vLLM mixture-of-experts checkpoint in
the anchor family's merged format (`flex_olmo`, `qwen2_moe` or `qwen3_moe`, see `anchor.ANCHOR_FAMILIES`).

Merge, add (a late joiner) and remove (an opt-out) are one operation: choose a base checkpoint for the shared
tensors and an ordered list of expert sources, then stream them into a new directory. Experts are ordered
`[public, e_1, ..., e_n]`; layer L's router is the sources' rows stacked; every other tensor is copied from the
base bit for bit.

Dtypes: the merged checkpoint has one dtype, by default the anchor's (`dtype="anchor"`). Experts trained with
float32 master weights are rounded to it (to bf16 for a bf16 anchor: an owner's model and the merged
[public, owner] model then differ by that rounding, about 1e-2 in logits); owners measure their held-out
numbers in that same dtype, so the manifest's numbers are the merged model's. `dtype="float32"` keeps the
experts exact and upcasts the anchor's tensors (exactly). The dtype is recorded in config.json and in the
merged metadata; add and remove keep the model's dtype. Tensors are read one at a time from memory-mapped files and
written in size-bounded shards, so peak memory is one shard plus one tensor, whatever the model's size. Every input is
verified before anything is written, and the output directory appears only once it is complete. Tensors a format
requires but no anchor has (a zero shared expert, zero q/k/v biases) are written from the family's table, never copied.

Trust (`flexolmo.trust`): packages are verified against trusted keys when given; each expert's slot is
digested as it is written and recorded in `flexolmo_experts.json`; kept experts are checked against their
recorded digests while they are copied; and before the output is published, the joining experts pass the
admission checks, the operation is appended to the merge log and the coordinator signs the files.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo.coordinator.expert_sources import AnchorExpert, ExpertSource, MergedExpert, PackageExpert
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import MergeError, TrustError
from flexolmo.core.fileio import atomic_directory, atomic_write_json, check_outside_inputs
from flexolmo.core.precision import DTYPES, dtype_name
from flexolmo.core.progress import console, progress_bar
from flexolmo.core.provenance import software_versions, utc_now
from flexolmo.core.tensor_io import DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, LazyReader, ShardedWriter
from flexolmo.core.weights import parse
from flexolmo.data.public_sample import PUBLIC_SAMPLE_FILE
from flexolmo.model.anchor import (
    FINGERPRINT_SCHEME,
    PUBLIC_ROUTER_FILE,
    AnchorFamily,
    anchor_family,
    complete_config,
    compute_fingerprint,
    read_config,
)
from flexolmo.model.merged_format import (
    MERGED_FORMAT,
    MERGED_FORMAT_VERSION,
    MERGED_METADATA_FILE,
    PUBLIC_EXPERT,
    ROUTER_TUNING_KEY,
    MergedModelInfo,
    authenticate_merged_model,
    check_top_k,
    is_extra_tensor,
    merged_config,
    read_merged_info,
)
from flexolmo.model.router_init import load_public_rows
from flexolmo.owner.package import load_package
from flexolmo.trust.history import HISTORY_FILE, check_unchanged, opted_out, read_history
from flexolmo.trust.record import SlotRecorder, verify_slots
from flexolmo.trust.signing import SIGNATURE_FILE

# Written by flexolmo or transformers beside the weights; everything else in a model directory (tokenizer
# files, generation config) is copied into the merged checkpoint as it is.
_NOT_COPIED = {"config.json", SINGLE_FILE, INDEX_FILE, MERGED_METADATA_FILE, PUBLIC_ROUTER_FILE,
               "flexolmo_pretrain.json", "flexolmo_import.json", HISTORY_FILE, SIGNATURE_FILE, PUBLIC_SAMPLE_FILE}
def _check_names(experts: list[ExpertSource]) -> None:
    seen: set[str] = set()
    for expert in experts:
        if expert.name in seen:
            raise MergeError(f"two experts are named '{expert.name}'; expert names must be unique")
        seen.add(expert.name)


def _public_anchor_config(anchor_config: dict) -> dict:
    """The anchor's config as recorded in a merged model: no local path (`_name_or_path`)."""
    return {key: value for key, value in anchor_config.items() if key != "_name_or_path"}


def _check_kept_slots(experts: list[ExpertSource], digests: list[str]) -> None:
    """Experts copied from a merged model must arrive with the weights their record named."""
    for index, (expert, digest) in enumerate(zip(experts, digests)):
        if isinstance(expert, MergedExpert) and expert.entry.get("slot_sha256") != digest:
            raise TrustError(f"expert '{expert.name}' (slot {expert.index} of the source model) does not hold the "
                             "weights its record names; the source model was altered")


@dataclass
class MergePlan:
    """One merge described as data: where the shared tensors and each expert slot come from, and what the
    checkpoint says about itself. Merge, add, remove and router tuning each build one and `_write_merged` runs
    it. `router_rows` (one (E, H) matrix per layer) replaces the experts' own rows (router tuning);
    `extra_metadata` adds records of earlier steps (such as tuning)."""

    out: Path
    base: LazyReader
    shared_names: list[str]
    experts: list[ExpertSource]
    anchor_config: dict
    anchor_fingerprint: str
    family: AnchorFamily
    top_k: int
    files_from: Path
    shard_bytes: int
    dtype: torch.dtype | None = None
    router_rows: list[torch.Tensor] | None = None
    extra_metadata: dict = field(default_factory=dict)
    fingerprint_scheme: int = FINGERPRINT_SCHEME


def _check_plan(plan: MergePlan) -> None:
    _check_names(plan.experts)
    check_top_k(plan.top_k, len(plan.experts))
    clashes = [name for name in plan.shared_names if is_extra_tensor(plan.family, name)]
    if clashes:
        raise MergeError(f"the anchor has {clashes[0]}, which the {plan.family.moe_model_type} format reserves for "
                         "a zero tensor; this anchor is not supported")


def _merged_metadata(plan: MergePlan, dtype: torch.dtype) -> dict:
    """The record of the merged model, before the slot digests are known."""
    records = [expert.record() for expert in plan.experts]
    dropped_bias = [record["name"] for record in records if "router_bias" in record]
    for name in dropped_bias:
        console.print(f"[yellow]note:[/] expert '{name}' learned a router bias; the {plan.family.moe_model_type} "
                      f"format has no router bias, so transformers runs without it; kept in "
                      f"{MERGED_METADATA_FILE}, where --router-bias (serve, eval, eval-tasks, generate) applies it")
    return {
        "format": MERGED_FORMAT,
        "format_version": MERGED_FORMAT_VERSION,
        "anchor": {"fingerprint": plan.anchor_fingerprint, "fingerprint_scheme": plan.fingerprint_scheme,
                   "config": _public_anchor_config(plan.anchor_config)},
        "top_k": plan.top_k,
        "dtype": dtype_name(dtype),
        "experts": records,
        "router_bias_dropped": dropped_bias,
        **plan.extra_metadata,
        "created": utc_now(),
        "versions": software_versions(),
    }


def _write_tensors(plan: MergePlan, writer: SlotRecorder, dtype: torch.dtype) -> None:
    """Every tensor of the merged checkpoint, one at a time: shared ones, then layer by layer each slot's FFN,
    the router and the format's zero tensors."""
    layers = plan.anchor_config["num_hidden_layers"]
    family = plan.family
    with progress_bar("merging", total=len(plan.shared_names) + layers, unit="tensors/layers") as advance:
        for name in plan.shared_names:
            writer.add(name, plan.base.get(name).to(dtype))
            advance()
        for layer in range(layers):
            for index, expert in enumerate(plan.experts):
                for proj in family.ffn_projections:
                    writer.add(family.merged_expert.format(layer=layer, expert=index, proj=proj),
                               expert.ffn(layer, proj).to(dtype))
            if plan.router_rows is None:
                rows = torch.stack([expert.router_row(layer).to(dtype) for expert in plan.experts])
            else:
                rows = plan.router_rows[layer].to(dtype)
            writer.add(family.merged_router.format(layer=layer), rows)
            for extra in family.extra_tensors:
                writer.add(extra.template.format(layer=layer),
                           torch.zeros(extra.shape(plan.anchor_config), dtype=dtype))
            advance()
        writer.finish()


def _write_merged(plan: MergePlan, seal=None) -> dict:
    """Write the merged checkpoint; `seal(staging, metadata)` runs inside the staging directory once every file
    is written, before it is published (trust checks, log, signature)."""
    _check_plan(plan)
    dtype = plan.dtype or plan.base.dtype(plan.shared_names[0])
    metadata = _merged_metadata(plan, dtype)
    with atomic_directory(plan.out) as staging:
        writer = SlotRecorder(ShardedWriter(staging, plan.shard_bytes))
        _write_tensors(plan, writer, dtype)
        digests = writer.digests([expert.name for expert in plan.experts])
        if plan.router_rows is None:  # new rows change the digests on purpose; the source was verified instead
            _check_kept_slots(plan.experts, digests)
        for entry, digest in zip(metadata["experts"], digests):
            entry["slot_sha256"] = digest
        atomic_write_json(staging / "config.json", merged_config(plan.anchor_config, plan.family,
                                                                 len(plan.experts), plan.top_k, dtype))
        atomic_write_json(staging / MERGED_METADATA_FILE, metadata)
        for item in sorted(plan.files_from.iterdir()):
            if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(".safetensors"):
                shutil.copy2(item, staging / item.name)
        if seal is not None:
            seal(staging, metadata)
    return metadata


def _verified_packages(paths: list[Path], fingerprint: str, anchor_config: dict,
                       trust: CoordinatorTrust) -> list[PackageExpert]:
    packages = []
    for path in paths:
        package = load_package(path, fingerprint, anchor_config, with_tensors=False, trusted_keys=trust.trusted_keys)
        if package.name == PUBLIC_EXPERT:
            raise MergeError(f"{path}: the name '{PUBLIC_EXPERT}' is reserved for the anchor's expert")
        packages.append(PackageExpert(package))
    return packages


def _refuse_existing(out: Path, model: Path | str | None = None, packages: list[Path] = (),
                     anchor: Path | str | None = None) -> None:
    """Before any work: `out` is new and outside every input (writing it must never change one)."""
    if out.exists():
        raise MergeError(f"{out} already exists: choose another --out or remove it")
    check_outside_inputs(out, [("model", model), ("anchor", anchor), *(("package", path) for path in packages)])


def _added(experts: list[PackageExpert], readmitted: Sequence[str] = ()) -> list[dict]:
    """How the merge log names added experts: by name, package digest and signer, never by manifest; an expert
    whose owner had opted out is marked as readmitted."""
    return [{"name": e.name, "package_sha256": e.package.digest,
             "signer": e.package.signer.as_dict() if e.package.signer else None,
             **({"readmitted": True} if e.name in readmitted else {})} for e in experts]


def _sealer(trust: CoordinatorTrust, source: Path | None, operation: str, joining: list[PackageExpert],
            removed: list[dict], readmitted: Sequence[str] = ()):
    def seal(staging: Path, metadata: dict) -> None:
        trust.seal(staging, source, operation, [e.name for e in joining], {
            "anchor_fingerprint": metadata["anchor"]["fingerprint"], "added": _added(joining, readmitted),
            "removed": removed, "experts": [entry["name"] for entry in metadata["experts"]],
            "top_k": metadata["top_k"]})

    return seal


def _check_readmission(model_dir: Path | str, joining: list[PackageExpert], readmit: Sequence[str]) -> list[str]:
    """An expert whose owner opted out (removed, as the model's log says) joins again only when `readmit` names
    it; returns the readmitted names, which the log marks."""
    names = {expert.name for expert in joining}
    stray = sorted(set(readmit) - names)
    if stray:
        raise MergeError(f"--readmit names {', '.join(stray)}, which no package given adds")
    opted = opted_out(read_history(model_dir))
    refused = sorted(names & (set(opted) - set(readmit)))
    if refused:
        name = refused[0]
        raise MergeError(f"'{name}' opted out of {model_dir} (removed at {opted[name].get('when')}); adding it "
                         f"again needs its owner's consent: pass --readmit {name}")
    return sorted(names & set(opted))


def merge(anchor_dir: Path | str, package_paths: list[Path], out: Path | str, top_k: int,
          shard_bytes: int = DEFAULT_SHARD_BYTES, trust: CoordinatorTrust | None = None,
          dtype: str = "anchor") -> dict:
    """Merge the anchor and `package_paths` into a checkpoint of the anchor family's format at `out`;
    returns its metadata.

    `trust` says which keys to trust, which admission checks to run and whether to sign; without it, packages
    are verified but not authenticated, no admission check runs, and the model is logged but not signed.
    `dtype` is the merged checkpoint's: "anchor" (the anchor's own), "float32" or "bfloat16"."""
    anchor_dir, out = Path(anchor_dir), Path(out)
    trust = trust or CoordinatorTrust()
    _refuse_existing(out, packages=package_paths, anchor=anchor_dir)
    check_top_k(top_k, len(package_paths) + 1)
    if dtype != "anchor" and dtype not in DTYPES:
        raise MergeError(f"unknown --dtype {dtype!r}; use anchor, {', '.join(DTYPES)}")
    family = anchor_family(read_config(anchor_dir), anchor_dir)
    anchor_config = complete_config(read_config(anchor_dir), anchor_dir)
    fingerprint = compute_fingerprint(anchor_dir)
    reader = LazyReader(anchor_dir)
    public = AnchorExpert(reader, load_public_rows(anchor_dir, anchor_config["num_hidden_layers"]), family)
    joining = _verified_packages(package_paths, fingerprint, anchor_config, trust)
    shared = [name for name in reader.names() if parse(family.anchor_ffn, name) is None]
    plan = MergePlan(out, reader, shared, [public, *joining], anchor_config, fingerprint, family, top_k, anchor_dir,
                     shard_bytes, dtype=None if dtype == "anchor" else DTYPES[dtype])
    return _write_merged(plan, _sealer(trust, None, "merge", joining, []))


def _merged_sources(info: MergedModelInfo,
                    family: AnchorFamily) -> tuple[LazyReader, list[MergedExpert], list[str]]:
    reader = LazyReader(info.path)
    experts = [MergedExpert(reader, index, entry, family) for index, entry in enumerate(info.metadata["experts"])]
    # Extra zero tensors are written anew from the table, so whatever a modified checkpoint holds there is dropped.
    shared = [name for name in reader.names()
              if parse(family.merged_expert, name) is None and parse(family.merged_router, name) is None
              and not is_extra_tensor(family, name)]
    return reader, experts, shared


def add_experts(model_dir: Path | str, package_paths: list[Path], out: Path | str, top_k: int | None = None,
                shard_bytes: int = DEFAULT_SHARD_BYTES, trust: CoordinatorTrust | None = None,
                readmit: Sequence[str] = ()) -> dict:
    """A late joiner: the merged model plus `package_paths`, verified against the model's own anchor. With
    `trust.trusted_keys` the model is authenticated first (`authenticate_merged_model`), else a warning says it
    is not. An expert whose owner opted out earlier (its removal is in the model's log) is refused unless
    `readmit` names it, and the log marks it readmitted."""
    out = Path(out)
    trust = trust or CoordinatorTrust()
    _refuse_existing(out, model=model_dir, packages=package_paths)
    authenticate_merged_model(model_dir, trust.trusted_keys, "add")
    info = read_merged_info(model_dir)
    top_k = info.metadata["top_k"] if top_k is None else top_k
    check_top_k(top_k, len(info.expert_names) + len(package_paths))
    family = anchor_family(info.anchor_config, model_dir)
    check_unchanged(info.path)
    if info.anchor_fingerprint_scheme != FINGERPRINT_SCHEME:
        raise MergeError(f"{model_dir}: its record names the anchor by a fingerprint of scheme "
                         f"{info.anchor_fingerprint_scheme}, which did not cover the tokenizer, so no package can "
                         "be checked against it; merge again from the anchor with packages trained by this flexolmo")
    reader, experts, shared = _merged_sources(info, family)
    joining = _verified_packages(package_paths, info.anchor_fingerprint, info.anchor_config, trust)
    clashes = sorted(set(info.expert_names) & {package.name for package in joining})
    if clashes:
        raise MergeError(f"{model_dir} already has expert(s) {', '.join(clashes)}; remove them first or rename")
    readmitted = _check_readmission(model_dir, joining, readmit)
    plan = MergePlan(out, reader, shared, [*experts, *joining], info.anchor_config, info.anchor_fingerprint, family,
                     top_k, info.path, shard_bytes, extra_metadata=_carried_records(info),
                     fingerprint_scheme=info.anchor_fingerprint_scheme)
    return _write_merged(plan, _sealer(trust, info.path, "add", joining, [], readmitted))


def remove_experts(model_dir: Path | str, names: list[str], out: Path | str,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, trust: CoordinatorTrust | None = None) -> dict:
    """An opt-out: a smaller checkpoint without the named experts (the public expert always stays).

    The model is authenticated first with `trust.trusted_keys` (else a warning says it is not): only the
    coordinator's signature binds names to slots, since anyone can recompute the unkeyed slot digests. Names
    are then resolved through the model's record and each removed slot is checked against its recorded
    digest, so a record with swapped names cannot make an opt-out remove another member's expert. The
    top-k is lowered to the number of experts left when it exceeds it. The log records the removed experts by
    name and package digest only."""
    out = Path(out)
    trust = trust or CoordinatorTrust()
    _refuse_existing(out, model=model_dir)
    authenticate_merged_model(model_dir, trust.trusted_keys, "remove")
    info = read_merged_info(model_dir)
    family = anchor_family(info.anchor_config, model_dir)
    unknown = sorted(set(names) - set(info.expert_names))
    if unknown:
        raise MergeError(f"{model_dir} has no expert(s) {', '.join(unknown)} "
                         f"(it has: {', '.join(info.expert_names)})")
    if PUBLIC_EXPERT in names:
        raise MergeError(f"the '{PUBLIC_EXPERT}' expert is the anchor's own FFN and cannot be removed")
    check_unchanged(info.path)
    verify_slots(info.path, info.metadata, names, family.ffn_projections)
    reader, experts, shared = _merged_sources(info, family)
    kept = [expert for expert in experts if expert.name not in names]
    removed = [{"name": e.name, "package_sha256": e.entry.get("package_sha256")} for e in experts if e.name in names]
    top_k = min(info.metadata["top_k"], len(kept))
    if top_k < info.metadata["top_k"]:
        console.print(f"[yellow]note:[/] top-k lowered from {info.metadata['top_k']} to {top_k}: only {len(kept)} "
                      "expert(s) are left")
    plan = MergePlan(out, reader, shared, kept, info.anchor_config, info.anchor_fingerprint, family, top_k,
                     info.path, shard_bytes, extra_metadata=_carried_records(info),
                     fingerprint_scheme=info.anchor_fingerprint_scheme)
    return _write_merged(plan, _sealer(trust, info.path, "remove", [], removed))


def _carried_records(info: MergedModelInfo) -> dict:
    """Records of earlier steps that still describe the tensors kept (the tuned router rows stay tuned)."""
    return {key: info.metadata[key] for key in (ROUTER_TUNING_KEY,) if key in info.metadata}


def replace_router_rows(model_dir: Path | str, rows: list[torch.Tensor], out: Path | str, record: dict,
                        shard_bytes: int = DEFAULT_SHARD_BYTES, trust: CoordinatorTrust | None = None) -> dict:
    """A copy of a merged checkpoint with new router rows (one (E, H) matrix per layer, router tuning), every
    other tensor bit for bit; `record` says what produced the rows and is appended to the tuning history.

    The source's slots are checked against their digests first; the copy records new slot digests (a slot's
    digest covers its router row), logs the operation and, with `trust.sign_key`, is signed."""
    out = Path(out)
    trust = trust or CoordinatorTrust()
    _refuse_existing(out, model=model_dir)
    info = read_merged_info(model_dir)
    family = anchor_family(info.anchor_config, model_dir)
    check_unchanged(info.path)
    verify_slots(info.path, info.metadata, info.expert_names, family.ffn_projections)
    reader, experts, shared = _merged_sources(info, family)
    expected = (len(experts), info.anchor_config["hidden_size"])
    if len(rows) != info.anchor_config["num_hidden_layers"] or any(tuple(r.shape) != expected for r in rows):
        raise MergeError(f"replacement router rows do not fit {model_dir}: need "
                         f"{info.anchor_config['num_hidden_layers']} matrices of shape {expected}")
    history = [*info.metadata.get(ROUTER_TUNING_KEY, []), record]
    plan = MergePlan(out, reader, shared, experts, info.anchor_config, info.anchor_fingerprint, family,
                     info.metadata["top_k"], info.path, shard_bytes, router_rows=rows,
                     extra_metadata={**_carried_records(info), ROUTER_TUNING_KEY: history},
                     fingerprint_scheme=info.anchor_fingerprint_scheme)
    return _write_merged(plan, _sealer(trust, info.path, "tune-router", [], []))

