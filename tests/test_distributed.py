"""Expert training under torchrun (two CPU processes, gloo), replicated (DDP) and sharded (FSDP2): the same
optimisation as one process, exact resume after kill -9, frozen tensors untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim
from safetensors.torch import load_file

from flexolmo.cli import main
from flexolmo.owner.package import TENSOR_FILE


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


# --- FSDP2 (`--fsdp`): sharded training, the same optimisation as one process -------------------------------

FSDP_STEPS = 24


def fsdp_args(tiny_anchor, corpora, out) -> list[str]:
    return ["train-expert", "--anchor", str(tiny_anchor), "--data", str(corpora["code"]), "--name", "code",
            "--out", str(out), "--steps", str(FSDP_STEPS), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
            "--checkpoint-every", "3", "--public-data", str(corpora["public"]), "--public-share", "0.5",
            "--negative-bias"]


def torchrun(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "flexolmo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_anchor, corpora, tmp_path_factory) -> dict[str, Path]:
    """One process, and two FSDP ranks with activation checkpointing, on the same settings."""
    root = tmp_path_factory.mktemp("fsdp")
    assert main(fsdp_args(tiny_anchor, corpora, root / "single")) == 0
    launched = torchrun([*fsdp_args(tiny_anchor, corpora, root / "fsdp"), "--fsdp", "--activation-checkpointing"])
    _, stderr = launched.communicate(timeout=600)
    assert launched.returncode == 0, stderr[-3000:]
    return {"single": root / "single", "fsdp": root / "fsdp"}


def package(path: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    return json.loads((path / "manifest.json").read_text())["training"]["losses"], load_file(path / TENSOR_FILE)


def test_fsdp_trains_the_same_expert_as_one_process(fsdp_runs):
    # Tolerance: float32 on both sides; only the order of float sums differs (measured: 7e-7 on losses,
    # 3e-7 on weights), so 1e-5 leaves margin while any sharding or averaging mistake is far above it.
    (single_losses, single), (fsdp_losses, fsdp) = package(fsdp_runs["single"]), package(fsdp_runs["fsdp"])
    assert len(fsdp_losses) == FSDP_STEPS
    assert fsdp_losses == pytest.approx(single_losses, abs=1e-5)
    assert single.keys() == fsdp.keys() and any(name.endswith("router.bias") for name in fsdp)
    for name in single:
        assert fsdp[name].dtype == torch.float32 and torch.allclose(single[name], fsdp[name], atol=1e-5), name
    assert not fsdp_runs["fsdp"].with_name("fsdp.ckpt").exists()


def test_fsdp_resume_after_kill_9_of_both_ranks_equals_an_uninterrupted_run(fsdp_runs, tiny_anchor, corpora,
                                                                           tmp_path):
    import psutil

    out = tmp_path / "killed"
    process = torchrun([*fsdp_args(tiny_anchor, corpora, out), "--fsdp"])
    state = tmp_path / "killed.ckpt" / "checkpoint" / "state.json"
    deadline, ranks = time.time() + 300, []
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 6:
            # torchrun starts each rank in a session of its own: kill both ranks, then torchrun.
            ranks = psutil.Process(process.pid).children(recursive=True)
            for victim in [*ranks, psutil.Process(process.pid)]:
                victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and len(ranks) >= 2, "the run finished before it could be killed"
    psutil.wait_procs(ranks, timeout=30)
    assert not out.exists()  # no half-written package
    shards = sorted(path.name for path in state.parent.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    resumed = torchrun([*fsdp_args(tiny_anchor, corpora, out), "--fsdp", "--resume"])
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    (reference_losses, reference), (losses, tensors) = package(fsdp_runs["fsdp"]), package(out)
    assert losses == pytest.approx(reference_losses, abs=1e-6)
    assert all(torch.allclose(reference[name], tensors[name], atol=1e-6) for name in reference)


def _train_sharded(rank: int, port: int, anchor_dir: str, data: str, out: str) -> None:
    """One rank: shard the owner's model (frozen weights sharded, then replicated), train it, then gather every
    tensor, frozen ones included."""
    import torch.distributed as dist

    from flexolmo.data.tokens import load_token_stream
    from flexolmo.model.anchor import load_anchor
    from flexolmo.model.router_init import initial_rows
    from flexolmo.owner.owner_model import build_owner_model, owner_loss, owner_trainable_parameters
    from flexolmo.training.distributed import FullyShardedStrategy
    from flexolmo.training.loop import train

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for replicate_frozen in (False, True):
        anchor = load_anchor(anchor_dir)
        stream = load_token_stream([data], anchor.tokenizer)
        rows = initial_rows("mean_hidden", anchor, stream, 32, 8, 0)
        model = build_owner_model(anchor, rows, negative_bias=True)
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        strategy = FullyShardedStrategy(replicate_frozen=replicate_frozen)
        train(model, owner_trainable_parameters(model), stream, tiny_optim(steps=4, lr=5e-2, checkpoint_every=4),
              Path(out) / f"run-{replicate_frozen}-{rank}", loss_fn=owner_loss(1e-3), strategy=strategy)
        after = {name: strategy.gather(param) for name, param in model.named_parameters()}
        if rank == 0:
            torch.save({"before": before, "after": after}, Path(out) / f"replicate-{replicate_frozen}.pt")
    dist.destroy_process_group()


def test_fsdp_leaves_public_expert_public_row_and_every_frozen_tensor_bit_unchanged(tiny_anchor, corpora,
                                                                                     tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_sharded, args=(port, str(tiny_anchor), str(corpora["math"]), str(tmp_path)), nprocs=2,
             join=True)
    for replicate_frozen in (False, True):
        saved = torch.load(tmp_path / f"replicate-{replicate_frozen}.pt", weights_only=True)
        before, after = saved["before"], saved["after"]
        assert before.keys() == after.keys()
        owned = {name for name in before if ".experts.1." in name or ".gate.rows.1." in name}
        assert any(".experts.0." in name for name in before) and any(".gate.rows.0." in name for name in before)
        for name in before:
            if name in owned:
                assert not torch.equal(before[name].float(), after[name].float()), f"{name} did not train"
            else:
                assert after[name].dtype == before[name].dtype and torch.equal(before[name], after[name]), name


def test_fsdp_with_dp_sgd_is_refused_in_one_line(tiny_anchor, corpora, tmp_path, capsys):
    args = [*fsdp_args(tiny_anchor, corpora, tmp_path / "dp"), "--fsdp", "--dp-epsilon", "8"]
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == (
        "flexolmo train-expert: error: --fsdp cannot be combined with --dp-epsilon: DP-SGD (Opacus per-sample "
        "gradients) runs in one process on an unsharded model; drop --fsdp")
    assert not any(tmp_path.iterdir())
