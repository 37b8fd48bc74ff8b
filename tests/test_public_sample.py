"""The public sample published with an anchor, and the default public mix of a new owner's training."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_optim

from flexolmo.core.errors import DataError
from flexolmo.core.fileio import sha256_file
from flexolmo.data.documents import iter_documents, select_split
from flexolmo.data.public_sample import PUBLIC_SAMPLE_FILE, _rank, draw_sample
from flexolmo.model.anchor import compute_fingerprint
from flexolmo.owner.expert import ExpertConfig, train_expert


def sample_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in gzip.open(path, "rt")]


def test_draw_sample_is_the_lowest_ranked_prefix_that_fits():
    texts = [f"document {i} " + "x" * (i * 37 % 200) for i in range(300)]
    budget = 5_000
    expected, used = [], 0
    for text in sorted(texts, key=_rank):  # the definition, computed the slow way
        if used + len(text) > budget:
            break
        expected.append(text)
        used += len(text)
    assert draw_sample(texts, budget) == expected
    assert draw_sample(list(reversed(texts)), budget) == expected  # the order of the corpus does not matter
    assert draw_sample(["y" * 10_000, *texts], budget) == expected  # one document over the budget is skipped


def test_pretrain_publishes_a_sample_of_its_training_text_outside_the_fingerprint(tiny_anchor, corpora, tmp_path):
    sample = tiny_anchor / PUBLIC_SAMPLE_FILE
    texts = sample_texts(sample)
    # The tiny anchor was pretrained on the hash-split train part of its file: the sample comes from there.
    training = {document.text for document in select_split(iter_documents(corpora["public"]), "train", 0.05)}
    assert texts and set(texts) <= training
    assert texts == draw_sample(sorted(training, key=_rank))
    # Publishing or refreshing the sample leaves the anchor's fingerprint (and so every package) valid.
    bare = tmp_path / "bare"
    shutil.copytree(tiny_anchor, bare)
    (bare / PUBLIC_SAMPLE_FILE).unlink()
    assert compute_fingerprint(bare) == compute_fingerprint(tiny_anchor)


def test_a_default_train_expert_mixes_the_anchors_public_sample(tiny_anchor, corpora, tmp_path, monkeypatch):
    import flexolmo.owner.expert

    seen = {}
    real_train = flexolmo.owner.expert.train

    def spy(model, named, stream, optim, run_dir, **kwargs):
        seen["stream"], seen["sampler"] = stream, kwargs["sampler"]
        return real_train(model, named, stream, optim, run_dir, **kwargs)

    monkeypatch.setattr(flexolmo.owner.expert, "train", spy)
    manifest = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code",
                                         out=tmp_path / "code", optim=tiny_optim(steps=2, batch_size=4)))
    sample = tiny_anchor / PUBLIC_SAMPLE_FILE
    assert manifest["training"]["public_share"] == 0.5
    assert manifest["training"]["public_data"] == [{"name": PUBLIC_SAMPLE_FILE, "sha256": sha256_file(sample)}]
    # Half of every batch is drawn from the public part of the stream, which is the sample's text.
    (owner_range, public_range) = seen["sampler"].ranges
    for step in range(3):
        indices = seen["sampler"].indices(step, 0)
        public = [i for i in indices if i >= public_range[0]]
        assert len(public) == 2 and len(indices) == 4
    public = seen["stream"].streams[1]  # owner and public text are cut into windows separately
    assert [file.source for file in public.files] == [sample] and public.num_tokens > 0


def test_public_share_zero_turns_mixing_off_and_no_public_text_warns(tiny_anchor, corpora, tmp_path, capsys):
    off = train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="off", out=tmp_path / "off",
                                    public_share=0.0, optim=tiny_optim(steps=1)))
    assert off["training"]["public_share"] == 0.0 and off["training"]["public_data"] == []
    bare = tmp_path / "bare-anchor"
    shutil.copytree(tiny_anchor, bare)
    (bare / PUBLIC_SAMPLE_FILE).unlink()
    capsys.readouterr()
    alone = train_expert(ExpertConfig(anchor=bare, data=[corpora["code"]], name="alone", out=tmp_path / "alone",
                                      optim=tiny_optim(steps=1)))
    assert alone["training"]["public_share"] == 0.0
    assert capsys.readouterr().err.count("no public text to mix into training") == 1
    with pytest.raises(DataError, match="--public-share needs --public-data"):
        train_expert(ExpertConfig(anchor=bare, data=[corpora["code"]], name="x", out=tmp_path / "x",
                                  public_share=0.5, optim=tiny_optim(steps=1)))
    assert not (tmp_path / "x").exists()
