"""DP-SGD expert training: exact per-sample gradients, the privacy budget, the router row, exact resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_optim

from flexolmo.anchor import load_anchor
from flexolmo.data import load_token_stream
from flexolmo.errors import FlexOlmoError, PackageError
from flexolmo.expert import (
    ExpertConfig,
    build_owner_model,
    owner_loss,
    owner_trainable_parameters,
    train_expert,
)
from flexolmo.package import load_package
from flexolmo.privacy import DPConfig, prepare_private_training
from flexolmo.router_init import initial_rows
from flexolmo.training import train


def owner_model(tiny_anchor, corpora):
    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    model = build_owner_model(anchor, initial_rows("random", anchor, stream, 32, 4, 0), negative_bias=False)
    # Make the two experts differ, so that the router row's gradient is not zero.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts.1." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.train(), owner_trainable_parameters(model), stream


def test_opacus_per_sample_gradients_are_exact(tiny_anchor, corpora):
    model, trainable, stream = owner_model(tiny_anchor, corpora)
    batch = torch.stack([torch.from_numpy(stream.sequence(i, 16)) for i in range(3)])
    private = prepare_private_training(model, DPConfig(epsilon=8, delta=1e-6), stream.num_sequences(16), 2, 10, 1, 0)
    loss_fn = owner_loss(0.0)
    loss, _ = loss_fn(private.model, batch)
    loss.backward()
    per_sample = {name: param.grad_sample.clone() for name, param in trainable}
    for param in model.parameters():
        param.grad = None
    private.detach()
    for i in range(3):
        model.zero_grad()
        single, _ = loss_fn(model, batch[i : i + 1])
        single.backward()
        for name, param in trainable:
            assert torch.allclose(per_sample[name][i], param.grad, atol=1e-6, rtol=1e-4), name


def test_dp_expert_spends_its_budget_and_keeps_the_anchor_frozen(tiny_anchor, corpora, tmp_path):
    out = tmp_path / "dp-code"
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                                         dp=DPConfig(epsilon=4.0, delta=1e-4), optim=tiny_optim(steps=12)))
    dp = manifest["privacy"]["dp"]
    assert dp["steps"] == 12 and 3.5 < dp["epsilon"] <= 4.0 + 1e-6 and dp["noise_multiplier"] > 0
    assert manifest["privacy"]["router_init"] == "public" and not manifest["privacy"]["router_row_from_private_data"]
    package = load_package(out)
    anchor = load_anchor(tiny_anchor)
    # The package holds only owner tensors, and they moved away from the anchor's FFN.
    up = package.tensors["layers.0.up_proj.weight"]
    assert not torch.equal(up, anchor.model.model.layers[0].mlp.up_proj.weight)


def test_dp_refuses_a_router_row_computed_from_private_data(tiny_anchor, corpora, tmp_path):
    with pytest.raises(PackageError, match="outside the DP mechanism"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="x", out=tmp_path / "x",
                                  router_init="mean_hidden", dp=DPConfig(epsilon=4.0), optim=tiny_optim(steps=2)))
    with pytest.raises(FlexOlmoError, match="cannot reach epsilon"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="x", out=tmp_path / "x",
                                  dp=DPConfig(epsilon=1e-4, delta=1e-4), optim=tiny_optim(steps=2000)))


class Interrupt:
    """A hook that stops training after a given step, as a crash would."""

    def __init__(self, at: int):
        self.at = at

    def after_optimizer_step(self, step: int) -> None:
        if step + 1 == self.at:
            raise KeyboardInterrupt


def test_dp_training_resumes_exactly(tiny_anchor, corpora, tmp_path):
    def run(run_dir, interrupt_at=None, resume=False):
        model, trainable, stream = owner_model(tiny_anchor, corpora)
        optim = tiny_optim(steps=8, checkpoint_every=2)
        private = prepare_private_training(model, DPConfig(epsilon=8, delta=1e-4), stream.num_sequences(32),
                                           optim.batch_size, optim.steps, 1, optim.seed)
        hooks = [private.accountant] + ([Interrupt(interrupt_at)] if interrupt_at else [])
        result = train(private.model, trainable, stream, optim, run_dir, loss_fn=owner_loss(1e-3), hooks=hooks,
                       resume=resume, make_optimizer=private.make_optimizer, sampler=private.sampler,
                       clip_grad_norm=False)
        return result, private, trainable

    reference, reference_private, reference_params = run(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "interrupted", interrupt_at=5)
    resumed, resumed_private, resumed_params = run(tmp_path / "interrupted", resume=True)
    assert resumed.resumed_from == 4
    assert resumed.losses == pytest.approx(reference.losses, abs=1e-6)
    assert resumed_private.accountant.epsilon() == pytest.approx(reference_private.accountant.epsilon())
    for (name, a), (_, b) in zip(reference_params, resumed_params):
        assert torch.allclose(a, b, atol=1e-6), name


def test_dp_mixes_public_text_without_changing_the_privacy_accounting(tiny_anchor, corpora, tmp_path):
    out = tmp_path / "dp-mixed"
    optim = tiny_optim(steps=6, batch_size=8)
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                                         public_data=[corpora["public"]], public_share=0.25,
                                         dp=DPConfig(epsilon=4.0, delta=1e-4), optim=optim))
    dp = manifest["privacy"]["dp"]
    tokenizer = load_anchor(tiny_anchor).tokenizer
    owner = load_token_stream([corpora["code"]], tokenizer)
    owner_sequences = owner.num_sequences(optim.seq_len)
    # Two of the eight sequences are public: only the six private ones set the sampling rate.
    assert dp["sample_rate"] == pytest.approx(6 / owner_sequences)
    assert 3.5 < dp["epsilon"] <= 4.0 + 1e-6

    from flexolmo.expert import mix_public
    from flexolmo.training import MixedBatches

    _, mixed = mix_public(owner, ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code",
                                                   out=out, public_data=[corpora["public"]], public_share=0.25,
                                                   optim=optim), tokenizer)
    model, _, _ = owner_model(tiny_anchor, corpora)
    public = MixedBatches(optim, mixed.ranges[1:], mixed.counts[1:])
    private = prepare_private_training(model, DPConfig(epsilon=4.0, delta=1e-4), owner_sequences, 8, 6, 1, 0,
                                       public)
    for step in range(4):
        indices = private.sampler.indices(step, 0)
        assert (indices >= owner_sequences).sum() == 2  # exactly the public draw
        assert (indices < owner_sequences).sum() == len(indices) - 2  # Poisson: any size


def test_dp_router_row_is_a_noisy_mean_direction_charged_to_the_budget(tiny_anchor, corpora, tmp_path):
    from flexolmo.privacy import calibrate_noise
    from flexolmo.router_init import dp_mean_direction_rows, mean_direction_rows

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    exact = mean_direction_rows(anchor.model, stream, 32, 10_000)
    quiet, rate = dp_mean_direction_rows(anchor.model, stream, 32, 10_000, noise_multiplier=1e-6, seed=0)
    noisy, _ = dp_mean_direction_rows(anchor.model, stream, 32, 10_000, noise_multiplier=1e3, seed=0)
    assert rate == 1.0
    cosine = [float(a @ b) for a, b in zip(exact, quiet)]
    assert all(abs(float(row.norm()) - 1) < 1e-5 for row in quiet) and min(cosine) > 0.9
    # Noise far above the sensitivity leaves no trace of the data.
    assert max(abs(float(a @ b)) for a, b in zip(exact, noisy)) < 0.5

    out = tmp_path / "dp-row"
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                                         router_init="dp_mean_hidden", router_init_sequences=10_000,
                                         dp=DPConfig(epsilon=8.0, delta=1e-4, router_noise_multiplier=1.0),
                                         optim=tiny_optim(steps=6)))
    dp = manifest["privacy"]["dp"]
    (release,) = dp["prior_releases"]
    assert release == [1.0, 1.0, 1]  # every sequence, noise multiplier 1: a large share of the budget
    assert 7.9 < dp["epsilon"] <= 8.0 + 1e-6
    # The training noise pays for the router release: more of it than training alone would need.
    assert dp["noise_multiplier"] > calibrate_noise(8.0, 1e-4, dp["sample_rate"], 6)
    assert manifest["privacy"]["router_init"] == "dp_mean_hidden"
    assert not manifest["privacy"]["router_row_from_private_data"]
    with pytest.raises(PackageError, match="needs --dp-epsilon"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="x", out=tmp_path / "x",
                                  router_init="dp_mean_hidden", optim=tiny_optim(steps=2)))
