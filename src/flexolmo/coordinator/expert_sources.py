"""Where one expert slot's tensors come from in a merge: the anchor's own FFN, an owner's package, or a slot of
an existing merged model. Each source is read lazily, one tensor at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import PACKAGE_BIAS, PACKAGE_FFN, PACKAGE_ROUTER, parse
from flexolmo.model.anchor import (
    AnchorFamily,
)
from flexolmo.model.merged_format import (
    PUBLIC_EXPERT,
)
from flexolmo.owner.package import TENSOR_FILE, ExpertPackage
from flexolmo.trust.record import expert_entry


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
    family: AnchorFamily
    name: str = PUBLIC_EXPERT

    def ffn(self, layer: int, proj: str) -> torch.Tensor:
        return self.reader.get(self.family.anchor_ffn.format(layer=layer, proj=proj))

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
        entry = expert_entry(self.package)
        layers = sum(1 for name in self.package.manifest["tensors"] if parse(PACKAGE_ROUTER, name) is not None)
        if PACKAGE_BIAS.format(layer=0) in self.package.manifest["tensors"]:
            # No merged format has a router bias: kept here for flexolmo's runtime (`load_model(router_bias=True)`).
            entry["router_bias"] = [float(self._reader.get(PACKAGE_BIAS.format(layer=layer)))
                                    for layer in range(layers)]
        return entry


@dataclass
class MergedExpert:
    """An expert already inside a merged checkpoint (kept by add or remove)."""

    reader: LazyReader
    index: int
    entry: dict
    family: AnchorFamily

    @property
    def name(self) -> str:
        return self.entry["name"]

    def ffn(self, layer: int, proj: str) -> torch.Tensor:
        return self.reader.get(self.family.merged_expert.format(layer=layer, expert=self.index, proj=proj))

    def router_row(self, layer: int) -> torch.Tensor:
        return self.reader.get(self.family.merged_router.format(layer=layer))[self.index]

    def record(self) -> dict:
        return self.entry
