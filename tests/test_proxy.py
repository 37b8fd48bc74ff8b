"""Owner-side proxy selection: the classifier finds owner-like public documents, and only hashes leave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DOMAIN_WORDS, PUBLIC_WORDS, synthetic_documents, write_jsonl

from flexolmo.core.errors import ProxyError
from flexolmo.data.documents import iter_documents
from flexolmo.owner.proxy import (
    ProxyConfig,
    choose_within_budget,
    cross_fitted_scores,
    read_proxies,
    select_proxies,
    text_sha256,
)

PLANTED = 30


@pytest.fixture(scope="module")
def public_pool(tmp_path_factory, corpora) -> tuple[Path, set[str]]:
    """Public text with a few code-like documents hidden in it: the proxies a code owner should find."""
    planted = synthetic_documents(DOMAIN_WORDS["code"] + PUBLIC_WORDS[:8], PLANTED, seed=99)
    public = [document.text for document in iter_documents(corpora["public"])]
    path = write_jsonl(tmp_path_factory.mktemp("pool") / "public-pool.jsonl", public[:150] + planted + public[150:])
    return path, {text_sha256(text) for text in planted}


def proxy_config(tmp_path, corpora, pool, tiny_anchor, **overrides) -> ProxyConfig:
    settings = dict(data=[corpora["code"]], public=[pool], name="code", out=tmp_path / "code.proxies.json",
                    anchor=tiny_anchor, max_documents=100, fraction=0.05)
    return ProxyConfig(**{**settings, **overrides})


@pytest.mark.parametrize("embedder", ["anchor", "minilm"])
def test_selection_finds_the_owner_like_public_documents(embedder, tiny_anchor, corpora, public_pool, tmp_path):
    pool, planted = public_pool
    record = select_proxies(proxy_config(tmp_path, corpora, pool, tiny_anchor, embedder=embedder))
    proxies = record["proxies"]
    selection = record["selection"]
    assert 5 <= len(proxies) < PLANTED and selection["selected_bytes"] <= selection["budget_bytes"]
    assert sum(digest in planted for digest in proxies) >= len(proxies) - 1, "selected documents are not code-like"
    assert selection["heldout_accuracy"] > 0.9 and selection["embedder"] == embedder
    # Only hashes and counts leave the owner: no private text, not even a private document's hash.
    written = (tmp_path / "code.proxies.json").read_text()
    owner_texts = [document.text for document in iter_documents(corpora["code"])]
    assert not any(text[:40] in written or text_sha256(text) in written for text in owner_texts)
    assert record["privacy"]["covered_by_dp"] is False and read_proxies(tmp_path / "code.proxies.json") == record


def test_cross_fitting_scores_each_document_with_a_model_that_never_saw_it():
    rng = np.random.default_rng(0)
    # Pure noise, more features than documents per class: a classifier memorises whatever it is fit on.
    owner, public = rng.normal(size=(60, 200)), rng.normal(size=(60, 200))
    others = rng.normal(size=(200, 200))
    candidates = np.concatenate([public, others])
    owner_folds, public_folds = np.arange(60) % 5, np.arange(60) % 5
    candidate_folds = np.concatenate([public_folds, np.arange(200) % 5])
    scores, quality = cross_fitted_scores(owner, public, owner_folds, public_folds, candidates, candidate_folds,
                                          folds=5, seed=0)
    # Held out, noise cannot be told apart, and a negative example scores like any unseen document.
    assert 0.3 < quality["heldout_accuracy"] < 0.7
    seen, unseen = scores[:60], scores[60:]
    assert abs(seen.mean() - unseen.mean()) < 0.5 * unseen.std()


def test_budget_keeps_the_best_documents_that_fit():
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    assert choose_within_budget(scores, [10, 10, 10, 10], budget=25) == [1, 3]
    assert choose_within_budget(scores, [10, 100, 10, 10], budget=25) == [1]  # at least one proxy


def test_bad_proxy_files_are_named_in_one_line(tmp_path):
    cases = {"absent.json": None, "text.json": "not json", "other.json": json.dumps({"format": "something"}),
             "empty.json": json.dumps({"format": "flexolmo-proxies", "format_version": 1, "name": "x",
                                       "proxies": []}),
             "future.json": json.dumps({"format": "flexolmo-proxies", "format_version": 7})}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(ProxyError) as error:
            read_proxies(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)


def test_cli_select_proxy_writes_once(tiny_anchor, corpora, public_pool, tmp_path, capsys):
    from flexolmo.cli import main

    pool, _ = public_pool
    out = tmp_path / "cli.json"
    args = ["select-proxy", "--data", str(corpora["math"]), "--public-data", str(pool), "--name", "math", "--out",
            str(out), "--anchor", str(tiny_anchor), "--max-documents", "50", "--fraction", "0.02"]
    assert main(args) == 0 and read_proxies(out)["name"] == "math"
    assert f"wrote proxy file: {out}" in capsys.readouterr().out
    assert main(args) == 1 and "already exists" in capsys.readouterr().err
    no_anchor = ["select-proxy", "--data", str(corpora["math"]), "--public-data", str(pool), "--name", "math", "--out",
                 str(tmp_path / "x.json")]
    assert main(no_anchor) == 1 and not (tmp_path / "x.json").exists()
    assert "needs --anchor" in capsys.readouterr().err


def test_public_embeddings_are_cached_by_content_and_embedder():
    from flexolmo.owner.proxy import _cached_public_features

    calls = []

    def embed(texts):
        calls.append(len(texts))
        return np.array([[len(text), 1.0] for text in texts])

    texts = ["a public text", "another one"]
    first = _cached_public_features(texts, embed, {"anchor_fingerprint": "f1"}, "anchor")
    again = _cached_public_features(texts, embed, {"anchor_fingerprint": "f1"}, "anchor")
    assert calls == [2] and np.array_equal(first, again)
    _cached_public_features(texts, embed, {"anchor_fingerprint": "f2"}, "anchor")  # another anchor
    _cached_public_features([*texts, "a third"], embed, {"anchor_fingerprint": "f1"}, "anchor")  # other text
    assert calls == [2, 2, 3]
