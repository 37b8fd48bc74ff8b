"""Data-parallel expert training under torchrun (two CPU processes, gloo): the same optimisation as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flexolmo.cli import main
from flexolmo.package import TENSOR_FILE


def expert_args(tiny_anchor, corpora, out) -> list[str]:
    return ["train-expert", "--anchor", str(tiny_anchor), "--data", str(corpora["code"]), "--name", "code",
            "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
            "--checkpoint-every", "3", "--public-data", str(corpora["public"]), "--public-share", "0.5"]


def test_two_processes_train_the_same_expert_as_one(tiny_anchor, corpora, tmp_path):
    assert main(expert_args(tiny_anchor, corpora, tmp_path / "single")) == 0
    # A cold tokenization cache: both ranks need it at once, and rank 0 alone must write it.
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "flexolmo", *expert_args(tiny_anchor, corpora, tmp_path / "ddp")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "FLEXOLMO_CACHE": str(tmp_path / "cache")})
    assert launched.returncode == 0, launched.stderr[-3000:]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("single", "ddp")]
    # Each rank saw half of every batch; the averaged gradient is the one-process gradient.
    assert manifests[1]["training"]["losses"] == pytest.approx(manifests[0]["training"]["losses"], abs=1e-4)
    single, ddp = (load_file(tmp_path / name / TENSOR_FILE) for name in ("single", "ddp"))
    assert single.keys() == ddp.keys()
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-4), name
    assert not (tmp_path / "ddp.ckpt").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_anchor, corpora, tmp_path):
    args = expert_args(tiny_anchor, corpora, tmp_path / "odd")
    args[args.index("--batch-size") + 1] = "3"
    args[args.index("--public-share") + 1] = "0.34"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "flexolmo", *args], capture_output=True, text=True, timeout=600)
    assert launched.returncode != 0 and "does not split over 2 processes" in launched.stderr
    assert not (tmp_path / "odd").exists()
