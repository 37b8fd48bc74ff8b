"""The data-extraction audit: it sees memorisation where there is some, not where there is none, is seeded,
audits merged models with exclusions, and never reveals text unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PUBLIC_WORDS, synthetic_documents, tiny_optim, write_jsonl

from flexolmo.core.errors import MergeError
from flexolmo.evaluation.audit import AuditConfig, audit_extraction, similarity_summary, wilson_interval

# Small enough to run in seconds: 8 documents, an 8-token prompt, 16 tokens compared, 4 samples.
FAST = dict(prefix_tokens=8, new_tokens=16, min_continuation_tokens=16, samples=4, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread only spins (on a busy machine, for minutes)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """8 documents the anchor never saw (same vocabulary as its public data, different draws)."""
    return write_jsonl(tmp_path_factory.mktemp("secret") / "secret.jsonl",
                       synthetic_documents(PUBLIC_WORDS, 8, seed=99, length=30))


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_anchor, secret) -> Path:
    """The tiny anchor trained for ~100 epochs on the 8 secret documents: the paper's sanity-check model."""
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.model.anchor import load_pretrained, load_tokenizer
    from flexolmo.training.loop import train

    root = tmp_path_factory.mktemp("overfit")
    model, tokenizer = load_pretrained(tiny_anchor), load_tokenizer(tiny_anchor)
    # Two copies: the stream holds (tokens - 1) // seq_len windows, so with one copy (8 documents of exactly
    # 32 tokens with their EOS) the last document would never be trained on.
    stream = load_token_stream([secret, secret], tokenizer, split="all")
    train(model, list(model.named_parameters()), stream,
          tiny_optim(steps=200, batch_size=8, seq_len=32, lr=5e-3, warmup_steps=10, checkpoint_every=1000),
          root / "run", description="overfitting")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tiny_anchor, corpora) -> Path:
    """The anchor merged with one briefly trained owner expert ("code"), top-2."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.owner.expert import ExpertConfig, train_expert

    root = tmp_path_factory.mktemp("audit-merged")
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=root / "code",
                              optim=tiny_optim(steps=8, lr=2e-2)))
    merge(tiny_anchor, [root / "code"], root / "merged", top_k=2)
    return root / "merged"


def test_overfit_model_is_extracted_and_the_anchor_is_not(tiny_anchor, overfit, secret):
    leaky = audit_extraction(AuditConfig(model=overfit, data=secret, **FAST))
    clean = audit_extraction(AuditConfig(model=tiny_anchor, data=secret, **FAST))
    print(f"extraction rate: overfit {leaky.rate:.3f}, anchor {clean.rate:.3f}")
    assert leaky.audited == clean.audited == 8 and leaky.documents_too_short == 0
    assert leaky.rate >= 0.75
    assert clean.rate <= 0.125
    assert sum(score.best for score in leaky.scores) > sum(score.best for score in clean.scores)
    assert leaky.interval[0] <= leaky.rate <= leaky.interval[1]


def outcome(result) -> list[tuple[str, list[float]]]:
    return [(score.doc_id, score.similarities) for score in result.scores]


def test_same_seed_same_result_other_seed_other_samples(tiny_anchor, corpora):
    config = AuditConfig(model=tiny_anchor, data=corpora["public"], num_docs=6, seed=3, **FAST)
    first, second = audit_extraction(config), audit_extraction(config)
    assert outcome(first) == outcome(second)
    other = audit_extraction(config.model_copy(update={"seed": 4}))
    assert outcome(other) != outcome(first)
    assert first.documents_in_file == 300 and first.audited == 6


def test_excluding_the_owner_expert_audits_the_anchor(tiny_anchor, merged, secret):
    config = AuditConfig(model=tiny_anchor, data=secret, num_docs=4, **FAST)
    anchor = audit_extraction(config)
    without = audit_extraction(config.model_copy(update={"model": merged, "exclude": ["code"]}))
    assert without.expert_names == ["public", "code"]
    assert [x for s in without.scores for x in s.similarities] == \
        pytest.approx([x for s in anchor.scores for x in s.similarities])
    with pytest.raises(MergeError, match="no expert"):
        audit_extraction(config.model_copy(update={"model": merged, "exclude": ["nobody"]}))


def test_cli_writes_json_without_text_unless_asked(overfit, secret, tmp_path, capsys):
    from flexolmo.cli import main

    flags = ["audit-extraction", "--model", str(overfit), "--data", str(secret), "--prefix-tokens", "8",
             "--new-tokens", "16", "--min-continuation-tokens", "16", "--samples", "2", "--num-docs", "4"]
    texts = [json.loads(line)["text"] for line in secret.read_text().splitlines()]
    assert main([*flags, "--json", str(tmp_path / "audit.json")]) == 0
    written = (tmp_path / "audit.json").read_text()
    out = capsys.readouterr().out
    assert "extraction rate" in out and "95% Wilson interval" in out
    record = json.loads(written)
    assert record["documents"] == {"in_file": 8, "too_short": 0, "audited": 4}
    assert sum(record["similarity"]["histogram"]["counts"]) == 4 and len(record["top"]) == 4
    assert {"prefix", "true_continuation", "best_sample"}.isdisjoint(record["top"][0])
    for text in texts:  # no piece of any document appears, not even a prompt's worth of words
        assert " ".join(text.split()[:4]) not in written and " ".join(text.split()[:4]) not in out

    assert main([*flags, "--show-text", "--json", str(tmp_path / "shown.json")]) == 0
    shown = json.loads((tmp_path / "shown.json").read_text())
    assert shown["top"][0]["prefix"] and shown["top"][0]["true_continuation"]
    assert any(shown["top"][0]["true_continuation"].strip()[:20] in text for text in texts)
    assert "true continuation" in capsys.readouterr().out


def test_one_line_errors(tiny_anchor, tmp_path, capsys):
    from flexolmo.cli import main

    short = write_jsonl(tmp_path / "short.jsonl", ["the river", "a city", "music"])
    flags = ["audit-extraction", "--model", str(tiny_anchor), "--data", str(short)]
    assert main([*flags, "--new-tokens", "16"]) == 1
    assert main([*flags, "--threshold", "1.5", "--samples", "0"]) == 2
    assert main([*flags, "--new-tokens", "500"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flexolmo ")]
    assert len(errors) == 3 and all(line.startswith("flexolmo audit-extraction: error: ") for line in errors)
    assert "none of its 3 documents has the 128 tokens needed" in errors[0]
    assert "--threshold" in errors[1] and "--samples" in errors[1]
    assert "context" in errors[2]


def test_documents_with_a_short_continuation_are_not_audited(tiny_anchor, tmp_path):
    """A document whose continuation after the prompt is a token or two would count as extracted whenever the
    model guesses them; only documents with at least `min_continuation_tokens` after the prefix are drawn."""
    from flexolmo.model.anchor import load_tokenizer

    tokenizer = load_tokenizer(tiny_anchor)
    docs = synthetic_documents(PUBLIC_WORDS, 6, seed=5, length=30) + \
        synthetic_documents(PUBLIC_WORDS, 4, seed=6, length=9)
    lengths = [len(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in docs]
    path = write_jsonl(tmp_path / "mixed.jsonl", docs)
    config = AuditConfig(model=tiny_anchor, data=path, **{**FAST, "min_continuation_tokens": 12})
    result = audit_extraction(config)
    long_enough = [i for i, n in enumerate(lengths) if n >= 8 + 12]
    assert 0 < len(long_enough) < len(docs)
    assert result.audited == len(long_enough) and result.documents_too_short == len(docs) - len(long_enough)
    assert sorted(score.doc_id for score in result.scores) == sorted(f"doc-{i}" for i in long_enough)
    assert all(score.continuation_tokens >= 12 for score in result.scores)


def test_wilson_interval_and_summary():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (60, 100)]:
        expected = scipy_stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)
    summary = similarity_summary([0.0, 0.05, 0.5, 0.95, 1.0])
    assert summary["histogram"]["counts"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert summary["quantiles"]["p50"] == 0.5 and summary["quantiles"]["max"] == 1.0


def test_several_files_are_audited_as_one_with_ids_naming_their_file(tiny_anchor, corpora, secret):
    config = AuditConfig(model=tiny_anchor, data=[secret, corpora["code"]], num_docs=30, **FAST)
    result = audit_extraction(config)
    assert result.documents_in_file == 8 + 200 and result.audited == 30
    assert {score.doc_id.split(":")[0] for score in result.scores} == {"secret.jsonl", "code.jsonl"}
    assert list(result.data_sha256) == [str(secret), str(corpora["code"])]
