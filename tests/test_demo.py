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
    from flexolmo.experiments import demo_baselines
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import DemoConfig

    config = DemoConfig.quick_run(data_dir=demo_data, out=tmp_path_factory.mktemp("quick") / "demo", seq_len=32,
                                  expert_steps=4, eval_max_sequences=4, router_samples=10)
    ensembles = []

    class CountingBTM(demo_baselines.SequenceBTM):
        def __init__(self, models, top_k, context_tokens):
            ensembles.append(len(models))
            super().__init__(models, top_k, context_tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_baselines, "SequenceBTM", CountingBTM)
        results = run_demo(config)
    return config, results, ensembles


DEFAULT_ROWS = {"public", "model_soup", "btm", "prompt_routing", "btx_ffn_untuned", "btx_ffn", "flexolmo_untuned",
                "flexolmo"}


def test_demo_runs_every_method_under_both_protocols_and_resumes(quick_demo, monkeypatch):
    from flexolmo.experiments import demo_baselines, demo_steps
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PROTOCOLS
    from flexolmo.experiments.report import expectation_checks

    config, results, ensembles = quick_demo
    tmp_path = config.out.parent
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["quick"] is True and set(saved["protocols"]) == set(PROTOCOLS)
    for protocol, entry in saved["protocols"].items():
        assert set(entry["methods"]) == DEFAULT_ROWS == set(entry["costs"]), protocol
        for method, row in entry["methods"].items():
            assert all(row[d] > 0 for d in ("public", *CLOSED_DOMAINS, "mixed")), (protocol, method)
    # FlexOlmo's models are the same under both protocols; the baselines are built from other dense experts.
    data, flops = (saved["protocols"][p]["methods"] for p in ("data_matched", "flop_matched"))
    for method in saved["shared"]:
        assert data[method] == flops[method], method
    assert set(saved["shared"]) == {"public", "flexolmo_untuned", "flexolmo"}
    assert data["model_soup"] != flops["model_soup"]
    assert set(saved["opt_out"]) == set(CLOSED_DOMAINS)
    # The coordinator's merge probed every member's domain through its proxies, for every candidate.
    admission = json.loads((tmp_path / "demo" / "admission.json").read_text())
    assert admission["members_probed"], admission["members_probe"]
    assert all({m["member"] for m in v["members"]} == set(CLOSED_DOMAINS) - {v["name"]} for v in admission["verdicts"])
    # Every merging baseline has FlexOlmo's members: the public model and one expert per owner.
    for protocol in PROTOCOLS:
        soup = json.loads((tmp_path / "demo" / "models" / protocol / "model_soup" / "flexolmo_dense.json").read_text())
        assert soup["members"] == ["anchor", *CLOSED_DOMAINS]
    assert ensembles == [1 + len(CLOSED_DOMAINS)] * len(PROTOCOLS)
    # The paper's prompt routing is the only router the default run fits, and on public proxies.
    assert [path.name for path in (tmp_path / "demo" / "prompt_routers").iterdir()] == ["public.json"]
    for protocol in PROTOCOLS:
        selection = saved["router_tuning"][f"{protocol}/btx_ffn"]
        assert len(selection["validation"]) == 1 + len(config.tune_lrs)  # the untuned model is a candidate
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
        for domain, full in flops["flexolmo"].items():
            if domain in change:
                assert change[domain] == pytest.approx(masked["domains"][domain]["bits_per_byte"] - full), domain
        assert row["own_domain"] == change[removed]
        others = [change[d] for d in CLOSED_DOMAINS if d != removed]
        assert row["other_closed_mean"] == pytest.approx(sum(others) / len(others))
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "not meaningful" in report and "| flexolmo |" in report
    assert "closed avg (data-matched) | closed avg (flop-matched)" in report
    # The report states every expectation check, and "holds" exactly where the numbers meet it.
    for claim, holds, detail in expectation_checks(saved):
        assert f"- {'holds' if holds else 'does NOT hold'}: {claim} ({detail})" in report
    for plot in ("bits_per_byte.png", "routing.png", "opt_out.png"):
        assert (tmp_path / "demo" / plot).read_bytes()[:4] == b"\x89PNG"

    # A second run reuses every finished step: nothing is trained or evaluated again.
    def refuse(*_args, **_kwargs):
        raise AssertionError("a finished step ran again")

    for module, names in ((demo_steps, ("train_expert", "evaluate", "tune_router", "select_proxies")),
                          (demo_baselines, ("train_dense_expert",))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    assert run_demo(config)["protocols"] == results["protocols"]


def test_data_matched_protocol_gives_every_method_a_flexolmo_experts_owner_tokens(quick_demo):
    """The paper's protocol: every dense expert trained on exactly the owner tokens a FlexOlmo expert saw, read from
    what each training run recorded, and every method's cost says so."""
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS
    from flexolmo.owner.package import load_package

    config, results, _ = quick_demo
    for domain in CLOSED_DOMAINS:
        training = load_package(config.out / "experts" / domain).manifest["training"]
        optim = training["config"]["optim"]
        public = round(optim["batch_size"] * training["public_share"])
        expert_owner_tokens = optim["steps"] * (optim["batch_size"] - public) * optim["seq_len"]
        dense = json.loads((config.out / "dense_data_matched" / domain / "flexolmo_dense.json").read_text())
        assert dense["tokens"] == expert_owner_tokens, domain  # a dense expert's tokens are all the owner's
        assert dense["optim"]["steps"] == optim["steps"]
        flop_matched = json.loads((config.out / "dense" / domain / "flexolmo_dense.json").read_text())
        assert flop_matched["tokens"] > expert_owner_tokens  # the other protocol buys more owner tokens
    data = results["protocols"]["data_matched"]
    assert data["owner_tokens_per_owner"] == expert_owner_tokens
    for method, cost in data["costs"].items():
        expected = 0 if method == "public" else expert_owner_tokens
        assert cost["owner_tokens_per_owner"] == expected, method
        assert cost["owner_tokens"] == expected * (len(CLOSED_DOMAINS) if expected else 1), method
    assert data["costs"]["flexolmo"]["public_tokens"] > 0 == data["costs"]["model_soup"]["public_tokens"]
    flops = results["protocols"]["flop_matched"]["costs"]
    # FLOP-matched: every dense baseline gets at least FlexOlmo's training compute, with more owner tokens.
    for method in ("model_soup", "btm", "prompt_routing", "btx_ffn_untuned", "btx_ffn"):
        assert flops[method]["training_flops"] >= flops["flexolmo"]["training_flops"], method
        assert flops[method]["owner_tokens"] > flops["flexolmo"]["owner_tokens"], method
        assert data["costs"][method]["training_flops"] < flops[method]["training_flops"], method
    assert flops["flexolmo"] == data["costs"]["flexolmo"]
    assert flops["flexolmo"]["training_flops"] > flops["flexolmo_untuned"]["training_flops"]
    # The paper's BTM: all six members read the context, the kept two the window; per-position reads all six.
    passes = (6 * config.context_tokens + 2 * config.seq_len) / config.seq_len
    assert data["costs"]["btm"]["forward_passes_per_token"] == pytest.approx(passes)


def test_ablation_adds_its_rows_to_the_same_run(quick_demo, tmp_path):
    import shutil

    import torch

    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PROTOCOLS
    from flexolmo.owner.package import load_package

    shared, plain, _ = quick_demo
    shutil.copytree(shared.out, tmp_path / "demo")  # the shared run stays as the other tests expect it
    config = shared.model_copy(update={"out": tmp_path / "demo"})
    results = run_demo(config.model_copy(update={"ablation": True}))  # same directory: --ablation only adds
    extra_shared = {"flexolmo_owner_only", "flexolmo_random_init", "flexolmo_bias_dropped_untuned",
                    "flexolmo_bias_untuned"}
    extra = {"btm_per_position", "prompt_routing_private", "unrestricted", *(f"dense_{d}" for d in CLOSED_DOMAINS),
             "model_soup_full", "btm_full", "prompt_routing_full", "btx_untuned", "btx"}
    for protocol in PROTOCOLS:
        methods = results["protocols"][protocol]["methods"]
        before = plain["protocols"][protocol]["methods"]
        assert {m: methods[m] for m in before} == before
        assert set(methods) - set(before) == extra_shared | extra
    data, flops = (results["protocols"][p]["costs"] for p in ("data_matched", "flop_matched"))
    assert flops["unrestricted"]["training_flops"] >= flops["flexolmo"]["training_flops"]
    assert data["unrestricted"]["owner_tokens"] == data["flexolmo"]["owner_tokens"]
    for directory in ("dense", "dense_data_matched"):
        assert (tmp_path / "demo" / directory / "unrestricted" / "model.safetensors").exists()
    # The paper's dense experts train every weight; its BTX merges them onto their averaged non-FFN weights.
    attention = "model.layers.0.self_attn.q_proj.weight"
    anchor = LazyReader(config.data_dir / "anchor").get(attention).float()
    for protocol, directory in (("flop_matched", "dense_full"), ("data_matched", "dense_full_data_matched")):
        members = [anchor, *(LazyReader(tmp_path / "demo" / directory / d).get(attention) for d in CLOSED_DOMAINS)]
        assert all(not torch.equal(member, anchor) for member in members[1:])
        btx = LazyReader(tmp_path / "demo" / "models" / protocol / "btx_untuned").get(attention).float()
        average = sum(member.float() for member in members) / len(members)
        assert (btx - average).abs().max() < 1e-6 < 1e-3 < (btx - anchor).abs().max()
        assert data["btx"]["owner_tokens"] == data["btx_ffn"]["owner_tokens"]
        assert flops["btx_untuned"]["training_flops"] >= flops["flexolmo"]["training_flops"]
    assert {"data_matched/btx", "flop_matched/btx"} <= set(results["router_tuning"])
    # The bias study reads the learned biases the ablation's merge kept, one per layer for each owner.
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_bias.py"), "--demo", str(config.out),
                          "--windows", "1", "--prior", "-50", "--out", str(tmp_path / "bias.json")],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    bias = json.loads((tmp_path / "bias.json").read_text())
    # Without a prior it is the demo's own untuned model, scored the demo's way; a prior changes the routing.
    untuned = results["router_tuning"]["flexolmo"]["validation"]["untuned"]
    assert bias["inference_prior_validation"]["0"] == pytest.approx(untuned, abs=1e-6)
    assert bias["inference_prior_validation"]["-50"]["public"] != untuned["public"]
    learned = bias["learned_bias"]
    assert sorted(learned) == sorted(CLOSED_DOMAINS) and all(len(v) == 2 for v in learned.values())
    for domain in CLOSED_DOMAINS:
        random_init = load_package(tmp_path / "demo" / "experts_random_init" / domain).manifest
        assert random_init["privacy"]["router_init"] == "random"
        biased = load_package(tmp_path / "demo" / "experts_negative_bias" / domain)
        assert biased.manifest["training"]["config"]["negative_bias"]
        owner_only = load_package(tmp_path / "demo" / "experts_owner_only" / domain).manifest["training"]
        assert owner_only["public_share"] == 0 and owner_only["public_data"] == []
    # Owner text only, at the default experts' owner tokens: the paper's owners under the paper's protocol.
    assert data["flexolmo_owner_only"]["owner_tokens"] == data["flexolmo"]["owner_tokens"]
    tunings = data["flexolmo"]["training_tokens"] - data["flexolmo_untuned"]["training_tokens"]
    assert data["flexolmo_owner_only"]["public_tokens"] == tunings  # only the router tunings' public text is left
    assert "flexolmo_owner_only" in results["router_tuning"]
    # The bias rows are the same experts scored without and with their biases: applying them changes scores.
    methods = results["protocols"]["flop_matched"]["methods"]
    assert methods["flexolmo_bias_untuned"] != methods["flexolmo_bias_dropped_untuned"]
    assert "without the domain-informed router initialisation" in (tmp_path / "demo" / "report.md").read_text()
    # The random-init row is charged one router tuning exactly when FlexOlmo's tuning won on validation.
    lr = results["router_tuning"]["flexolmo"]["chosen_lr"]
    one_tuning = (flops["flexolmo"]["training_tokens"] - flops["flexolmo_untuned"]["training_tokens"]) \
        // len(config.tune_lrs)
    assert one_tuning > 0
    assert flops["flexolmo_random_init"]["training_tokens"] == \
        flops["flexolmo_untuned"]["training_tokens"] + (0 if lr is None else one_tuning)


def test_demo_refuses_a_run_directory_with_other_settings(demo_data, tmp_path):
    from flexolmo.core.errors import DataError
    from flexolmo.experiments.demo import Demo
    from flexolmo.experiments.demo_config import DemoConfig

    Demo(DemoConfig.quick_run(data_dir=demo_data, out=tmp_path / "d", seq_len=32)).check_inputs()
    with pytest.raises(DataError, match="other settings"):
        Demo(DemoConfig.quick_run(data_dir=demo_data, out=tmp_path / "d", seq_len=64)).check_inputs()


def test_demo_refuses_a_run_directory_made_under_other_train_expert_defaults(demo_data, tmp_path, monkeypatch):
    """The experts' settings the demo leaves at train-expert's defaults decide its numbers too: a run directory
    made before such a default changed (say the router's learning-rate multiple) is refused, never reused, and
    the benchmarks that build on a finished demo refuse it too."""
    from flexolmo.core.errors import DataError, FlexOlmoError
    from flexolmo.experiments import demo_config
    from flexolmo.experiments.demo import Demo

    config = demo_config.DemoConfig.quick_run(data_dir=demo_data, out=tmp_path / "d", seq_len=32)
    assert demo_config.expert_defaults()["router_lr_scale"] == 0.3
    Demo(config).check_inputs()
    defaults = demo_config.expert_defaults()
    (config.out / "results.json").write_text("{}")  # as if finished: the benchmarks build on it
    assert demo_config.finished_demo_config(config.out) == config
    monkeypatch.setattr(demo_config, "expert_defaults", lambda: {**defaults, "router_lr_scale": 1.0})
    with pytest.raises(DataError, match="other settings"):
        Demo(config).check_inputs()
    with pytest.raises(FlexOlmoError, match="under other train-expert defaults"):
        demo_config.finished_demo_config(config.out)


def test_quick_demo_on_the_shipped_anchor_and_corpora(tmp_path):
    """The README's `flexolmo demo --quick` on the real shipped anchor and corpora: every method and a report.
    Windows of 64 tokens instead of 256 keep it cheap; every step and file it reads are the demo's own."""
    from flexolmo.experiments.demo import run_demo
    from flexolmo.experiments.demo_config import DemoConfig, shipped_data_dir

    if not (shipped_data_dir() / "anchor" / "config.json").exists():
        pytest.fail("the shipped demo anchor is missing from data/demo/anchor")
    results = run_demo(DemoConfig.quick_run(out=tmp_path / "quick", seq_len=64))
    assert results["quick"] and all(set(entry["methods"]) == DEFAULT_ROWS for entry in results["protocols"].values())
    assert "not meaningful" in (tmp_path / "quick" / "report.md").read_text()


STUDY = ["--demo", "{demo}", "--work", "{work}", "--out", "{out}"]


@pytest.mark.parametrize("script, arguments", [
    ("bench_owner_tokens.py", STUDY),
    ("bench_public_share.py", [*STUDY, "--shares", "0.5"]),  # the quick demo has batches of 2
    ("bench_router_tuning.py", [*STUDY, "--fractions", "0.05", "--lrs", "1e-3"]),
    ("bench_router_tuning.py", [*STUDY, "--fractions", "0.05", "--lrs", "1e-3", "--embedders", "anchor",
                                "--pool", "{data}/public.validation.jsonl.gz"]),
    ("bench_owner_setting.py", [*STUDY, "--setting", "router_lr_scale", "--values", "3"]),
    ("bench_owner_setting.py", [*STUDY, "--setting", "negative_bias_start", "--values", "-1", "--also",
                                "negative_bias=true", "--router-bias"]),
    ("bench_top_k.py", ["--anchor", "{data}/anchor", "--data-dir", "{data}", "--experts", "{demo}/experts",
                        "--top-k", "1", "2", "--max-sequences", "2", "--results", "{out}"]),
    ("bench_tasks.py", ["--anchor", "{data}/anchor", "--demo-dir", "{demo}", "--tasks", "copa", "--limit", "4",
                        "--results", "{out}"]),
])
def test_every_study_of_a_finished_demo_runs_on_one_and_writes_its_results(quick_demo, tmp_path, script, arguments):
    """The benchmarks that build on a finished demo read its results and models as the demo writes them now (one
    read a layout two revisions old and failed after a 12-minute run)."""
    import subprocess
    import sys

    config, _, _ = quick_demo
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "results.json"
    paths = {"demo": config.out, "work": tmp_path / "work", "out": out, "data": config.data_dir}
    run = subprocess.run([sys.executable, str(repo / "benchmarks" / script),
                          *[argument.format(**paths) for argument in arguments]],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert script in json.loads(out.read_text())["command"]


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
    # The paper's dense experts train every weight: more FLOPs a step, so fewer steps for the same compute.
    full = config.batch_size * config.seq_len * training_flops_per_token(anchor, config.seq_len, "dense_full")
    full_steps = config.dense_steps(anchor, "dense_full")
    assert len(CLOSED_DOMAINS) * full_steps * full >= flexolmo > len(CLOSED_DOMAINS) * (full_steps - 1) * full
    assert full_steps < steps
    assert config.dense_run("flop_matched", anchor, full_model=True).steps == full_steps


def test_training_every_weight_costs_three_forward_passes_and_ffns_only_less():
    """The usual 6N: a full-model training token costs its forward pass and twice that backward; fine-tuning FFNs
    only skips the weight gradients of attention and the input gradients below layer 0's FFN."""
    from flexolmo.experiments.compute import inference_flops_per_token, training_flops_per_token

    anchor = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "vocab_size": 4096}
    forward = inference_flops_per_token(anchor, 256)
    assert training_flops_per_token(anchor, 256, "dense_full") == 3 * forward
    assert 2 * forward < training_flops_per_token(anchor, 256, "dense_ffn") < 3 * forward


@pytest.mark.parametrize("scores", [{"untuned": 1.0, "0.001": 2.0, "0.003": 2.0},
                                    {"untuned": 2.0, "0.001": 1.0, "0.003": 1.5},
                                    {"untuned": 2.0, "0.001": 1.5, "0.003": 1.0},
                                    {"untuned": 1.0, "0.001": 1.0, "0.003": 1.0},
                                    {"untuned": 2.0, "0.001": 1.0, "0.003": 1.0}])
def test_router_tuning_follows_the_written_rule(scores, tmp_path, monkeypatch):
    """docs/demo.md's rule: untuned, then each lr smallest first; the lowest validation closed average is kept; a tie
    keeps the earlier candidate. The lrs are given largest first, so the order is the rule's, not the config's."""
    from flexolmo.experiments import demo_steps
    from flexolmo.experiments.demo_config import DemoConfig
    from flexolmo.experiments.demo_steps import Demo

    demo = Demo(DemoConfig(out=tmp_path, tune_lrs=(3e-3, 1e-3)))
    tuned_runs, validated = [], []

    def fake_tune(config, resume=False):
        tuned_runs.append(config.optim.lr)
        config.out.mkdir(parents=True)

    def fake_validated(name, path):
        validated.append(name)
        candidate = "untuned" if name.endswith("_untuned") else name.rsplit("_lr", 1)[1]
        return {"closed_average": scores[candidate]}

    monkeypatch.setattr(demo_steps, "tune_router", fake_tune)
    monkeypatch.setattr(demo, "validated", fake_validated)
    best = min(scores, key=lambda name: (scores[name], list(scores).index(name)))
    for method in ("flexolmo", "data_matched/btx_ffn"):
        untuned = tmp_path / "models" / f"{method}_untuned"
        chosen, selection = demo.choose(method, untuned, [])
        assert list(selection["validation"]) == ["untuned", "0.001", "0.003"]
        if best == "untuned":
            assert chosen == untuned and selection["chosen_lr"] is None
        else:
            assert chosen == tmp_path / "models" / f"{method}_tuned_lr{best}"
            assert selection["chosen_lr"] == float(best)
    assert tuned_runs == [1e-3, 3e-3] * 2
    # Validation caches of the two protocols' BTX never collide with FlexOlmo's or each other's.
    assert validated[3:] == ["data_matched/btx_ffn_untuned", "data_matched/btx_ffn_tuned_lr0.001",
                             "data_matched/btx_ffn_tuned_lr0.003"]


def test_sequence_btm_weights_come_from_the_context_only(demo_data):
    """The paper's BTM: one weight vector per sequence, the softmax of each member's log-likelihood of the context,
    top-k, renormalised, applied at every scored position. Tokens after the context never change the weights;
    the context does."""
    import torch

    from flexolmo.experiments.baselines import SequenceBTM
    from flexolmo.model.anchor import load_pretrained

    members = [load_pretrained(demo_data / "anchor") for _ in range(3)]
    with torch.no_grad():
        for index, member in enumerate(members):
            member.lm_head.weight.mul_(1 + 0.5 * index)  # three different predictors
    context, top_k = 6, 2
    ensemble = SequenceBTM(members, top_k, context)
    assert ensemble.routing_prefix_tokens == context  # evaluation must not score what chose the weights
    ids = torch.randint(5, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_probs = torch.stack([torch.log_softmax(m(input_ids=ids).logits.float(), -1) for m in members])
        # By hand: log p_j(x_1..x_{c-1} | x_0), top-k, softmax over the kept members.
        targets = ids[None, :, 1:context, None].expand(3, -1, -1, 1)
        likelihood = log_probs[:, :, : context - 1].gather(-1, targets)[..., 0].sum(-1)
        kept = likelihood.topk(top_k, dim=0).indices
        expected = torch.full_like(likelihood, float("-inf")).scatter(0, kept, likelihood.gather(0, kept))
        expected = torch.log_softmax(expected, 0)
        weights = ensemble.log_weights(ids)
        assert torch.allclose(weights.exp(), expected.exp(), atol=1e-5)
        assert ((weights > float("-inf")).sum(0) == top_k).all() and torch.allclose(weights.exp().sum(0),
                                                                                       torch.ones(4))
        mixed = ensemble(ids).logits
        assert torch.allclose(mixed, torch.logsumexp(expected[..., None, None] + log_probs, 0), atol=1e-4)
        changed_after = ids.clone()
        changed_after[:, context:] = torch.flip(ids[:, context:], dims=[1])
        assert torch.equal(ensemble.log_weights(changed_after), weights)
        changed_context = ids.clone()
        changed_context[:, 1:context] = 7
        assert not torch.equal(ensemble.log_weights(changed_context), weights)


def test_public_prompt_router_never_reads_owner_text(quick_demo, tmp_path):
    """The paper's prompt router, as the demo builds it, fits on what a coordinator holds: the owners' proxy hashes
    and its public pool. With every owner file gone it still fits, on each owner's proxy documents and the rest of
    the public pool."""
    from flexolmo.experiments.demo_config import CLOSED_DOMAINS
    from flexolmo.experiments.demo_steps import Demo
    from flexolmo.owner.proxy import read_proxies

    config, _, _ = quick_demo
    proxies = sorted((config.out / "proxies").glob("*.json"))
    owner_files = [path for d in CLOSED_DOMAINS for path in config.data_dir.glob(f"{d}.*.jsonl.gz")]
    assert len(owner_files) == 3 * len(CLOSED_DOMAINS)
    for path in owner_files:  # every owner file unreachable while the router fits
        path.rename(tmp_path / path.name)
    try:
        router = Demo(config).prompt_router(proxies)
    finally:
        for path in owner_files:
            (tmp_path / path.name).rename(path)
    assert router.documents == {"public": config.router_samples,
                                **{read_proxies(p)["name"]: min(config.router_samples, len(read_proxies(p)["proxies"]))
                                   for p in proxies}}
    assert set(router.labels) == {"public", *CLOSED_DOMAINS}
    assert set(router.predict(["theorem proof lemma", "the river city"])) <= set(router.labels)
