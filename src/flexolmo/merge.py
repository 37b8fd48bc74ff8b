"""The coordinator's merge: anchor + expert packages -> one transformers/vLLM `flex_olmo` checkpoint.

Merge, add (a late joiner) and remove (an opt-out) are one operation: choose a base checkpoint for the shared
tensors and an ordered list of expert sources, then stream them into a new directory. Experts are ordered
`[public, e_1, ..., e_n]`; layer L's router is the sources' rows stacked; every other tensor is copied from the
base bit for bit. Tensors are read one at a time from memory-mapped files and written in size-bounded shards,
so peak memory is one shard plus one tensor, whatever the model's size. Every input is verified before anything
is written, and the output directory appears only once it is complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flexolmo.anchor import PUBLIC_ROUTER_FILE, AnchorFamily, anchor_family, compute_fingerprint, read_config
from flexolmo.errors import MergeError
from flexolmo.fileio import atomic_directory, atomic_write_json
from flexolmo.package import TENSOR_FILE, ExpertPackage, load_package
from flexolmo.progress import console, progress_bar
from flexolmo.provenance import software_versions, utc_now
from flexolmo.public_sample import PUBLIC_SAMPLE_FILE
from flexolmo.router_init import load_public_rows
from flexolmo.tensor_io import DEFAULT_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, LazyReader, ShardedWriter
from flexolmo.weights import ANCHOR_FFN, MERGED_EXPERT, MERGED_ROUTER, PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER, parse

MERGED_METADATA_FILE = "flexolmo_experts.json"
MERGED_FORMAT = "flexolmo-merged"
# Metadata key: the history of router tunings of a checkpoint (`router_tuning.tune_router`).
ROUTER_TUNING_KEY = "router_tuning"
PUBLIC_EXPERT = "public"
# Written by flexolmo or transformers beside the weights; everything else in a model directory (tokenizer
# files, generation config) is copied into the merged checkpoint as it is.
_NOT_COPIED = {"config.json", SINGLE_FILE, INDEX_FILE, MERGED_METADATA_FILE, PUBLIC_ROUTER_FILE,
               "flexolmo_pretrain.json", PUBLIC_SAMPLE_FILE}
# Fields of a flex_olmo config that a dense anchor config does not have.
_MOE_CONFIG_FIELDS = ("num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
                      "router_aux_loss_coef")


class ExpertSource(Protocol):
    """Where one expert's tensors come from."""

    name: str

    def ffn(self, layer: int, proj: str) -> torch.Tensor: ...

    def router_row(self, layer: int) -> torch.Tensor: ...

    def record(self) -> dict: ...


@dataclass
class AnchorExpert:
    """Expert 0: the anchor's own FFN and the coordinator's public router row."""

    reader: LazyReader
    rows: list[torch.Tensor]
    name: str = PUBLIC_EXPERT

    def ffn(self, layer: int, proj: str) -> torch.Tensor:
        return self.reader.get(ANCHOR_FFN.format(layer=layer, proj=proj))

    def router_row(self, layer: int) -> torch.Tensor:
        return self.rows[layer]

    def record(self) -> dict:
        return {"name": self.name, "source": "anchor"}


class PackageExpert:
    """An owner's expert, read lazily from its (already verified) package."""

    def __init__(self, package: ExpertPackage):
        self.package = package
        self.name = package.name
        self._reader = LazyReader(package.path, files=[TENSOR_FILE])

    def ffn(self, layer: int, proj: str) -> torch.Tensor:
        return self._reader.get(PACKAGE_FFN.format(layer=layer, proj=proj))

    def router_row(self, layer: int) -> torch.Tensor:
        return self._reader.get(PACKAGE_ROUTER.format(layer=layer))[0]

    def record(self) -> dict:
        entry = {"name": self.name, "source": "package", "manifest": self.package.manifest}
        layers = sum(1 for name in self.package.manifest["tensors"] if parse(PACKAGE_ROUTER, name) is not None)
        if PACKAGE_BIAS.format(layer=0) in self.package.manifest["tensors"]:
            # flex_olmo has no router bias: kept here for flexolmo's runtime (`load_model(router_bias=True)`) only.
            entry["router_bias"] = [float(self._reader.get(PACKAGE_BIAS.format(layer=layer)))
                                    for layer in range(layers)]
        return entry


@dataclass
class MergedExpert:
    """An expert already inside a merged checkpoint (kept by add or remove)."""

    reader: LazyReader
    index: int
    entry: dict

    @property
    def name(self) -> str:
        return self.entry["name"]

    def ffn(self, layer: int, proj: str) -> torch.Tensor:
        return self.reader.get(MERGED_EXPERT.format(layer=layer, expert=self.index, proj=proj))

    def router_row(self, layer: int) -> torch.Tensor:
        return self.reader.get(MERGED_ROUTER.format(layer=layer))[self.index]

    def record(self) -> dict:
        return self.entry


@dataclass
class MergedModelInfo:
    """What a merged checkpoint says about itself: its experts, the anchor they share, its top-k."""

    path: Path
    config: dict
    metadata: dict

    @property
    def expert_names(self) -> list[str]:
        return [entry["name"] for entry in self.metadata["experts"]]

    @property
    def anchor_config(self) -> dict:
        return self.metadata["anchor"]["config"]

    @property
    def anchor_fingerprint(self) -> str:
        return self.metadata["anchor"]["fingerprint"]


def read_merged_info(path: Path | str) -> MergedModelInfo:
    """Config and expert metadata of a checkpoint written by `merge`, with one-line errors otherwise."""
    path = Path(path)
    config = read_config(path)
    metadata_file = path / MERGED_METADATA_FILE
    if not metadata_file.exists():
        raise MergeError(f"{path}: not a model merged by flexolmo (no {MERGED_METADATA_FILE})")
    try:
        metadata = json.loads(metadata_file.read_text())
    except json.JSONDecodeError as error:
        raise MergeError(f"{metadata_file}: corrupt ({error})") from None
    if metadata.get("format") != MERGED_FORMAT or len(metadata.get("experts", [])) != config.get("num_experts"):
        raise MergeError(f"{path}: {MERGED_METADATA_FILE} does not match config.json; the checkpoint was altered")
    return MergedModelInfo(path, config, metadata)


def merged_config(anchor_config: dict, family: AnchorFamily, num_experts: int, top_k: int) -> dict:
    """The anchor's config with the MoE fields set; every architecture field is copied, never defaulted."""
    config = {key: value for key, value in anchor_config.items()
              if key not in ("architectures", "model_type", "transformers_version", "_name_or_path")}
    config.update(
        model_type=family.moe_model_type,
        architectures=[family.moe_architecture],
        num_experts=num_experts,
        num_experts_per_tok=min(top_k, num_experts),
        norm_topk_prob=False,
        output_router_logits=False,
    )
    rope = config.get("rope_parameters") or {}
    rope_theta = config.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is not None:
        config["rope_theta"] = rope_theta  # vLLM reads it top-level; transformers 5 keeps it in rope_parameters
    return config


def _check_names(experts: list[ExpertSource]) -> None:
    seen: set[str] = set()
    for expert in experts:
        if expert.name in seen:
            raise MergeError(f"two experts are named '{expert.name}'; expert names must be unique")
        seen.add(expert.name)


def _write_merged(
    out: Path,
    base: LazyReader,
    shared_names: list[str],
    experts: list[ExpertSource],
    anchor_config: dict,
    anchor_fingerprint: str,
    family: AnchorFamily,
    top_k: int,
    files_from: Path,
    shard_bytes: int,
    router_rows: list[torch.Tensor] | None = None,
    extra_metadata: dict | None = None,
) -> dict:
    """Write the merged checkpoint. `router_rows` (one (E, H) matrix per layer) replaces the experts' own rows
    (router tuning); `extra_metadata` adds keys to the metadata (records of later steps such as tuning)."""
    _check_names(experts)
    layers = anchor_config["num_hidden_layers"]
    dtype = base.get(shared_names[0]).dtype
    records = [expert.record() for expert in experts]
    dropped_bias = [record["name"] for record in records if "router_bias" in record]
    for name in dropped_bias:
        console.print(f"[yellow]note:[/] expert '{name}' learned a router bias; the flex_olmo format has no "
                      f"router bias, so transformers and vLLM run without it (kept in {MERGED_METADATA_FILE} "
                      "for flexolmo's runtime only)")
    metadata = {
        "format": MERGED_FORMAT,
        "format_version": 1,
        "anchor": {"fingerprint": anchor_fingerprint, "config": anchor_config},
        "top_k": top_k,
        "experts": records,
        "router_bias_dropped": dropped_bias,
        **(extra_metadata or {}),
        "created": utc_now(),
        "versions": software_versions(),
    }
    with atomic_directory(out) as staging:
        writer = ShardedWriter(staging, shard_bytes)
        with progress_bar("merging", total=len(shared_names) + layers, unit="tensors/layers") as advance:
            for name in shared_names:
                writer.add(name, base.get(name))
                advance()
            for layer in range(layers):
                for index, expert in enumerate(experts):
                    for proj in family.ffn_projections:
                        writer.add(MERGED_EXPERT.format(layer=layer, expert=index, proj=proj),
                                   expert.ffn(layer, proj).to(dtype))
                if router_rows is None:
                    rows = torch.stack([expert.router_row(layer).to(dtype) for expert in experts])
                else:
                    rows = router_rows[layer].to(dtype)
                writer.add(MERGED_ROUTER.format(layer=layer), rows)
                advance()
            writer.finish()
        atomic_write_json(staging / "config.json", merged_config(anchor_config, family, len(experts), top_k))
        atomic_write_json(staging / MERGED_METADATA_FILE, metadata)
        for item in sorted(files_from.iterdir()):
            if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(".safetensors"):
                shutil.copy2(item, staging / item.name)
    return metadata


def _verified_packages(paths: list[Path], fingerprint: str, anchor_config: dict) -> list[PackageExpert]:
    packages = []
    for path in paths:
        package = load_package(path, fingerprint, anchor_config, with_tensors=False)
        if package.name == PUBLIC_EXPERT:
            raise MergeError(f"{path}: the name '{PUBLIC_EXPERT}' is reserved for the anchor's expert")
        packages.append(PackageExpert(package))
    return packages


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise MergeError(f"{out} already exists: choose another --out or remove it")


def merge(anchor_dir: Path | str, package_paths: list[Path], out: Path | str, top_k: int,
          shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Merge the anchor and `package_paths` into a flex_olmo checkpoint at `out`; returns its metadata."""
    anchor_dir, out = Path(anchor_dir), Path(out)
    _refuse_existing(out)
    if top_k < 1:
        raise MergeError("--top-k must be at least 1")
    anchor_config = read_config(anchor_dir)
    family = anchor_family(anchor_config, anchor_dir)
    fingerprint = compute_fingerprint(anchor_dir)
    reader = LazyReader(anchor_dir)
    public = AnchorExpert(reader, load_public_rows(anchor_dir, anchor_config["num_hidden_layers"]))
    experts = [public, *_verified_packages(package_paths, fingerprint, anchor_config)]
    shared = [name for name in reader.names() if parse(ANCHOR_FFN, name) is None]
    return _write_merged(out, reader, shared, experts, anchor_config, fingerprint, family, top_k, anchor_dir,
                         shard_bytes)


def _merged_sources(info: MergedModelInfo) -> tuple[LazyReader, list[MergedExpert], list[str]]:
    reader = LazyReader(info.path)
    experts = [MergedExpert(reader, index, entry) for index, entry in enumerate(info.metadata["experts"])]
    shared = [name for name in reader.names()
              if parse(MERGED_EXPERT, name) is None and parse(MERGED_ROUTER, name) is None]
    return reader, experts, shared


def add_experts(model_dir: Path | str, package_paths: list[Path], out: Path | str, top_k: int | None = None,
                shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """A late joiner: the merged model plus `package_paths`, verified against the model's own anchor."""
    out = Path(out)
    _refuse_existing(out)
    info = read_merged_info(model_dir)
    family = anchor_family(info.anchor_config, model_dir)
    reader, experts, shared = _merged_sources(info)
    joining = _verified_packages(package_paths, info.anchor_fingerprint, info.anchor_config)
    clashes = sorted(set(info.expert_names) & {package.name for package in joining})
    if clashes:
        raise MergeError(f"{model_dir} already has expert(s) {', '.join(clashes)}; remove them first or rename")
    return _write_merged(out, reader, shared, [*experts, *joining], info.anchor_config, info.anchor_fingerprint,
                         family, top_k or info.metadata["top_k"], info.path, shard_bytes,
                         extra_metadata=_carried_records(info))


def remove_experts(model_dir: Path | str, names: list[str], out: Path | str,
                   shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """An opt-out: a smaller checkpoint without the named experts (the public expert always stays)."""
    out = Path(out)
    _refuse_existing(out)
    info = read_merged_info(model_dir)
    family = anchor_family(info.anchor_config, model_dir)
    unknown = sorted(set(names) - set(info.expert_names))
    if unknown:
        raise MergeError(f"{model_dir} has no expert(s) {', '.join(unknown)} "
                         f"(it has: {', '.join(info.expert_names)})")
    if PUBLIC_EXPERT in names:
        raise MergeError(f"the '{PUBLIC_EXPERT}' expert is the anchor's own FFN and cannot be removed")
    reader, experts, shared = _merged_sources(info)
    kept = [expert for expert in experts if expert.name not in names]
    return _write_merged(out, reader, shared, kept, info.anchor_config, info.anchor_fingerprint, family,
                         info.metadata["top_k"], info.path, shard_bytes, extra_metadata=_carried_records(info))


def _carried_records(info: MergedModelInfo) -> dict:
    """Records of earlier steps that still describe the tensors kept (the tuned router rows stay tuned)."""
    return {key: info.metadata[key] for key in (ROUTER_TUNING_KEY,) if key in info.metadata}


def replace_router_rows(model_dir: Path | str, rows: list[torch.Tensor], out: Path | str, record: dict,
                        shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """A copy of a merged checkpoint with new router rows (one (E, H) matrix per layer, router tuning), every
    other tensor bit for bit; `record` says what produced the rows and is appended to the tuning history."""
    out = Path(out)
    _refuse_existing(out)
    info = read_merged_info(model_dir)
    family = anchor_family(info.anchor_config, model_dir)
    reader, experts, shared = _merged_sources(info)
    expected = (len(experts), info.anchor_config["hidden_size"])
    if len(rows) != info.anchor_config["num_hidden_layers"] or any(tuple(r.shape) != expected for r in rows):
        raise MergeError(f"replacement router rows do not fit {model_dir}: need "
                         f"{info.anchor_config['num_hidden_layers']} matrices of shape {expected}")
    history = [*info.metadata.get(ROUTER_TUNING_KEY, []), record]
    return _write_merged(out, reader, shared, experts, info.anchor_config, info.anchor_fingerprint, family,
                         info.metadata["top_k"], info.path, shard_bytes, router_rows=rows,
                         extra_metadata={**_carried_records(info), ROUTER_TUNING_KEY: history})

