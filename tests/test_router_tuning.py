"""Router tuning on proxies: only router rows change, bit for bit everything else; opt-out stays exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DOMAIN_WORDS, PUBLIC_WORDS, synthetic_documents, tiny_optim, write_jsonl
from safetensors.torch import load_file

from flexolmo.coordinator.merge import merge, remove_experts
from flexolmo.coordinator.router_tuning import TuneConfig, tune_router
from flexolmo.core.errors import CheckpointError, ProxyError
from flexolmo.model.merged_format import MERGED_METADATA_FILE
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.proxy import ProxyConfig, select_proxies, text_sha256

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_anchor, corpora) -> dict:
    """Two experts merged at top-2 of 3, a public pool with code- and math-like documents, and both proxy files."""
    root = tmp_path_factory.mktemp("tuning")
    public = [doc.text for doc in __import__("flexolmo.data.documents", fromlist=["iter_documents"]).iter_documents(
        corpora["public"])]
    planted = [*synthetic_documents(DOMAIN_WORDS["code"] + PUBLIC_WORDS[:8], 20, seed=98),
               *synthetic_documents(DOMAIN_WORDS["math"] + PUBLIC_WORDS[:8], 20, seed=97)]
    pool = write_jsonl(root / "public.jsonl", public + planted)
    packages, proxies = [], []
    for domain in ("code", "math"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora[domain]], name=domain, out=root / domain,
                                  optim=tiny_optim(steps=8, lr=2e-2)))
        packages.append(root / domain)
        select_proxies(ProxyConfig(data=[corpora[domain]], public=[pool], name=domain, anchor=tiny_anchor,
                                   out=root / f"{domain}.proxies.json", max_documents=100, fraction=0.05))
        proxies.append(root / f"{domain}.proxies.json")
    merge(tiny_anchor, packages, root / "merged", top_k=2)
    return {"root": root, "pool": pool, "proxies": proxies, "merged": root / "merged"}


def tune_config(setup, out: Path, **overrides) -> TuneConfig:
    settings = dict(model=setup["merged"], public=[setup["pool"]], proxies=setup["proxies"], out=out,
                    optim=tiny_optim(steps=6, lr=5e-2, checkpoint_every=2))
    return TuneConfig(**{**settings, **overrides})


def state(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tuned(setup) -> Path:
    out = setup["root"] / "tuned"
    tune_router(tune_config(setup, out))
    return out


def test_only_router_rows_change_and_the_record_says_what_tuned_them(setup, tuned):
    from transformers import AutoModelForCausalLM

    before, after = state(setup["merged"]), state(tuned)
    assert before.keys() == after.keys()
    routers = [name for name in before if name.endswith(".mlp.gate.weight")]
    assert len(routers) == 2
    for name in before:
        if name in routers:
            assert not torch.equal(before[name], after[name]), f"{name} was not tuned"
            assert all(not torch.equal(before[name][e], after[name][e]) for e in range(3)), "a row stayed frozen"
        else:
            assert torch.equal(before[name], after[name]), f"{name} is not bit-identical"
    metadata = json.loads((tuned / MERGED_METADATA_FILE).read_text())
    (record,) = metadata["router_tuning"]
    assert record["tuned_experts"] == ["public", "code", "math"] and record["optim"]["steps"] == 6
    assert [p["name"] for p in record["proxies"]] == ["code", "math"]
    assert all(len(p["sha256"]) == 64 for p in record["proxies"]) and record["proxy_documents"] > 0
    assert len(record["losses"]) == 6 and record["public"][0]["name"] == "public.jsonl"
    # Still a standard checkpoint: transformers loads it and computes what our runtime computes.
    hf = AutoModelForCausalLM.from_pretrained(tuned)
    assert (logits(hf) - logits(load_model(tuned).model)).abs().max() <= 1e-5


def test_tuning_trains_on_the_proxy_documents_and_public_text(setup, tmp_path, monkeypatch):
    import flexolmo.coordinator.router_tuning as tuning

    seen = {}
    real_train = tuning.train

    def spy(model, named, stream, optim, run_dir, **kwargs):
        seen.update(stream=stream, sampler=kwargs["sampler"], names=[name for name, _ in named])
        seen["proxy_text"] = (run_dir / tuning.PROXY_TEXT_FILE).read_bytes()
        return real_train(model, named, stream, optim, run_dir, **kwargs)

    monkeypatch.setattr(tuning, "train", spy)
    tune_router(tune_config(setup, tmp_path / "spied", optim=tiny_optim(steps=1)))
    assert seen["names"] and all(".mlp.gate.rows." in name for name in seen["names"])
    wanted = {digest for path in setup["proxies"] for digest in json.loads(path.read_text())["proxies"]}
    import gzip

    texts = [json.loads(line)["text"] for line in gzip.decompress(seen["proxy_text"]).decode().splitlines()]
    assert {text_sha256(text) for text in texts} == wanted
    (proxy_range, public_range) = seen["sampler"].ranges
    proxy_tokens = len(seen["stream"].files[0].tokens)
    assert proxy_range[1] * 32 + 1 <= proxy_tokens <= public_range[0] * 32  # no window mixes the two parts
    indices = seen["sampler"].indices(0, 0)
    assert (indices >= public_range[0]).sum() == 2 and (indices < proxy_range[1]).sum() == 2


def test_opt_out_stays_exact_after_tuning(setup, tuned, tmp_path):
    remove_experts(tuned, ["math"], tmp_path / "without-math")
    masked = load_model(tuned, exclude=["math"])
    removed = load_model(tmp_path / "without-math")
    assert (logits(masked.model) - logits(removed.model)).abs().max() <= 1e-5
    assert json.loads((tmp_path / "without-math" / MERGED_METADATA_FILE).read_text())["router_tuning"] == \
        json.loads((tuned / MERGED_METADATA_FILE).read_text())["router_tuning"]


def test_tuning_resumes_exactly_and_refuses_other_inputs(setup, tuned, tmp_path, monkeypatch):
    import flexolmo.coordinator.router_tuning as tuning

    real_train = tuning.train

    def crash_after_four(*args, **kwargs):
        class Crash:
            def after_optimizer_step(self, step):
                if step + 1 == 4:
                    raise KeyboardInterrupt

        return real_train(*args, hooks=[Crash()], **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(tuning, "train", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        tune_router(tune_config(setup, out))
    monkeypatch.setattr(tuning, "train", real_train)
    assert not out.exists()
    with pytest.raises(CheckpointError, match="pass --resume"):
        tune_router(tune_config(setup, out))
    with pytest.raises(CheckpointError, match="another model, proxies or public text"):
        tune_router(tune_config(setup, out, proxies=setup["proxies"][:1]), resume=True)
    tune_router(tune_config(setup, out), resume=True)
    reference, resumed = state(tuned), state(out)
    for name in reference:
        assert torch.allclose(reference[name], resumed[name], atol=1e-6), name
    assert not out.with_name("resumed.ckpt").exists()


def test_refuses_proxies_it_must_not_use(setup, tmp_path, tiny_anchor, corpora):
    code_proxies, math_proxies = setup["proxies"]
    remove_experts(setup["merged"], ["math"], tmp_path / "code-only")
    cases = [
        (dict(model=tmp_path / "code-only"), "not an expert of"),  # math opted out: its proxies must not steer
        (dict(proxies=[code_proxies, code_proxies]), "a second proxy file for 'code'"),
        (dict(public=[tmp_path / "public-without-proxies.jsonl"]), "are not in the --public-data text"),
        (dict(public_share=0.9), "leaves no proxy or no public sequence"),
    ]
    write_jsonl(tmp_path / "public-without-proxies.jsonl", synthetic_documents(PUBLIC_WORDS, 20, seed=5))
    for overrides, message in cases:
        with pytest.raises(Exception, match=message) as error:
            tune_router(tune_config(setup, tmp_path / "out", **overrides))
        assert "\n" not in str(error.value)
    # An expert trained with DP: proxies chosen from its data outside DP would void its guarantee.
    from flexolmo.owner.privacy import DPConfig

    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["math"]], name="math", out=tmp_path / "dp-math",
                              dp=DPConfig(epsilon=8.0, delta=1e-4), optim=tiny_optim(steps=2)))
    merge(tiny_anchor, [tmp_path / "dp-math"], tmp_path / "dp-merged", top_k=2)
    with pytest.raises(ProxyError, match="trained with DP"):
        tune_router(tune_config(setup, tmp_path / "out", model=tmp_path / "dp-merged", proxies=[math_proxies]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_cli_tune_router(setup, tmp_path, capsys):
    from flexolmo.cli import main

    out = tmp_path / "cli-tuned"
    args = ["tune-router", "--model", str(setup["merged"]), "--public-data", str(setup["pool"]), "--proxies",
            *map(str, setup["proxies"]), "--out", str(out), "--steps", "2", "--seq-len", "32", "--batch-size", "4"]
    assert main(args) == 0 and f"wrote tuned model: {out}" in capsys.readouterr().out
    assert main(args) == 1 and "already exists" in capsys.readouterr().err


def test_a_tuned_model_is_logged_signed_and_checked_like_every_merged_model(setup, tmp_path):
    from flexolmo.coordinator.artefacts import verify_merged_model
    from flexolmo.coordinator.publish import CoordinatorTrust
    from flexolmo.core.errors import TrustError
    from flexolmo.trust.history import read_history
    from flexolmo.trust.signing import TrustedKeys, generate_key_pair

    keys = tmp_path / "keys"
    generate_key_pair("coordinator", keys)
    tuned = tmp_path / "tuned-signed"
    tune_router(tune_config(setup, tuned), trust=CoordinatorTrust(sign_key=keys / "coordinator.key"))
    assert [record["operation"] for record in read_history(tuned)][-1] == "tune-router"
    result = verify_merged_model(tuned, TrustedKeys(keys))  # new slot digests cover the tuned rows
    assert result["signer"].name == "coordinator"
    # A source whose slot no longer holds what its record names is refused before anything is tuned.
    altered = tmp_path / "altered"
    __import__("shutil").copytree(setup["merged"], altered)
    record = json.loads((altered / MERGED_METADATA_FILE).read_text())
    record["experts"][1]["slot_sha256"], record["experts"][2]["slot_sha256"] = \
        record["experts"][2]["slot_sha256"], record["experts"][1]["slot_sha256"]
    (altered / MERGED_METADATA_FILE).write_text(json.dumps(record))
    with pytest.raises(TrustError):
        tune_router(tune_config(setup, tmp_path / "never", model=altered))
    assert not (tmp_path / "never").exists()
