"""Streaming tensor I/O in two small pieces: a lazy reader and a sharding writer.

The reader memory-maps safetensors files and hands out one tensor at a time, so reading a checkpoint of any size
costs one tensor of memory. The writer buffers tensors until a shard is full, writes it, and writes the index
last; it is used inside `atomic_directory`, so a checkpoint appears only when every shard and the index exist.
Peak memory of a copy through them is one shard plus one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from flexolmo.errors import AnchorError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3


class LazyReader:
    """Read tensors by name from a model directory (single file or sharded with an index), one at a time."""

    def __init__(self, path: Path | str):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise AnchorError(f"{index}: corrupt index ({error})") from None
        elif (self.path / SINGLE_FILE).exists():
            weight_map = None
        else:
            raise AnchorError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors are read")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {}
        self._location: dict[str, str] = {}
        for file in files:
            try:
                handle = safe_open(self.path / file, framework="pt")
            except (SafetensorError, OSError, FileNotFoundError) as error:
                raise AnchorError(f"{self.path / file}: missing or corrupt weights ({error})") from None
            self._handles[file] = handle
            for name in handle.keys():
                self._location[name] = file

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def get(self, name: str) -> torch.Tensor:
        if name not in self._location:
            raise AnchorError(f"{self.path}: has no tensor {name}")
        return self._handles[self._location[name]].get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self._location[name]].get_slice(name).get_shape())


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


def iter_tensors(reader: LazyReader, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, reader.get(name)
