"""Evaluation counts exactly: bits per byte divide by the bytes of exactly the tokens scored, context tokens are
never scored, and no baseline is scored on what it has seen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from flexolmo.core.errors import DataError
from flexolmo.data.tokens import load_token_stream, tokenize_file
from flexolmo.evaluation.scoring import score_stream
from flexolmo.model.anchor import load_pretrained, load_tokenizer

ASCII_DOC = "the river city music science language country people century war king water"
# Multi-byte characters (2, 3 and 4 bytes in UTF-8) that the tiny tokenizer splits into byte tokens.
UNICODE_DOC = "the café in Zürich — naïve 日本 music 🎵 river"


def test_token_bytes_sum_to_each_documents_utf8_bytes(tiny_anchor, tmp_path):
    tokenizer = load_tokenizer(tiny_anchor)
    path = write_jsonl(tmp_path / "text.jsonl", [ASCII_DOC, UNICODE_DOC])
    tokenized = tokenize_file(path, tokenizer, split="all", cache_dir=tmp_path / "cache")
    eos = tokenizer.eos_token_id
    tokens, counts = list(tokenized.tokens), list(tokenized.token_bytes)
    assert len(tokens) == len(counts)
    ends = [i for i, token in enumerate(tokens) if token == eos]
    assert len(ends) == 2 and counts[ends[0]] == counts[ends[1]] == 0  # EOS encodes no text
    assert sum(counts[: ends[0]]) == len(ASCII_DOC.encode("utf-8"))
    assert sum(counts[ends[0] + 1: ends[1]]) == len(UNICODE_DOC.encode("utf-8"))


def test_offsets_give_exact_bytes_for_a_tokenizer_that_is_not_byte_level(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set((ASCII_DOC + " " + UNICODE_DOC).split()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    path = write_jsonl(tmp_path / "text.jsonl", [ASCII_DOC, "  " + UNICODE_DOC + "  \n"])
    tokenized = tokenize_file(path, tokenizer, split="all", cache_dir=tmp_path / "cache")
    counts = list(tokenized.token_bytes)
    ends = [i for i, token in enumerate(tokenized.tokens) if token == tokenizer.eos_token_id]
    assert counts[ends[0]] == counts[ends[1]] == 0
    assert sum(counts[: ends[0]]) == len(ASCII_DOC.encode("utf-8"))
    # Spaces between and after tokens are attributed to a neighbouring token: the document is counted whole.
    assert sum(counts[ends[0] + 1: ends[1]]) == len(("  " + UNICODE_DOC + "  \n").encode("utf-8"))
    # A word's bytes go to its own token (the space before it too): "café" is 5 bytes, " café" 6.
    cafe = tokenized.tokens.tolist().index(tokenizer.convert_tokens_to_ids("café"))
    assert counts[cafe] == len(" café".encode("utf-8"))


@pytest.mark.parametrize("context_tokens", [0, 5])
def test_bits_per_byte_divide_by_the_bytes_of_exactly_the_scored_tokens(tiny_anchor, tmp_path, context_tokens):
    """A hand count: one window covering the whole stream; the targets are every token after the context, so
    their bytes are the documents' bytes minus those of the (ASCII) context tokens."""
    tokenizer, model = load_tokenizer(tiny_anchor), load_pretrained(tiny_anchor)
    path = write_jsonl(tmp_path / "text.jsonl", [ASCII_DOC, UNICODE_DOC])
    stream = load_token_stream([path], tokenizer, split="all", cache_dir=tmp_path / "cache")
    ids = stream.tokens(0, stream.num_tokens).tolist()
    seq_len = len(ids) - 1
    first_target = max(context_tokens, 1)
    unscored_text = tokenizer.decode(ids[:first_target])
    assert unscored_text.isascii() and ASCII_DOC.startswith(unscored_text.lstrip())
    expected_bytes = len(ASCII_DOC.encode()) + len(UNICODE_DOC.encode()) - len(unscored_text.encode())
    score = score_stream(model, stream, seq_len, context_tokens=context_tokens)
    assert score.bytes == expected_bytes
    assert score.tokens == seq_len + 1 - first_target
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[first_target - 1:], torch.tensor(ids[first_target:]),
                                            reduction="sum")
    assert score.loss == pytest.approx(float(nll) / score.tokens, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(float(nll) / score.tokens), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(float(nll) / math.log(2) / expected_bytes, rel=1e-5)


def test_loss_perplexity_and_bits_per_byte_equal_a_hand_computation_over_several_windows(tiny_anchor, corpora,
                                                                                        tmp_path):
    """Several windows in several batches, context tokens unscored, part of the file scored: each scored
    token's log-probability from the model's own forward, and the UTF-8 bytes of exactly those tokens' text
    (ASCII text, so each window's scored targets decode to exactly their bytes; EOS decodes to none)."""
    tokenizer, model = load_tokenizer(tiny_anchor), load_pretrained(tiny_anchor)
    stream = load_token_stream([corpora["code"]], tokenizer, split="all", cache_dir=tmp_path / "cache")
    seq_len, windows, context = 16, 5, 3
    assert stream.num_sequences(seq_len) > 2 * windows
    score = score_stream(model, stream, seq_len, batch_size=2, max_sequences=windows, context_tokens=context)
    nats, tokens, text_bytes = 0.0, 0, 0
    with torch.no_grad():
        for index in range(windows):
            ids = stream.sequence(index, seq_len).tolist()
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
            targets = range(context, seq_len + 1)  # positions of the scored targets in the window
            nats -= sum(float(logprobs[position - 1, ids[position]]) for position in targets)
            tokens += len(targets)
            text = tokenizer.decode([ids[position] for position in targets], skip_special_tokens=True)
            assert text.isascii()
            text_bytes += len(text.encode("utf-8"))
    assert (score.tokens, score.bytes) == (tokens, text_bytes)
    assert score.loss == pytest.approx(nats / tokens, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def test_a_capped_evaluation_counts_only_the_windows_it_scored(tiny_anchor, corpora, tmp_path):
    """Scoring the first windows of a file must not divide by the file's average bytes per token."""
    tokenizer, model = load_tokenizer(tiny_anchor), load_pretrained(tiny_anchor)
    stream = load_token_stream([corpora["code"]], tokenizer, split="all", cache_dir=tmp_path / "cache")
    score = score_stream(model, stream, seq_len=32, max_sequences=3)
    assert score.tokens == 3 * 32
    assert score.bytes == int(stream.byte_counts(1, 3 * 32 + 1).sum())


def test_a_model_that_routes_by_a_prefix_is_never_scored_on_it(tiny_anchor, corpora, tmp_path):
    tokenizer, model = load_tokenizer(tiny_anchor), load_pretrained(tiny_anchor)
    stream = load_token_stream([corpora["code"]], tokenizer, split="all", cache_dir=tmp_path / "cache")
    model.routing_prefix_tokens = 8
    with pytest.raises(DataError, match="first 8 tokens"):
        score_stream(model, stream, seq_len=32, max_sequences=1, context_tokens=4)
    assert score_stream(model, stream, seq_len=32, max_sequences=1, context_tokens=8).tokens == 32 - 8 + 1


def test_btm_keeps_exactly_top_k_members_even_where_all_tie(tiny_anchor):
    """At position 0 no member has seen any context: all tie, and exactly the first k (by member order) count."""
    from flexolmo.experiments.baselines import BranchTrainMergeEnsemble

    members = [load_pretrained(tiny_anchor) for _ in range(3)]
    with torch.no_grad():
        for index, member in enumerate(members):
            member.lm_head.weight.mul_(1 + index)  # three different predictors
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    ensemble = BranchTrainMergeEnsemble(members, top_k=2)
    with torch.no_grad():
        mixed = ensemble(ids).logits[0, 0]
        first_two = torch.stack([torch.log_softmax(m(input_ids=ids).logits[0, 0].float(), -1) for m in members[:2]])
    assert torch.allclose(mixed, torch.logsumexp(first_two, 0) - math.log(2), atol=1e-5)


def test_model_soup_averages_every_members_ffn_the_public_model_included(tiny_anchor, tmp_path):
    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.experiments.baselines import model_soup

    dense = load_pretrained(tiny_anchor)
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight.add_(1.0)
    dense.save_pretrained(tmp_path / "dense")
    soup = model_soup(tiny_anchor, [tiny_anchor, tmp_path / "dense"], tmp_path / "soup")
    name = "model.layers.0.mlp.up_proj.weight"
    anchor, averaged = LazyReader(tiny_anchor).get(name).float(), LazyReader(soup).get(name).float()
    assert torch.allclose(averaged, anchor + 0.5, atol=1e-2)  # half of the +1: public and dense, 1/2 each


ATTENTION = "model.layers.0.self_attn.q_proj.weight"
FFN = "model.layers.0.mlp.up_proj.weight"


def _member_with(tiny_anchor, out: Path, **shifts: float) -> Path:
    """The tiny anchor with `shifts` added to named tensors (attention, ffn), saved as a dense model at `out`."""
    model = load_pretrained(tiny_anchor)
    with torch.no_grad():
        model.get_parameter(ATTENTION).add_(shifts.get("attention", 0.0))
        model.get_parameter(FFN).add_(shifts.get("ffn", 0.0))
    model.save_pretrained(out)
    load_tokenizer(tiny_anchor).save_pretrained(out)
    return out


def test_a_full_model_soup_averages_every_weight_and_an_ffn_soup_only_the_ffns(tiny_anchor, tmp_path):
    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.experiments.baselines import model_soup

    dense = _member_with(tiny_anchor, tmp_path / "dense", attention=1.0, ffn=1.0)
    anchor = LazyReader(tiny_anchor)
    for every_weight, attention_shift in ((False, 0.0), (True, 0.5)):
        soup = LazyReader(model_soup(tiny_anchor, [tiny_anchor, dense], tmp_path / f"soup{every_weight}",
                                     every_weight=every_weight))
        assert torch.allclose(soup.get(FFN).float(), anchor.get(FFN).float() + 0.5, atol=1e-2)
        assert torch.allclose(soup.get(ATTENTION).float(), anchor.get(ATTENTION).float() + attention_shift,
                              atol=1e-2)


def test_the_papers_btx_trunk_averages_all_but_the_ffns_and_routes_on_its_own_hidden_states(tiny_anchor, corpora,
                                                                                          tmp_path):
    """The trunk the paper's BTX merges onto: attention (everything but FFNs) averaged over the members, the FFN
    exactly the public model's, the public router rows recomputed on the trunk; and the merge accepts it."""
    from flexolmo.coordinator.merge import merge
    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.data.tokens import load_token_stream
    from flexolmo.experiments.baselines import btx_trunk, dense_expert_package
    from flexolmo.model.anchor import PUBLIC_ROUTER_FILE, load_anchor
    from flexolmo.model.router_init import load_public_rows

    dense = _member_with(tiny_anchor, tmp_path / "dense", attention=2.0, ffn=1.0)
    (dense / "flexolmo_dense.json").write_text('{"kind": "dense-full-model (continued pretraining)"}')
    trunk = btx_trunk(tiny_anchor, [tiny_anchor, dense], tmp_path / "trunk", [corpora["public"]], 32)
    anchor, averaged = LazyReader(tiny_anchor), LazyReader(trunk)
    assert torch.allclose(averaged.get(ATTENTION).float(), anchor.get(ATTENTION).float() + 1.0, atol=1e-2)
    assert torch.equal(averaged.get(FFN).float(), anchor.get(FFN).float())
    assert averaged.dtype(FFN) == anchor.dtype(FFN)
    assert (trunk / PUBLIC_ROUTER_FILE).exists()
    assert not torch.allclose(load_public_rows(trunk, 2)[0], load_public_rows(tiny_anchor, 2)[0])
    loaded = load_anchor(trunk)
    package = tmp_path / "package"
    dense_expert_package(loaded, dense, load_token_stream([corpora["code"]], loaded.tokenizer, "all"), "code",
                         package, "mean_hidden", 32, 4, 0)
    merge(trunk, [package], tmp_path / "merged", top_k=2)
    merged = LazyReader(tmp_path / "merged")
    assert torch.equal(merged.get(ATTENTION), averaged.get(ATTENTION))


@pytest.mark.parametrize("full_model", [False, True])
def test_a_dense_expert_trains_its_ffns_only_or_as_the_paper_every_weight(tiny_anchor, corpora, tmp_path,
                                                                         full_model):
    from conftest import tiny_optim

    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.experiments.baselines import train_dense_expert

    out = train_dense_expert(tiny_anchor, [corpora["code"]], tmp_path / "dense", tiny_optim(steps=3),
                             full_model=full_model)
    anchor, dense = LazyReader(tiny_anchor), LazyReader(out)
    assert not torch.allclose(dense.get(FFN).float(), anchor.get(FFN).float())
    assert torch.equal(dense.get(ATTENTION).float(), anchor.get(ATTENTION).float()) != full_model
    assert ("full-model" in (out / "flexolmo_dense.json").read_text()) == full_model


def test_public_windows_hold_public_tokens_only(tiny_anchor, corpora, tmp_path):
    """Owner text joined with public text: a canary at the end of the owner's file, in the tail that fills no
    whole owner window, must never appear in a window drawn as public (it did: the first public window began
    with the owner's last tokens, outside the DP sampling and accountant)."""
    from flexolmo.owner.expert import ExpertConfig, mix_public

    tokenizer = load_tokenizer(tiny_anchor)
    owner_docs = [line for line in corpora["code"].read_text().splitlines()[:40]]
    owner_file = tmp_path / "owner.jsonl"
    owner_file.write_text("\n".join(owner_docs) + '\n{"text": "canary zyxwvu canary"}\n')
    owner = load_token_stream([owner_file], tokenizer, split="all", cache_dir=tmp_path / "cache")
    canary = tokenizer("zyxwvu", add_special_tokens=False)["input_ids"]
    # A window length whose last partial window holds the canary.
    seq_len = next(n for n in range(16, 64) if (owner.num_tokens - 1) % n > len(canary) + 8)
    config = ExpertConfig(anchor=tiny_anchor, data=[owner_file], name="code", out=Path("unused"),
                          public_data=[corpora["public"]], public_share=0.5,
                          optim=dict(steps=1, batch_size=4, seq_len=seq_len))
    joined, sampler = mix_public(owner, config, tokenizer)
    public = load_token_stream([corpora["public"]], tokenizer, split="all")
    (owner_start, owner_stop), (public_start, public_stop) = sampler.ranges
    assert (owner_start, owner_stop) == (0, owner.num_sequences(seq_len))
    for index in range(public_start, public_stop):
        window = joined.sequence(index, seq_len)
        assert (window == public.sequence(index - public_start, seq_len)).all()
        text = tokenizer.decode(window.tolist())
        assert "zyxwvu" not in text
