"""DP-SGD expert training: exact per-sample gradients, the privacy budget, the router row, exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_optim

from flexolmo.core.errors import FlexOlmoError, PackageError
from flexolmo.data.tokens import load_token_stream
from flexolmo.model.anchor import load_anchor
from flexolmo.model.router_init import initial_rows
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.owner_model import build_owner_model, owner_loss, owner_trainable_parameters
from flexolmo.owner.package import load_package
from flexolmo.owner.privacy import DPConfig, prepare_private_training
from flexolmo.training.loop import train


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


def rdp_epsilon(releases, delta: float) -> float:
    """Epsilon of composed Gaussian releases (noise multiplier, sample rate, steps), computed here and not by
    flexolmo's accountant: each release's Renyi DP on a finer grid of orders than the accountant's (fractional
    up to 12, then integers): exactly alpha / (2 sigma^2) per step for a full-batch release, the sampled
    Gaussian of Mironov et al. 2019 (Opacus' low-level analysis) otherwise; converted to (epsilon, delta) by
    Balle et al. 2020, Theorem 21."""
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.concatenate([np.arange(105, 1200, 5) / 100, np.arange(12, 257)])
    rdp = np.zeros_like(orders)
    for sigma, rate, steps in releases:
        if rate == 1.0:
            rdp += steps * orders / (2 * sigma**2)
        else:
            rdp += np.asarray(compute_rdp(q=rate, noise_multiplier=sigma, steps=steps, orders=list(orders)))
    epsilons = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.min(epsilons))


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


def test_a_dp_step_clips_each_sample_to_c_and_adds_gaussian_noise_of_std_sigma_c(tiny_anchor, corpora):
    """One step of the optimizer that training uses, taken apart: the clipped sum it noises is the sum of each
    sample's gradient scaled to norm at most C (computed here from the per-sample gradients), and what it adds
    to that sum is noise whose measured std is the recorded noise multiplier times C."""
    model, trainable, stream = owner_model(tiny_anchor, corpora)
    clip = 1e-3  # far below every sample's gradient norm: every sample is clipped
    private = prepare_private_training(model, DPConfig(epsilon=8, delta=1e-6, max_grad_norm=clip),
                                       stream.num_sequences(16), 4, 10, 1, 0)
    params = [param for _, param in trainable]
    optimizer = private.make_optimizer(torch.optim.SGD(params, lr=0.0))
    batch = torch.stack([torch.from_numpy(stream.sequence(i, 16)) for i in range(6)])
    loss, _ = owner_loss(0.0)(private.model, batch)
    loss.backward()
    per_sample = [param.grad_sample.detach().clone() for param in params]
    norms = torch.stack([grad.flatten(1).norm(dim=1) for grad in per_sample]).norm(dim=0)
    assert (norms > 10 * clip).all()
    factors = (clip / norms).clamp(max=1.0)
    optimizer.step()
    clipped_sum = [torch.einsum("b,b...->...", factors, grad) for grad in per_sample]
    for param, expected in zip(params, clipped_sum):
        assert torch.allclose(param.summed_grad, expected, rtol=1e-3, atol=1e-9)
    assert float(torch.cat([param.summed_grad.flatten() for param in params]).norm()) <= len(batch) * clip
    noise = torch.cat([(param.grad * private.expected_batch_size - param.summed_grad).flatten()
                       for param in params])
    sigma = private.record()["noise_multiplier"]
    assert sigma == private.noise_multiplier and sigma > 0.3 and noise.numel() > 10_000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(noise.mean())) < 5 * sigma * clip / noise.numel() ** 0.5


def test_dp_batches_are_poisson_samples_of_rate_q(tiny_anchor, corpora):
    """Each sequence joins each step independently with rate q: batch sizes over many steps have mean qN and
    variance qN(1 - q) (a fixed-size batch has variance 0), and every sequence is drawn at rate q."""
    model, _, stream = owner_model(tiny_anchor, corpora)
    num_sequences = stream.num_sequences(32)
    private = prepare_private_training(model, DPConfig(epsilon=8, delta=1e-6), num_sequences, 8, 10, 1, 0)
    rate = private.sampler.sample_rate
    assert rate == pytest.approx(8 / num_sequences)
    steps = 4000
    draws = [private.sampler.indices(step, 0) for step in range(steps)]
    sizes = np.array([len(indices) for indices in draws])
    assert abs(sizes.mean() - rate * num_sequences) < 0.1
    assert sizes.var() == pytest.approx(rate * num_sequences * (1 - rate), rel=0.1)
    counts = np.bincount(np.concatenate(draws), minlength=num_sequences)
    assert len(counts) == num_sequences and abs(counts.mean() / steps - rate) < 1e-3
    assert counts.std() == pytest.approx((steps * rate * (1 - rate)) ** 0.5, rel=0.15)


def test_dp_expert_spends_its_budget_and_keeps_the_anchor_frozen(tiny_anchor, corpora, tmp_path, monkeypatch):
    import flexolmo.training.loop as training

    batch_sizes = []
    make_batch = training.make_batch

    def recording(stream, indices, seq_len, device):
        batch_sizes.append(len(indices))
        return make_batch(stream, indices, seq_len, device)

    monkeypatch.setattr(training, "make_batch", recording)
    out = tmp_path / "dp-code"
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                                         dp=DPConfig(epsilon=4.0, delta=1e-4), optim=tiny_optim(steps=12)))
    dp = manifest["privacy"]["dp"]
    assert dp["steps"] == 12 and 3.5 < dp["epsilon"] <= 4.0 + 1e-6 and dp["noise_multiplier"] > 0
    # The epsilon that the recorded mechanism spends, computed independently of the accountant that chose it.
    independent = rdp_epsilon([(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])], dp["delta"])
    assert independent <= 4.0 + 1e-6 and independent == pytest.approx(dp["epsilon"], rel=0.02)
    # Training drew Poisson batches (sizes vary from step to step), not the fixed-size ones.
    assert len(batch_sizes) <= 12 and len(set(batch_sizes)) > 1
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


def test_dp_refuses_a_delta_not_below_one_over_n_and_a_batch_not_below_the_data(tiny_anchor, corpora):
    model, _, stream = owner_model(tiny_anchor, corpora)
    sequences = stream.num_sequences(32)
    with pytest.raises(FlexOlmoError, match=f"--dp-delta {1 / sequences:g} is not below 1/N"):
        prepare_private_training(model, DPConfig(epsilon=8, delta=1 / sequences), sequences, 4, 10, 1, 0)
    with pytest.raises(FlexOlmoError, match=f"needs more training sequences \\({sequences}\\) than the"):
        prepare_private_training(model, DPConfig(epsilon=8, delta=1e-6), sequences, sequences, 10, 1, 0)
    private = prepare_private_training(model, DPConfig(epsilon=8, delta=0.9 / sequences), sequences,
                                       sequences - 1, 10, 1, 0)
    assert private.sampler.sample_rate == pytest.approx((sequences - 1) / sequences)


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

    from flexolmo.owner.expert import mix_public
    from flexolmo.training.loop import MixedBatches

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


def test_dp_router_row_is_a_noisy_mean_direction_charged_to_the_budget(tiny_anchor, corpora, tmp_path):
    from flexolmo.model.router_init import dp_mean_direction_rows, mean_direction_rows
    from flexolmo.owner.privacy import calibrate_noise

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    exact = mean_direction_rows(anchor.model, stream, 32, 10_000)
    quiet, rate = dp_mean_direction_rows(anchor.model, stream, 32, 10_000, noise_multiplier=1e-6, seed=0)
    assert rate == 1.0
    cosine = [float(a @ b) for a, b in zip(exact, quiet)]
    assert all(abs(float(row.norm()) - 1) < 1e-5 for row in quiet) and min(cosine) > 0.9

    out = tmp_path / "dp-row"
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=out,
                                         router_init="dp_mean_hidden", router_init_sequences=10_000,
                                         dp=DPConfig(epsilon=8.0, delta=1e-4, router_noise_multiplier=1.0),
                                         optim=tiny_optim(steps=6)))
    dp = manifest["privacy"]["dp"]
    (release,) = dp["prior_releases"]
    assert release == [1.0, 1.0, 1]  # every sequence, noise multiplier 1: a large share of the budget
    assert 7.9 < dp["epsilon"] <= 8.0 + 1e-6
    training = (dp["noise_multiplier"], dp["sample_rate"], dp["steps"])
    independent = rdp_epsilon([tuple(release), training], 1e-4)
    assert independent <= 8.0 + 1e-6 and independent == pytest.approx(dp["epsilon"], rel=0.02)
    # The training noise pays for the router release: more of it than training alone would need.
    assert dp["noise_multiplier"] > calibrate_noise(8.0, 1e-4, dp["sample_rate"], 6)
    assert manifest["privacy"]["router_init"] == "dp_mean_hidden"
    assert not manifest["privacy"]["router_row_from_private_data"]
    with pytest.raises(PackageError, match="needs --dp-epsilon"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="x", out=tmp_path / "x",
                                  router_init="dp_mean_hidden", optim=tiny_optim(steps=2)))


def test_dp_router_release_one_sequence_moves_every_layer_together_by_norm_one(tiny_anchor, corpora,
                                                                                monkeypatch):
    """The release's sensitivity: one sequence's contribution to the concatenated per-layer sums has L2 norm 1
    over all layers together (the accountant charges sensitivity 1), not 1 per layer (sqrt(layers) in all)."""
    import flexolmo.model.router_init as router_init

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    summed = router_init.summed_ffn_inputs
    contributions = []

    def one_at_a_time(model, stream, picks, seq_len, reduce, batch_size=8):
        for pick in picks[:4]:
            contributions.append(summed(model, stream, [pick], seq_len, reduce))
        return summed(model, stream, picks, seq_len, reduce, batch_size)

    monkeypatch.setattr(router_init, "summed_ffn_inputs", one_at_a_time)
    router_init.dp_mean_direction_rows(anchor.model, stream, 32, 16, noise_multiplier=1.0, seed=0)
    assert len(contributions) == 4
    for per_layer in contributions:
        assert len(per_layer) == 2 and all(float(layer.norm()) > 0.1 for layer in per_layer)
        assert float(torch.cat(per_layer).norm()) == pytest.approx(1.0, abs=1e-5)


def test_dp_router_release_adds_gaussian_noise_of_std_sigma(tiny_anchor, corpora, monkeypatch):
    """The noise measured on the release: with each layer's sum stubbed to c * e_0 (c far above sigma), the
    released unit row is (c e_0 + Z) / |c e_0 + Z|, so Z's other coordinates are row_j * c / row_0 up to a
    relative sigma / c; their std must be the noise multiplier."""
    import flexolmo.model.router_init as router_init

    anchor = load_anchor(tiny_anchor)
    stream = load_token_stream([corpora["code"]], anchor.tokenizer)
    sigma, signal = 3.0, 1e5
    hidden = anchor.model.config.hidden_size
    known = [torch.nn.functional.one_hot(torch.tensor(0), hidden).float() * signal for _ in range(2)]
    monkeypatch.setattr(router_init, "summed_ffn_inputs", lambda *_args, **_kw: [r.clone() for r in known])
    noise = []
    for seed in range(50):
        rows, _ = router_init.dp_mean_direction_rows(anchor.model, stream, 32, 16, sigma, seed)
        noise += [row[1:] * signal / row[0] for row in rows]
    noise = torch.cat(noise)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.06)
    assert abs(float(noise.mean())) < 5 * sigma / noise.numel() ** 0.5
