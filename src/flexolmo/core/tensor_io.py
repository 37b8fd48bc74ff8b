"""Streaming tensor I/O in two small pieces: a lazy reader and a sharding writer.

The reader memory-maps safetensors files and hands out one tensor at a time, so reading a checkpoint of any size
costs one tensor of memory. The writer buffers tensors until a shard is full, writes it, and writes the index
last; it is used inside `atomic_directory`, so a checkpoint appears only when every shard and the index exist.
Peak memory of a copy through them is one shard plus one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexolmo.core.errors import AnchorError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# safetensors header dtype codes of the floating-point dtypes a checkpoint may hold.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class LazyReader:
    """Read tensors by name from a model directory (single file or sharded with an index), one at a time.

    Each read opens its file anew: safetensors returns tensors backed by a memory map, and pages read through a
    map that stays open keep counting as resident memory. Opened per read, a tensor's pages are released with
    the tensor, so reading a whole checkpoint costs one tensor of memory (measured: benchmarks/docs/merge.md).
    """

    def __init__(self, path: Path | str, files: list[str] | None = None):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if files is None:
            files = self._weight_files()
        self._location: dict[str, Path] = {}
        self._shapes: dict[str, list[int]] = {}
        self._dtypes: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(self.path / file, framework="pt") as handle:
                    for name in handle.keys():
                        self._location[name] = self.path / file
                        header = handle.get_slice(name)
                        self._shapes[name] = list(header.get_shape())
                        self._dtypes[name] = header.get_dtype()
            except (SafetensorError, OSError) as error:
                raise AnchorError(f"{self.path / file}: missing or corrupt weights ({error})") from None

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                return sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as error:
                raise AnchorError(f"{index}: corrupt index ({error})") from None
        if (self.path / SINGLE_FILE).exists():
            return [SINGLE_FILE]
        raise AnchorError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors are read")

    def names(self) -> list[str]:
        return list(self._location)

    def files(self) -> list[Path]:
        """The safetensors files the tensors come from."""
        return sorted(set(self._location.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._location:
            raise AnchorError(f"{self.path}: has no tensor {name}")
        with safe_open(self._location[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype, read from the file header (no tensor is read)."""
        stored = self._dtypes[name]
        if stored not in _SAFETENSORS_DTYPES:
            raise AnchorError(f"{self._location[name]}: tensor {name} is stored as {stored}, which flexolmo does not "
                              "read; convert the checkpoint to float32, float16 or bfloat16")
        return getattr(torch, _SAFETENSORS_DTYPES[stored])


class ShardedWriter:
    """Write tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `shard_bytes`, index last.

    A checkpoint that fits in one shard is written as `model.safetensors` with no index, like transformers.
    """

    def __init__(self, directory: Path, shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None):
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        number = len(self._shards) + 1
        save_file(self._pending, str(self.directory / f".shard-{number:05d}.safetensors"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give shards their final names and write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            (self.directory / ".shard-00001.safetensors").rename(self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for number, names in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.directory / f".shard-{number:05d}.safetensors").rename(self.directory / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files

