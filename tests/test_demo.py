"""The demo pipeline end to end on tiny synthetic corpora and a tiny anchor, and its resumption."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import PUBLIC_WORDS, synthetic_documents, tiny_optim

DOMAIN_VOCAB = {
    "code": "def return self import class if else for in range print len".split(),
    "math": "theorem proof lemma let set function integer prime sum equal".split(),
    "legal": "licence copyright warranty liability permission notice software terms".split(),
    "biomedical": "protein gene cell membrane binding receptor activity process".split(),
    "literature": "said she he her his lord love heart prince night".split(),
}


def write_gz(path: Path, docs: list[str]) -> None:
    lines = "".join(json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(docs))
    path.write_bytes(gzip.compress(lines.encode(), mtime=0))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("demo-data")
    vocab = {"public": PUBLIC_WORDS, **{d: words + PUBLIC_WORDS[:6] for d, words in DOMAIN_VOCAB.items()}}
    for seed, (domain, words) in enumerate(vocab.items()):
        docs = synthetic_documents(words, 90, seed=seed)
        write_gz(root / f"{domain}.train.jsonl.gz", docs[:70])
        write_gz(root / f"{domain}.validation.jsonl.gz", docs[70:80])
        write_gz(root / f"{domain}.heldout.jsonl.gz", docs[80:])
    pretrain(PretrainConfig(data=[root / "public.train.jsonl.gz"], heldout=[root / "public.heldout.jsonl.gz"],
                            out=root / "anchor", optim=tiny_optim(steps=30),
                            shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                              intermediate_size=64)))
    return root


@pytest.fixture(scope="module")
def quick_demo(demo_data, tmp_path_factory):
    """One quick demo run, shared: (its config, its results, the member count of every BTM ensemble built)."""
    from flexolmo.experiments import demo as demo_module
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import DemoConfig

    config = DemoConfig.quick_run(data_dir=demo_data, out=tmp_path_factory.mktemp("quick") / "demo", seq_len=32,
                                  expert_steps=4, eval_max_sequences=4, router_samples=10)
    ensembles = []

    class CountingBTM(demo_module.BranchTrainMergeEnsemble):
        def __init__(self, models, top_k):
            ensembles.append(len(models))
            super().__init__(models, top_k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_module, "BranchTrainMergeEnsemble", CountingBTM)
        results = run_demo(config)
    return config, results, ensembles


def test_demo_runs_every_method_and_resumes(quick_demo, monkeypatch):
    from flexolmo.experiments import demo as demo_module
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS
    from flexolmo.experiments.report import expectation_checks

    config, results, ensembles = quick_demo
    tmp_path = config.out.parent
    expected = {"public", "model_soup", "btm", "prompt_routing", "btx_untuned", "btx",
                "flexolmo_untuned", "flexolmo", *(f"dense_{d}" for d in CLOSED_DOMAINS)}
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(saved["methods"]) == expected and saved["quick"] is True
    for method, row in saved["methods"].items():
        assert all(row[d] > 0 for d in ("public", *CLOSED_DOMAINS, "mixed")), method
    assert set(saved["opt_out"]) == set(CLOSED_DOMAINS)
    # Every merging baseline has FlexOlmo's members: the public model and one expert per owner.
    soup = json.loads((tmp_path / "demo" / "models" / "model_soup" / "flexolmo_dense.json").read_text())
    assert soup["members"] == ["anchor", *CLOSED_DOMAINS] and ensembles == [1 + len(CLOSED_DOMAINS)]
    costs = saved["costs"]
    assert costs["btm"]["forward_passes_per_token"] == 1 + len(CLOSED_DOMAINS)
    # Every dense baseline gets at least FlexOlmo's training compute; FlexOlmo's owners spend half on public text.
    assert costs["flexolmo"]["owner_tokens"] < costs["btx_untuned"]["owner_tokens"]
    for method in ("model_soup", "btm", "prompt_routing", "btx_untuned", "btx"):
        assert costs[method]["training_flops"] >= costs["flexolmo"]["training_flops"], method
    assert costs["flexolmo"]["training_flops"] > costs["flexolmo_untuned"]["training_flops"]
    # Router tuning: each method keeps the learning rate with the best validation closed average, and the
    # reported model is that tuned checkpoint (its metadata records the tuning).
    for method in ("flexolmo", "btx"):
        selection = saved["router_tuning"][method]
        best = min(selection["validation"], key=lambda lr: selection["validation"][lr]["closed_average"])
        assert len(selection["validation"]) == 1 + len(config.tune_lrs)  # the untuned model is a candidate
        if best == "untuned":
            assert selection["chosen_lr"] is None
            assert saved["methods"][method] == saved["methods"][f"{method}_untuned"]
        else:
            assert selection["chosen_lr"] == float(best)
            chosen = tmp_path / "demo" / "models" / f"{method}_tuned_lr{best}" / "flexolmo_experts.json"
            assert json.loads(chosen.read_text())["router_tuning"][-1]["optim"]["lr"] == float(best)
    assert set(saved["routing"]["code"]) == {"public", *CLOSED_DOMAINS}
    # Routing shares are per-expert selection rates: over the experts they sum to top-k in every domain.
    for domain, shares in saved["routing"].items():
        assert sum(shares.values()) == pytest.approx(config.top_k), domain
        kept = saved["kept_mass"][domain]
        assert kept == {key: saved["details"]["flexolmo"]["domains"][domain]["routing"]["kept_mass"][key]
                        for key in ("mean", "lowest_layer_p5")}
        assert 0 < kept["lowest_layer_p5"] <= 1 and 0 < kept["mean"] <= 1
    # Opt-out: each row is the masked model's score minus the full model's, on every domain, and the own/other
    # columns are read from those differences.
    for removed, row in saved["opt_out"].items():
        masked = json.loads((tmp_path / "demo" / "evals" / f"flexolmo_without_{removed}.json").read_text())
        assert masked["excluded"] == [removed]
        change = row["delta_bits_per_byte"]
        for domain, full in saved["methods"]["flexolmo"].items():
            if domain in change:
                assert change[domain] == pytest.approx(masked["domains"][domain]["bits_per_byte"] - full), domain
        assert row["own_domain"] == change[removed]
        others = [change[d] for d in CLOSED_DOMAINS if d != removed]
        assert row["other_closed_mean"] == pytest.approx(sum(others) / len(others))
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "not meaningful" in report and "| flexolmo |" in report
    # The report states every expectation check, and "holds" exactly where the numbers meet it.
    for claim, holds, detail in expectation_checks(saved):
        assert f"- {'holds' if holds else 'does NOT hold'}: {claim} ({detail})" in report
    for plot in ("bits_per_byte.png", "routing.png", "opt_out.png"):
        assert (tmp_path / "demo" / plot).read_bytes()[:4] == b"\x89PNG"

    # A second run reuses every finished step: nothing is trained or evaluated again.
    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(demo_module, "train_expert", refuse)
    monkeypatch.setattr(demo_module, "train_dense_expert", refuse)
    monkeypatch.setattr(demo_module, "evaluate", refuse)
    monkeypatch.setattr(demo_module, "tune_router", refuse)
    monkeypatch.setattr(demo_module, "select_proxies", refuse)
    assert run_demo(config)["methods"] == results["methods"]


def test_ablation_adds_its_rows_to_the_same_run(quick_demo, tmp_path):
    import shutil

    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS
    from flexolmo.owner.package import load_package

    shared, plain, _ = quick_demo
    shutil.copytree(shared.out, tmp_path / "demo")  # the shared run stays as the other tests expect it
    config = shared.model_copy(update={"out": tmp_path / "demo"})
    results = run_demo(config.model_copy(update={"ablation": True}))  # same directory: --ablation only adds
    assert {m: results["methods"][m] for m in plain["methods"]} == plain["methods"]
    added = set(results["methods"]) - set(plain["methods"])
    assert added == {"unrestricted", "flexolmo_random_init", "flexolmo_bias_dropped_untuned", "flexolmo_bias_untuned"}
    assert results["costs"]["unrestricted"]["training_flops"] >= results["costs"]["flexolmo"]["training_flops"]
    assert (tmp_path / "demo" / "dense" / "unrestricted" / "model.safetensors").exists()
    for domain in CLOSED_DOMAINS:
        random_init = load_package(tmp_path / "demo" / "experts_random_init" / domain).manifest
        assert random_init["privacy"]["router_init"] == "random"
        biased = load_package(tmp_path / "demo" / "experts_negative_bias" / domain)
        assert biased.manifest["training"]["config"]["negative_bias"]
    # The bias rows are the same experts scored without and with their biases: applying them changes scores.
    assert results["methods"]["flexolmo_bias_untuned"] != results["methods"]["flexolmo_bias_dropped_untuned"]
    assert "without the domain-informed router initialisation" in (tmp_path / "demo" / "report.md").read_text()
    # The random-init row is charged one router tuning exactly when FlexOlmo's tuning won on validation.
    costs, lr = results["costs"], results["router_tuning"]["flexolmo"]["chosen_lr"]
    one_tuning = (costs["flexolmo"]["training_tokens"] - costs["flexolmo_untuned"]["training_tokens"]) \
        // len(config.tune_lrs)
    assert one_tuning > 0
    assert costs["flexolmo_random_init"]["training_tokens"] == \
        costs["flexolmo_untuned"]["training_tokens"] + (0 if lr is None else one_tuning)


def test_demo_refuses_a_run_directory_with_other_settings(demo_data, tmp_path):
    from flexolmo.core.errors import DataError
    from flexolmo.experiments.demo import Demo
    from flexolmo.experiments.demo_config import DemoConfig

    Demo(DemoConfig.quick_run(data_dir=demo_data, out=tmp_path / "d", seq_len=32)).check_inputs()
    with pytest.raises(DataError, match="other settings"):
        Demo(DemoConfig.quick_run(data_dir=demo_data, out=tmp_path / "d", seq_len=64)).check_inputs()


def test_quick_demo_on_the_shipped_anchor_and_corpora(tmp_path):
    """The README's `flexolmo demo --quick` on the real shipped anchor and corpora: every method and a report.
    Windows of 64 tokens instead of 256 keep it cheap; every step and file it reads are the demo's own."""
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import DemoConfig, shipped_data_dir

    if not (shipped_data_dir() / "anchor" / "config.json").exists():
        pytest.fail("the shipped demo anchor is missing from data/demo/anchor")
    results = run_demo(DemoConfig.quick_run(out=tmp_path / "quick", seq_len=64))
    assert results["quick"] and len(results["methods"]) == 13
    assert "not meaningful" in (tmp_path / "quick" / "report.md").read_text()


def test_device_is_not_part_of_the_demo_settings_but_dtype_is():
    from flexolmo.experiments.demo_config import DemoConfig

    default = DemoConfig()
    assert default.digest() == DemoConfig(device="cuda").digest()
    assert DemoConfig(dtype="bfloat16").digest() != default.digest()


def test_dense_baselines_get_exactly_enough_steps_to_match_flexolmo_compute():
    from flexolmo.experiments.compute import training_flops_per_token
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS, DemoConfig, flexolmo_runs

    anchor = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "vocab_size": 4096}
    config = DemoConfig()
    flexolmo = sum(run.flops(anchor, config.seq_len) for run in flexolmo_runs(config))
    step = config.batch_size * config.seq_len * training_flops_per_token(anchor, config.seq_len, "dense_ffn")
    steps = config.dense_steps(anchor)
    assert len(CLOSED_DOMAINS) * steps * step >= flexolmo > len(CLOSED_DOMAINS) * (steps - 1) * step
    assert steps > config.expert_steps  # a coordinated step costs more than a dense one
    # More tuning learning rates tried is more FlexOlmo compute, so more dense steps.
    assert DemoConfig(tune_lrs=(1e-3, 3e-3, 1e-2)).dense_steps(anchor) >= steps


@pytest.mark.parametrize("best", ["untuned", "0.001", "0.003"])
def test_tuning_is_kept_only_where_it_wins_on_validation(best, tmp_path, monkeypatch):
    from flexolmo.experiments import demo as demo_module
    from flexolmo.experiments.demo import Demo
    from flexolmo.experiments.demo_config import DemoConfig

    demo = Demo(DemoConfig(out=tmp_path, tune_lrs=(1e-3, 3e-3)))
    tuned_runs = []

    def fake_tune(config, resume=False):
        tuned_runs.append(config.optim.lr)
        config.out.mkdir(parents=True)

    def fake_validated(name, path):
        candidate = "untuned" if name.endswith("_untuned") else name.rsplit("_lr", 1)[1]
        return {"closed_average": 1.0 if candidate == best else 2.0, "validated_on": "validation"}

    monkeypatch.setattr(demo_module, "tune_router", fake_tune)
    monkeypatch.setattr(demo, "validated", fake_validated)
    models = {"flexolmo_untuned": tmp_path / "models" / "flexolmo_untuned",
              "btx_untuned": tmp_path / "models" / "btx_untuned"}
    chosen, selection = demo.tune(models, [])
    assert sorted(tuned_runs) == [1e-3, 1e-3, 3e-3, 3e-3]  # every lr tried for both methods
    for method in ("flexolmo", "btx"):
        if best == "untuned":
            assert chosen[method] == models[f"{method}_untuned"] and selection[method]["chosen_lr"] is None
        else:
            assert chosen[method].name == f"{method}_tuned_lr{best}"
            assert selection[method]["chosen_lr"] == float(best)
