"""Shared fixtures: tiny synthetic corpora and a tiny anchor trained once per test session.

Everything is built in-process from seeds; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The consortium service's fixtures (PostgreSQL server, signed packages), for tests/test_service_*.py.
pytest_plugins = ["service_support"]

PUBLIC_WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "it", "from",
                "at", "are", "an", "this", "be", "which", "or"] + \
    ["history", "river", "city", "music", "science", "language", "country", "people", "century", "war", "king",
     "water", "animal", "plant"]
DOMAIN_WORDS = {
    "code": ["def", "return", "self", "import", "class", "if", "else", "for", "in", "range", "print", "len", "list",
             "dict", "None", "True", "False"],
    "math": ["theorem", "proof", "lemma", "let", "set", "function", "integer", "prime", "sum", "equal", "group", "ring",
             "field", "zero", "one"],
}


def synthetic_documents(words: list[str], count: int, seed: int, length: int = 60) -> list[str]:
    """Documents from a word list with a simple bigram habit, so a model has something to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        tokens = [rng.choice(words)]
        for _ in range(length - 1):
            previous = words.index(tokens[-1])
            tokens.append(words[(previous + 1) % len(words)] if rng.random() < 0.6 else rng.choice(words))
        docs.append(" ".join(tokens) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": text}) + "\n" for i, text in enumerate(docs)))
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    os.environ["FLEXOLMO_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    files = {"public": write_jsonl(root / "public.jsonl", synthetic_documents(PUBLIC_WORDS, 300, seed=1))}
    for seed, (domain, words) in enumerate(DOMAIN_WORDS.items(), start=2):
        files[domain] = write_jsonl(root / f"{domain}.jsonl", synthetic_documents(words + PUBLIC_WORDS[:8], 200, seed))
    return files


def tiny_optim(**overrides):
    from flexolmo.training.loop import OptimConfig

    settings = dict(steps=30, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, checkpoint_every=10, seed=0)
    settings.update(overrides)
    return OptimConfig(**settings)


@pytest.fixture(scope="session")
def tiny_anchor(tmp_path_factory, corpora) -> Path:
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("anchor") / "anchor"
    pretrain(PretrainConfig(
        data=[corpora["public"]], out=out,
        shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          max_position_embeddings=128),
        optim=tiny_optim(steps=40),
    ))
    return out


@pytest.fixture(scope="session")
def serve_merged(tmp_path_factory, tiny_anchor, corpora) -> Path:
    """A tiny merged model (public, code, math; top-2 of 3) for the serving tests: experts trained a few steps
    only, enough that they differ from the public expert and from each other."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.owner.expert import ExpertConfig, train_expert

    root = tmp_path_factory.mktemp("serve")
    packages = []
    for domain in ("code", "math"):
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora[domain]], name=domain, out=root / domain,
                                  optim=tiny_optim(steps=6, lr=3e-2)))
        packages.append(root / domain)
    merge(tiny_anchor, packages, root / "merged", top_k=2)
    return root / "merged"


@pytest.fixture(scope="session")
def serve_merged_biased(tmp_path_factory, tiny_anchor, corpora, serve_merged) -> Path:
    """`serve_merged` with its code expert trained again under the negative router bias, started at -0.25 so that
    applying the bias (`--router-bias`) visibly changes routing without silencing the expert (at -1 it is never
    in a token's top-2 on these prompts); the math expert is the same package."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.owner.expert import ExpertConfig, train_expert

    root = tmp_path_factory.mktemp("serve-biased")
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=root / "code",
                              negative_bias=True, negative_bias_start=-0.25, optim=tiny_optim(steps=6, lr=3e-2)))
    merge(tiny_anchor, [root / "code", serve_merged.parent / "math"], root / "merged", top_k=2)
    return root / "merged"
