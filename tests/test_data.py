"""The data pipeline: formats, one-line errors, deterministic splits, the token cache."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from flexolmo.core.errors import DataError
from flexolmo.data import documents, tokens
from flexolmo.data.documents import is_heldout, iter_documents, select_split
from flexolmo.data.tokens import load_token_stream, tokenize_file


def texts(path, **kwargs):
    return [doc.text for doc in iter_documents(path, **kwargs)]


def test_reads_every_format(tmp_path):
    records = [{"text": "alpha beta", "id": "a"}, {"text": "   "}, {"text": "gamma"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl.read_bytes()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), parquet)
    txt = tmp_path / "d.txt"
    txt.write_text("alpha beta\n\n\n   \ngamma\n")
    for path in (jsonl, gz, parquet, txt):
        assert texts(path) == ["alpha beta", "gamma"], path
    assert next(iter_documents(jsonl)).doc_id == "a"


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("line one\nline two\n\nsecond doc\n")
    assert texts(txt) == ["line one\nline two", "second doc"]


def test_custom_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    assert texts(path, text_field="content") == ["hello"]


@pytest.mark.parametrize(
    "name, payload, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{not json}\n', "bad.jsonl:3: invalid JSON"),
        ("nofield.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "nofield.jsonl:2: no 'text' field (found: body)"),
        ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "latin.jsonl:2: not valid UTF-8"),
        ("latin.txt", b"fine\n\ncaf\xe9\n", "latin.txt:3: not valid UTF-8"),
        ("notstr.jsonl", b'{"text": 5}\n', "notstr.jsonl:1: field 'text' is not a string"),
        ("data.csv", b"a,b\n", "unsupported file type"),
        ("broken.jsonl.gz", b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, name, payload, message):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        texts(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        texts(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        texts(tmp_path)


def test_nothing_left_after_filtering(tmp_path, tiny_anchor):
    from flexolmo.model.anchor import load_tokenizer

    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"text": "  \n "}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        tokenize_file(path, load_tokenizer(tiny_anchor), split="all")


def test_split_depends_only_on_the_document():
    docs = [documents.Document(str(i), f"document number {i}") for i in range(2000)]
    held = {d.text for d in select_split(docs, "heldout", 0.1)}
    assert 120 < len(held) < 280
    reordered = list(reversed(docs[::3]))
    assert {d.text for d in select_split(reordered, "heldout", 0.1)} == {d.text for d in docs[::3]} & held
    train = {d.text for d in select_split(docs, "train", 0.1)}
    assert not held & train and len(held | train) == len(docs)
    assert all(is_heldout(text, 0.1) for text in held)


def test_cache_hit_and_invalidation(tmp_path, tiny_anchor, monkeypatch):
    from flexolmo.model.anchor import load_tokenizer

    tokenizer = load_tokenizer(tiny_anchor)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i} of the history"}) + "\n" for i in range(50)))
    cache = tmp_path / "cache"
    first = tokenize_file(path, tokenizer, split="all", cache_dir=cache)
    calls = []
    original = tokens._tokenize_documents
    monkeypatch.setattr(tokens, "_tokenize_documents", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = tokenize_file(path, tokenizer, split="all", cache_dir=cache)
    assert calls == [] and np.array_equal(first.tokens, second.tokens)
    assert isinstance(second.tokens, np.memmap)
    path.write_text(path.read_text() + json.dumps({"text": "one more document"}) + "\n")
    third = tokenize_file(path, tokenizer, split="all", cache_dir=cache)
    assert calls == [1] and len(third.tokens) > len(first.tokens) and third.num_documents == 51


def test_stream_joins_files_and_appends_eos(tmp_path, tiny_anchor):
    from flexolmo.model.anchor import load_tokenizer

    tokenizer = load_tokenizer(tiny_anchor)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"text": "the river"}) + "\n")
    b.write_text(json.dumps({"text": "the city"}) + "\n")
    stream = load_token_stream([a, b], tokenizer, split="all", cache_dir=tmp_path / "c")
    ids = stream.tokens(0, stream.num_tokens).tolist()
    expected = tokenizer("the river")["input_ids"] + [tokenizer.eos_token_id] + \
        tokenizer("the city")["input_ids"] + [tokenizer.eos_token_id]
    assert ids == expected
    assert stream.num_bytes == len("the river") + len("the city")
    assert stream.sequence(0, 3).tolist() == expected[:4]
