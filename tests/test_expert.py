"""Coordinated expert training and the expert package."""

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
from safetensors.torch import load_file, save_file

from flexolmo.core.errors import PackageError
from flexolmo.model.anchor import compute_fingerprint, load_anchor
from flexolmo.model.router_init import initial_rows
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import build_owner_model, load_package_into_owner_model, owner_trainable_parameters
from flexolmo.owner.package import TENSOR_FILE, load_package
from flexolmo.training.loop import train


@pytest.fixture(scope="module")
def code_expert(tmp_path_factory, tiny_anchor, corpora) -> Path:
    out = tmp_path_factory.mktemp("experts") / "code"
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                              negative_bias=True, optim=tiny_optim(steps=20, lr=1e-2)))
    return out


def test_training_touches_only_the_owners_tensors(tiny_anchor, corpora, tmp_path):
    from flexolmo.data.tokens import load_token_stream

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["math"]], anchor.tokenizer)
    rows = initial_rows("mean_hidden", anchor, stream, 32, 8, 0)
    model = build_owner_model(anchor, rows, negative_bias=True)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainable = owner_trainable_parameters(model)
    names = {name for name, _ in trainable}
    assert names and all(".experts.1." in n or ".gate.rows.1." in n for n in names)
    assert any(n.endswith("rows.1.bias") for n in names)
    train(model, trainable, stream, tiny_optim(steps=6, lr=5e-2, checkpoint_every=6), tmp_path,
          loss_fn=__import__("flexolmo.owner.owner_model", fromlist=["owner_loss"]).owner_loss(1e-3))
    for name, param in model.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    checkpoint = tmp_path / "checkpoint"
    assert set(load_file(checkpoint / "trainable.safetensors")) == names
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == len(names)


def test_untrained_owner_model_is_exactly_the_anchor(tiny_anchor, corpora):
    from flexolmo.data.tokens import load_token_stream

    anchor = load_anchor(tiny_anchor)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        dense = anchor.model(ids).logits.clone()
        stream = load_token_stream([corpora["code"]], anchor.tokenizer)
        model = build_owner_model(anchor, initial_rows("mean_hidden", anchor, stream, 32, 8, 0), False)
        assert (model(ids).logits - dense).abs().max() <= 1e-5


def test_package_contents_and_round_trip(code_expert, tiny_anchor):
    package = load_package(code_expert, compute_fingerprint(tiny_anchor), load_anchor(tiny_anchor).config)
    manifest = package.manifest
    assert manifest["name"] == "code" and manifest["format_version"] == 2
    training = manifest["training"]
    assert training["heldout_loss_after"] < training["heldout_loss_before"]
    assert len(training["losses"]) == 20 and len(training["token_stream_commitment"]) == 64
    assert "token_stream_sha256" not in training  # the raw hash confirms a guessed dataset; the owner keeps it
    assert all(not name.startswith("model.") for name in package.tensors)  # nothing of the shared weights
    assert all(float(package.tensors[f"layers.{i}.router.bias"]) <= 0 for i in range(2))
    anchor_bytes = (tiny_anchor / "model.safetensors").stat().st_size
    assert (code_expert / TENSOR_FILE).stat().st_size < anchor_bytes
    # The round trip: a package loaded into the owner's model gives back exactly the package's tensors, and
    # the model computes something other than the anchor (the trained expert and learned bias are in use).
    from flexolmo.owner.owner_model import package_tensors

    anchor = load_anchor(tiny_anchor)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        anchor_logits = anchor.model(ids).logits.clone()
        model = load_package_into_owner_model(anchor, package.tensors)
        logits = model(ids).logits
    restored = package_tensors(model, anchor.family.ffn_projections)
    assert restored.keys() == package.tensors.keys()
    assert all(torch.equal(restored[name], package.tensors[name]) for name in restored)
    assert logits.shape == anchor_logits.shape == (2, 12, len(anchor.tokenizer))
    assert (logits - anchor_logits).abs().max() > 1e-3


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexolmo", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), **(env or {})})


def damaged_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_verify_reports_each_problem_in_one_line(code_expert, tiny_anchor, tmp_path, corpora):
    ok = run_cli("verify", str(code_expert), "--anchor", str(tiny_anchor))
    assert ok.returncode == 0, ok.stderr

    truncated = damaged_copy(code_expert, tmp_path / "truncated")
    payload = (truncated / TENSOR_FILE).read_bytes()
    (truncated / TENSOR_FILE).write_bytes(payload[: len(payload) - 100])

    modified = damaged_copy(code_expert, tmp_path / "modified")
    tensors = load_file(modified / TENSOR_FILE)
    tensors["layers.0.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, modified / TENSOR_FILE, metadata={"format": "flexolmo-expert", "name": "code"})

    future = damaged_copy(code_expert, tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))

    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain

    other_anchor = tmp_path / "other-anchor"
    pretrain(PretrainConfig(data=[corpora["public"]], out=other_anchor,
                            shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                              intermediate_size=64), optim=tiny_optim(steps=2, seed=5)))
    cases = {
        truncated: "truncated or corrupt",
        modified: "do not match the manifest checksum",
        future: "unknown package format version 99",
        tmp_path / "absent": "no such expert package",
    }
    for path, reason in cases.items():
        result = run_cli("verify", str(path), "--anchor", str(tiny_anchor))
        assert result.returncode == 1 and reason in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    other = run_cli("verify", str(code_expert), "--anchor", str(other_anchor))
    assert other.returncode == 1 and "trained on another anchor" in other.stderr
    with pytest.raises(PackageError, match="modified after training|do not match"):
        load_package(modified)


def test_inspect_shows_the_manifest(code_expert, tmp_path):
    result = run_cli("inspect", str(code_expert), "--json", "-")
    assert result.returncode == 0 and json.loads(result.stdout)["name"] == "code"
    # --json FILE means what it means on every command: a result file, kept unless --force.
    written = run_cli("inspect", str(code_expert), "--json", str(tmp_path / "manifest.json"))
    assert written.returncode == 0 and json.loads((tmp_path / "manifest.json").read_text()) == json.loads(result.stdout)
    again = run_cli("inspect", str(code_expert), "--json", str(tmp_path / "manifest.json"))
    assert again.returncode == 1 and "--force" in again.stderr
    shown = run_cli("inspect", str(code_expert), env={"COLUMNS": "200"}).stdout
    assert "held-out loss" in shown
    # The default router row reads the owner's data outside DP, and inspect says so.
    assert "mean_hidden (a statistic of the training data, not covered by DP)" in shown


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_anchor, corpora, tmp_path):
    common = ["train-expert", "--anchor", str(tiny_anchor), "--data", str(corpora["math"]), "--name", "math",
              "--steps", "40", "--seq-len", "32", "--batch-size", "8", "--checkpoint-every", "3", "--lr", "5e-3"]
    reference = run_cli(*common, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "flexolmo", *common, "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed.ckpt" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 6:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()  # no half-written package
    resumed = run_cli(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    losses = [json.loads((path / "manifest.json").read_text())["training"]["losses"]
              for path in (tmp_path / "reference", out)]
    assert len(losses[0]) == len(losses[1]) == 40
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    tensors = [load_file(path / TENSOR_FILE) for path in (tmp_path / "reference", out)]
    assert all(torch.allclose(tensors[0][k], tensors[1][k], atol=1e-5) for k in tensors[0])


def test_public_mix_is_exact_in_every_batch_and_router_rows_are_unit_norm(tiny_anchor, corpora):
    from flexolmo.model.moe import router_z_loss
    from flexolmo.owner.expert import mix_public

    anchor = load_anchor(tiny_anchor)
    config = ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=Path("unused"),
                          public_data=[corpora["public"]], public_share=0.25, optim=tiny_optim(batch_size=8))
    from flexolmo.data.tokens import load_token_stream

    owner = load_token_stream([corpora["code"]], anchor.tokenizer)
    stream, sampler = mix_public(owner, config, anchor.tokenizer)
    boundary = owner.num_sequences(32)
    for step in range(5):
        indices = sampler.indices(step, 0)
        assert len(indices) == 8 and (indices >= boundary).sum() == 2
    rows = initial_rows("mean_hidden", anchor, owner, 32, 8, 0)
    assert all(abs(float(row.norm()) - 1) < 1e-5 for row in rows)
    # Unit rows keep the router z-loss small next to the language-model loss (raw means made it dominate).
    model = build_owner_model(anchor, rows, False).train()
    ids = torch.from_numpy(owner.sequence(0, 32))[None, :-1]
    model(input_ids=ids)
    z_loss = float(router_z_loss(model).detach())
    assert z_loss == pytest.approx(hand_z_loss(model, ids), rel=1e-5) and z_loss * 1e-3 < 0.1


def hand_z_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """The router z-loss of ST-MoE (Zoph et al. 2022), as FlexOlmo's reference uses it: per layer, the mean
    over tokens of logsumexp(router logits)^2, summed over layers; logits computed here from each layer's
    input."""
    from flexolmo.model.moe import decoder_layers

    inputs = []
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
               for layer in decoder_layers(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    total = 0.0
    with torch.no_grad():
        for layer, hidden in zip(decoder_layers(model), inputs):
            rows = torch.cat([row.weight for row in layer.mlp.gate.rows])
            logits = hidden.reshape(-1, hidden.shape[-1]).float() @ rows.T.float()
            total += float((torch.logsumexp(logits, dim=-1) ** 2).mean())
    return total


def test_router_z_loss_is_the_mean_squared_logsumexp_and_enters_the_owner_loss(tiny_anchor, corpora):
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.model.moe import router_z_loss
    from flexolmo.owner.owner_model import owner_loss
    from flexolmo.training.loop import causal_lm_loss

    anchor = load_anchor(tiny_anchor)
    owner = load_token_stream([corpora["code"]], anchor.tokenizer)
    # Random rows scaled up, so logsumexp is far from 0 and 1 and a z-loss without its square differs clearly.
    rows = [row * 200 for row in initial_rows("random", anchor, owner, 32, 8, 0)]
    model = build_owner_model(anchor, rows, False).train()
    batch = torch.stack([torch.from_numpy(owner.sequence(i, 16)) for i in range(3)])
    expected = hand_z_loss(model, batch[:, :-1])
    assert expected > 5
    loss, lm_loss = owner_loss(0.01)(model, batch)
    assert float(router_z_loss(model).detach()) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        lm = causal_lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
    assert float(lm_loss) == pytest.approx(float(lm), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(lm) + 0.01 * expected, rel=1e-5)


def test_the_learning_rate_of_every_step_is_linear_warmup_then_cosine(tiny_anchor, corpora, tmp_path):
    """The rate the optimizer actually steps with, against the schedule written out here: linear warmup to
    the peak over `warmup_steps`, then a cosine from the peak toward min_lr_ratio * peak (reached at step
    `steps`)."""
    import math

    from flexolmo.data.tokens import load_token_stream
    from flexolmo.owner.owner_model import owner_loss

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    model = build_owner_model(anchor, initial_rows("random", anchor, stream, 32, 8, 0), False)
    config = tiny_optim(steps=9, warmup_steps=3, lr=4e-3, min_lr_ratio=0.25, batch_size=2, seq_len=16)
    seen = []

    def recording(optimizer):
        step = optimizer.step

        def recorded(*args, **kwargs):
            seen.append([group["lr"] for group in optimizer.param_groups])
            return step(*args, **kwargs)

        optimizer.step = recorded
        return optimizer

    train(model, owner_trainable_parameters(model), stream, config, tmp_path / "run",
          loss_fn=owner_loss(1e-3), make_optimizer=recording)
    expected = []
    for step in range(9):
        if step < 3:
            expected.append(4e-3 * (step + 1) / 3)
        else:
            progress = (step - 3) / (9 - 3)
            expected.append(4e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert [rates[0] for rates in seen] == pytest.approx(expected, rel=1e-9)
    assert all(len(set(rates)) == 1 for rates in seen)


def test_the_router_row_learns_at_its_own_multiple_of_the_rate(tiny_anchor, corpora, tmp_path):
    """`router_lr_scale`: the router row's optimizer group steps at that multiple of the schedule, the FFN's at
    the schedule; AdamW's first step moves every element by about its rate, so the row moves that many times
    as far as at scale 1, and the FFN exactly as far."""
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.owner.owner_model import owner_loss, router_lr_scales

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    rows = initial_rows("mean_hidden", anchor, stream, 16, 4, 0)
    moved, rates = {}, {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model = build_owner_model(load_anchor(tiny_anchor), rows, negative_bias=False)  # converts it in place
        trainable = owner_trainable_parameters(model)
        before = {name: param.detach().clone() for name, param in trainable}
        scales = router_lr_scales(trainable, scale)
        assert (scale == 1.0) == (not scales) and all(".gate.rows.1." in name for name in scales)

        def recording(optimizer, scale=scale):
            step = optimizer.step

            def recorded(*args, **kwargs):
                rates[scale] = sorted({group["lr"] for group in optimizer.param_groups})
                return step(*args, **kwargs)

            optimizer.step = recorded
            return optimizer

        train(model, trainable, stream, tiny_optim(steps=1, warmup_steps=1, lr=1e-3, batch_size=2, seq_len=16),
              tmp_path / f"run{scale}", loss_fn=owner_loss(1e-3), lr_scales=scales, make_optimizer=recording)
        moved[scale] = {name: float((param.detach() - before[name]).abs().max()) for name, param in trainable}
    assert rates[1.0] == [1e-3] and rates[10.0] == pytest.approx([1e-3, 1e-2])  # the groups as built
    for name, distance in moved[1.0].items():
        expected = 10.0 if ".gate.rows.1." in name else 1.0
        assert moved[10.0][name] == pytest.approx(expected * distance, rel=1e-3), name


def test_gradient_accumulation_equals_one_batch_of_all_its_micro_batches(tiny_anchor, corpora, tmp_path):
    """grad_accum 2 of batch 2 sees the same four sequences per step as grad_accum 1 of batch 4 (the data
    order is by global position), so the gradient each step takes, the losses and the trained tensors are the
    same."""
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.owner.owner_model import owner_loss

    def run(batch_size: int, grad_accum: int):
        anchor = load_anchor(tiny_anchor)
        stream = load_token_stream([corpora["code"]], anchor.tokenizer)
        model = build_owner_model(anchor, initial_rows("random", anchor, stream, 16, 8, 0), False)
        trainable = owner_trainable_parameters(model)
        gradients = []

        def recording(optimizer):
            step = optimizer.step

            def recorded(*args, **kwargs):
                gradients.append(torch.cat([param.grad.flatten() for _, param in trainable]))
                return step(*args, **kwargs)

            optimizer.step = recorded
            return optimizer

        optim = tiny_optim(steps=3, batch_size=batch_size, grad_accum=grad_accum, seq_len=16, lr=1e-2)
        result = train(model, trainable, stream, optim, tmp_path / f"accum-{grad_accum}",
                       loss_fn=owner_loss(1e-3), make_optimizer=recording)
        return result, gradients, [param.detach().clone() for _, param in trainable]

    whole, whole_grads, whole_params = run(4, 1)
    accumulated, accumulated_grads, accumulated_params = run(2, 2)
    assert accumulated.losses == pytest.approx(whole.losses, rel=1e-5)
    assert accumulated.tokens == whole.tokens == 3 * 4 * 16
    for a, b in zip(whole_grads, accumulated_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(whole_params, accumulated_params):
        assert torch.allclose(a, b, atol=1e-5)
