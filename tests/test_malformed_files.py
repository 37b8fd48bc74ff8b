"""Every file flexolmo reads, malformed in any way hypothesis finds (issue 25, finding 5): the reader ends
in a `FlexOlmoError`, which the command line prints as one line with a non-zero exit, and never in a traceback.

Each file starts from the shape flexolmo writes; every field is then kept, dropped or replaced by any JSON
value, and the whole file may be replaced by any bytes. Built without training anything, so the whole module
runs in seconds."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexolmo.cli import main
from flexolmo.core.errors import FlexOlmoError
from flexolmo.model.anchor import anchor_family, read_config
from flexolmo.model.merged_format import (
    MERGED_FORMAT,
    MERGED_FORMAT_VERSION,
    MERGED_METADATA_FILE,
    read_merged_info,
)
from flexolmo.owner.manifest import FORMAT, FORMAT_VERSION
from flexolmo.owner.package import MANIFEST_FILE, read_manifest
from flexolmo.trust.history import HISTORY_FILE, check_unchanged, opted_out, read_history
from flexolmo.trust.signing import SIGNATURE_FILE, TrustedKeys, generate_key_pair, verify_directory

EXAMPLES = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
HEX = "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def shaped_like(valid):
    """`valid` with each field kept, dropped or replaced by any JSON value, recursively; or any JSON value."""
    if isinstance(valid, dict):
        fields = st.fixed_dictionaries({}, optional={key: shaped_like(value) for key, value in valid.items()})
    elif isinstance(valid, list):
        fields = st.lists(shaped_like(valid[0]), max_size=3) if valid else st.just([])
    else:
        fields = st.just(valid)
    return st.one_of(fields, fields, fields, json_values)


def contents(valid) -> st.SearchStrategy[bytes]:
    """The bytes of a file shaped like `valid`, or any bytes (non-UTF-8 included)."""
    return st.one_of(shaped_like(valid).map(lambda value: json.dumps(value).encode()), st.binary(max_size=40))


ANCHOR_CONFIG = {"model_type": "olmo2", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                 "num_attention_heads": 2, "vocab_size": 400}
RECORD = {"format": MERGED_FORMAT, "format_version": MERGED_FORMAT_VERSION, "top_k": 1, "dtype": "float32",
          "router_bias_dropped": ["code"], "created": "2026-01-01", "versions": {"flexolmo": "0.1"},
          "anchor": {"fingerprint": HEX, "fingerprint_scheme": 2, "config": ANCHOR_CONFIG},
          "experts": [{"name": "code", "source": "package", "slot_sha256": HEX, "package_sha256": HEX,
                       "router_bias": [-0.5, -1.0],
                       "signer": {"name": "code", "key_id": HEX},
                       "manifest": {"name": "code", "training": {"tokens": 5},
                                    "privacy": {"dp": {"epsilon": 1.0}, "router_row": "public"}}}]}
LOG = {"operation": "add", "when": "2026-01-01T00:00:00+00:00", "by": {"name": "coordinator", "key_id": HEX},
       "added": [{"name": "code", "package_sha256": HEX, "signer": None, "readmitted": True}],
       "removed": [{"name": "math", "package_sha256": HEX}], "experts": ["public", "code"], "top_k": 1,
       "from_model_sha256": HEX, "model_sha256": HEX}
MANIFEST = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": "code",
            "anchor": {"fingerprint": HEX, "fingerprint_scheme": 2, "model_type": "olmo2", "num_hidden_layers": 2,
                       "hidden_size": 32, "intermediate_size": 64},
            "tensors": {"layers.0.mlp.up_proj.weight": {"shape": [64, 32], "dtype": "float32"}}}
BUNDLE = {"verificationMaterial": {"publicKey": {"hint": HEX}}, "dsseEnvelope": {"payload": "e30=",
                                                                                  "signatures": [{"sig": "AA=="}]}}


def only_one_line_errors(action) -> None:
    try:
        action()
    except FlexOlmoError as error:
        assert "\n" not in str(error)


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)


@EXAMPLES
@given(record=contents(RECORD), config=contents({"model_type": "flex_olmo", "num_experts": 2}))
def test_a_malformed_merged_record_is_one_line(folder, record, config):
    model = folder / "merged"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_bytes(config)
    (model / MERGED_METADATA_FILE).write_bytes(record)

    def read():
        info = read_merged_info(model)
        assert info.expert_names and info.anchor_fingerprint and info.anchor_fingerprint_scheme >= 1
        anchor_family(info.anchor_config, model)

    only_one_line_errors(read)


@EXAMPLES
@given(record=contents(RECORD))
def test_inspect_and_verify_of_a_malformed_merged_record_exit_with_one_line(folder, record, capsys):
    from safetensors.torch import save_file
    from torch import zeros

    model = folder / "merged-cli"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text(json.dumps({**ANCHOR_CONFIG, "model_type": "flex_olmo",
                                                       "num_experts": 1, "num_experts_per_tok": 1}))
        save_file({"model.embed_tokens.weight": zeros(4, 2)}, model / "model.safetensors")
    (model / MERGED_METADATA_FILE).write_bytes(record)
    for command in (["inspect", str(model)], ["verify", str(model)]):
        code = main(command)
        error = capsys.readouterr().err
        assert code == 0 or (code == 1 and len(error.strip().splitlines()) == 1), (command, error)


@EXAMPLES
@given(lines=st.lists(contents(LOG), min_size=1, max_size=3))
def test_a_malformed_merge_log_is_one_line(folder, lines, capsys):
    model = folder / "logged"
    model.mkdir(exist_ok=True)
    (model / HISTORY_FILE).write_bytes(b"\n".join(lines))
    only_one_line_errors(lambda: opted_out(read_history(model)))
    only_one_line_errors(lambda: check_unchanged(model))
    code = main(["history", "--model", str(model)])
    error = capsys.readouterr().err
    assert code == 0 or (code == 1 and len(error.strip().splitlines()) == 1), error


@EXAMPLES
@given(manifest=contents(MANIFEST))
def test_a_malformed_manifest_is_one_line(folder, manifest):
    package = folder / "package"
    package.mkdir(exist_ok=True)
    (package / MANIFEST_FILE).write_bytes(manifest)
    only_one_line_errors(lambda: read_manifest(package))


@EXAMPLES
@given(config=contents(ANCHOR_CONFIG))
def test_a_malformed_anchor_config_is_one_line(folder, config):
    anchor = folder / "anchor"
    anchor.mkdir(exist_ok=True)
    (anchor / "config.json").write_bytes(config)
    only_one_line_errors(lambda: anchor_family(read_config(anchor), anchor))


@pytest.fixture(scope="module")
def trusted(folder) -> TrustedKeys:
    generate_key_pair("coordinator", folder / "keys")
    (folder / "keys" / "coordinator.key").unlink()
    return TrustedKeys(folder / "keys")


@EXAMPLES
@given(signature=contents(BUNDLE))
def test_a_malformed_signature_is_one_line(folder, trusted, signature):
    signed = folder / "signed"
    signed.mkdir(exist_ok=True)
    (signed / "weights.bin").write_bytes(b"weights")
    (signed / SIGNATURE_FILE).write_bytes(signature)
    only_one_line_errors(lambda: verify_directory(signed, trusted))


def test_files_that_are_directories_or_unreadable_are_one_line(folder, trusted):
    model = folder / "dirs"
    (model / SIGNATURE_FILE).mkdir(parents=True)
    (model / HISTORY_FILE).mkdir()
    (model / "config.json").mkdir()
    (model / MANIFEST_FILE).mkdir()
    for action in (lambda: verify_directory(model, trusted), lambda: read_history(model),
                   lambda: read_config(model), lambda: read_manifest(model)):
        with pytest.raises(FlexOlmoError):
            action()


@pytest.fixture(scope="module")
def token_cache(folder):
    """A file tokenized once into a fresh cache: the pristine entry, and the tokens a fresh run gives."""
    from flexolmo.data.tokens import tokenize_file
    from flexolmo.model.anchor import load_tokenizer

    tokenizer = load_tokenizer(Path(__file__).parents[1] / "data" / "demo" / "anchor")
    text = folder / "documents.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}: ünïcode, code() and 3.14 {i * i}"}) + "\n"
                            for i in range(20)))
    cache = folder / "token-cache"
    fresh = tokenize_file(text, tokenizer, "all", cache_dir=cache)
    (entry,) = (cache / "tokens").iterdir()
    pristine = {name.name: name.read_bytes() for name in entry.iterdir()}
    return tokenizer, text, cache, entry, pristine, np.array(fresh.tokens), np.array(fresh.token_bytes)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def arrays_like(valid: np.ndarray) -> st.SearchStrategy[bytes]:
    """The bytes of a .npy file: the valid array with some values changed, any small array, or any bytes."""
    from hypothesis.extra import numpy as hnp

    changed = st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 70000)).map(
        lambda change: npy_bytes(np.concatenate([valid[:change[0]], [change[1] % np.iinfo(valid.dtype).max],
                                                 valid[change[0] + 1:]]).astype(valid.dtype)))
    other = hnp.arrays(st.sampled_from([np.uint16, np.uint32, np.int64, np.float32]),
                       hnp.array_shapes(max_dims=2, max_side=len(valid) + 1)).map(npy_bytes)
    return st.one_of(changed, other, st.binary(max_size=60))


@EXAMPLES
@given(data=st.data())
def test_a_damaged_token_cache_entry_is_rebuilt_never_used(token_cache, data, capsys):
    """Whatever happened to a cached split (truncated, rewritten, values flipped), the next run gets exactly the
    tokens a fresh tokenization gives: the entry is checked and rebuilt, never read as it is."""
    from flexolmo.data.tokens import tokenize_file

    tokenizer, text, cache, entry, pristine, tokens, token_bytes = token_cache
    for name, content in pristine.items():
        (entry / name).write_bytes(content)
    meta = json.loads(pristine["meta.json"])
    damaged = data.draw(st.sampled_from(sorted(pristine)))
    replacement = {"meta.json": contents(meta), "tokens.npy": arrays_like(tokens),
                   "bytes.npy": arrays_like(token_bytes)}[damaged]
    (entry / damaged).write_bytes(data.draw(replacement))
    loaded = tokenize_file(text, tokenizer, "all", cache_dir=cache)
    assert np.array_equal(loaded.tokens, tokens) and np.array_equal(loaded.token_bytes, token_bytes)
    assert loaded.num_bytes == meta["num_bytes"] and loaded.num_documents == meta["num_documents"]


@pytest.mark.parametrize("field, change", [("num_bytes", 1), ("num_documents", 1), ("tokens_crc32", 1)])
def test_a_changed_count_in_the_token_cache_is_caught_by_its_checksum(token_cache, field, change):
    """Counts that bits per byte divide by are covered too: one changed number makes the entry rebuilt."""
    from flexolmo.data.tokens import tokenize_file

    tokenizer, text, cache, entry, pristine, tokens, _ = token_cache
    for name, content in pristine.items():
        (entry / name).write_bytes(content)
    meta = json.loads(pristine["meta.json"])
    (entry / "meta.json").write_text(json.dumps({**meta, field: meta[field] + change}))
    loaded = tokenize_file(text, tokenizer, "all", cache_dir=cache)
    assert (loaded.num_bytes, loaded.num_documents) == (meta["num_bytes"], meta["num_documents"])
    assert json.loads((entry / "meta.json").read_text()) == meta  # rebuilt as it was
