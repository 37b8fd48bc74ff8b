"""`inspect` describes every artefact flexolmo makes; `verify` says what a path is when it is not a package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_optim

from flexolmo.cli import main
from flexolmo.coordinator.inspection import ANCHOR, DENSE, MERGED, PACKAGE, describe
from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import FlexOlmoError
from flexolmo.model.anchor import compute_fingerprint
from flexolmo.owner.expert import ExpertConfig, train_expert


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, tiny_anchor, corpora) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect")
    package = root / "code.expert"
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=package,
                              optim=tiny_optim(steps=2)))
    merge(tiny_anchor, [package], root / "merged", top_k=1)
    return {"package": package, "merged": root / "merged", "anchor": tiny_anchor}


def fields(description) -> dict[str, str]:
    return dict(description.fields)


def test_an_anchor_is_described_with_its_fingerprint_rows_dtype_and_size(artefacts):
    from safetensors.torch import load_file

    described = describe(artefacts["anchor"])
    found = fields(described)
    assert described.kind == ANCHOR and found["fingerprint"] == compute_fingerprint(artefacts["anchor"])
    assert found["public router rows"] == "present (2 layers)" and found["dtype"] == "float32"
    total = sum(tensor.numel() for tensor in load_file(artefacts["anchor"] / "model.safetensors").values())
    assert found["parameters"] == f"{total:,}" and found["made by"] == "flexolmo pretrain"


def test_a_dense_model_without_router_rows_says_how_to_make_it_an_anchor(artefacts, tmp_path):
    import shutil

    from flexolmo.model.anchor import PUBLIC_ROUTER_FILE

    shutil.copytree(artefacts["anchor"], tmp_path / "dense")
    (tmp_path / "dense" / PUBLIC_ROUTER_FILE).unlink()
    described = describe(tmp_path / "dense")
    assert described.kind == DENSE and "init-router" in fields(described)["public router rows"]


def test_a_merged_model_lists_its_experts_and_the_parameters_a_token_uses(artefacts):
    described = describe(artefacts["merged"])
    found = fields(described)
    assert described.kind == MERGED and found["experts"] == "2: public, code" and found["top-k"] == "1"
    assert found["anchor fingerprint"] == compute_fingerprint(artefacts["anchor"])
    assert [row[1] for row in described.tables[0].rows] == ["public", "code"]
    total, used = (int(number.replace(",", "")) for number in re.findall(r"[\d,]+", found["parameters"]))
    per_expert = 2 * 3 * 32 * 64  # 2 layers, 3 projections of hidden 32 x FFN 64
    assert total - used == per_expert  # top-1 of 2: one expert's FFNs idle per token


def test_a_package_is_described_from_its_verified_manifest(artefacts, capsys):
    described = describe(artefacts["package"])
    assert described.kind == PACKAGE and fields(described)["name"] == "code"
    assert main(["inspect", str(artefacts["merged"])]) == 0
    out = capsys.readouterr().out
    assert "merged model" in out and "public, code" in out


def test_verify_on_a_model_says_what_it_is_and_what_to_run(artefacts, capsys):
    assert main(["verify", str(artefacts["anchor"]), "--anchor", str(artefacts["anchor"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an anchor, not an expert package" in err[0]
    assert f"flexolmo verify PACKAGE --anchor {artefacts['anchor']}" in err[0]
    # A merged model is checked against its own record and merge log (`flexolmo.trust`), not against an anchor.
    assert main(["verify", str(artefacts["merged"])]) == 0
    assert "holds the 2 experts its record names" in capsys.readouterr().out


def test_something_else_is_refused_in_one_line(tmp_path):
    with pytest.raises(FlexOlmoError, match="no config.json"):
        describe(tmp_path)
