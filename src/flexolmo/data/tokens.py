"""Tokenisation with a cache, and the token streams that training and evaluation read.

Tokenized splits are cached on disk per file (memory-mapped numpy arrays), keyed by the file's bytes, the
tokenizer and the split settings, so a second run skips tokenization and a changed file is tokenized again.

Beside every token the cache keeps the number of UTF-8 bytes of text that token encodes, so that bits per byte
divide by the bytes of exactly the tokens scored (`TokenStream.byte_counts`):
- byte-level BPE (GPT-2, OLMo-2, Llama-3, Qwen, SmolLM2 tokenizers): every character of a vocabulary entry stands
  for one byte, so a token's bytes are the length of its vocabulary string, exact per token, even where a
  multi-byte character is split over two tokens;
- any other tokenizer: the character offsets the fast tokenizer reports; each token gets the bytes of the text
  from the end of the previous token to its own end, and text after the last token goes to the last token, so a
  document's bytes are attributed exactly once;
- special tokens (EOS, padding, ...) encode no text: 0 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexolmo.core.errors import DataError
from flexolmo.core.fileio import atomic_directory, exclusive_lock, sha256_file
from flexolmo.core.progress import console, progress_bar
from flexolmo.data.documents import (
    DEFAULT_HELDOUT_FRACTION,
    Document,
    check_readable,
    data_suffix,
    iter_documents,
    select_split,
)

CACHE_FORMAT_VERSION = 3  # 3: meta.json holds a CRC-32 of each array and of itself, checked on every read


_TOKENIZE_BATCH_DOCUMENTS = 512


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything that decides token ids: the fast tokenizer's full JSON plus the EOS id."""
    spec = tokenizer.backend_tokenizer.to_str() + f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenizedFile:
    """One file's split as one token array (documents joined, each followed by EOS), with the UTF-8 bytes of
    text each token encodes (`token_bytes`, same length as `tokens`)."""

    source: Path
    tokens: np.ndarray
    token_bytes: np.ndarray
    num_documents: int
    num_bytes: int
    file_sha256: str = ""  # of the source file's bytes: the data's identity for resuming a run


def default_cache_dir() -> Path:
    """`$FLEXOLMO_CACHE`, else `~/.cache/flexolmo`."""
    return Path(os.environ.get("FLEXOLMO_CACHE", Path.home() / ".cache" / "flexolmo"))


def _cache_key(file_sha256: str, tokenizer_hash: str, text_field: str, split: str, heldout_fraction: float) -> str:
    parts = [
        f"v{CACHE_FORMAT_VERSION}",
        file_sha256,
        tokenizer_hash,
        text_field,
        split,
        repr(heldout_fraction) if split != "all" else "-",
    ]
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:32]


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _byte_level_table(tokenizer) -> np.ndarray | None:
    """Bytes of text per vocabulary id for a byte-level BPE tokenizer (special tokens 0), else None.

    In byte-level BPE each of the 256 byte values is written as one printable character, so a regular token's
    byte count is the length of its vocabulary string. Added tokens that are not special are plain text."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    if not any(part.get("type") == "ByteLevel" for part in decoders):
        return None
    special = set(tokenizer.all_special_ids)
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    alphabet = _byte_level_alphabet()
    table = np.zeros(len(tokenizer), dtype=np.uint32)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or token is None:
            continue
        if token_id in added:
            table[token_id] = len(added[token_id]["content"].encode("utf-8"))
        elif set(token) <= alphabet:
            table[token_id] = len(token)
        else:
            return None  # not the byte-level alphabet after all: offsets are the safe count
    return table


def _byte_level_alphabet() -> set[str]:
    """The 256 characters byte-level BPE writes bytes as (printable bytes as themselves, the rest shifted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    return {chr(code) for code in [*printable, *shifted]}


def _offset_bytes(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes per token from character offsets: the text since the previous token's end up to this token's
    end; what follows the last token is added to it, so the counts sum to the document's bytes exactly."""
    counts, covered = [], 0
    for _start, end in offsets:
        end = max(end, covered)
        counts.append(len(text[covered:end].encode("utf-8")))
        covered = end
    if counts and covered < len(text):
        counts[-1] += len(text[covered:].encode("utf-8"))
    return counts


def _tokenize_documents(documents: Iterable[Document], tokenizer,
                        label: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    dtype = _token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; documents could not be separated")
    table = _byte_level_table(tokenizer)
    special = set(tokenizer.all_special_ids)
    pieces: list[np.ndarray] = []
    byte_pieces: list[np.ndarray] = []
    num_documents = num_bytes = 0
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=table is None)
        for index, ids in enumerate(encoded["input_ids"]):
            pieces.append(np.asarray([*ids, eos], dtype=dtype))
            if table is not None:
                counts = table[np.asarray(ids, dtype=np.int64)]
            else:
                counts = np.asarray(_offset_bytes(batch[index], encoded["offset_mapping"][index]), dtype=np.uint32)
                counts[[i for i, token in enumerate(ids) if token in special]] = 0
            byte_pieces.append(np.append(counts.astype(np.uint32), np.uint32(0)))  # EOS encodes no text

    with progress_bar(f"tokenizing {label}", total=None, unit="docs") as advance:
        for document in documents:
            batch.append(document.text)
            num_documents += 1
            num_bytes += len(document.text.encode("utf-8"))
            if len(batch) == _TOKENIZE_BATCH_DOCUMENTS:
                flush()
                advance(len(batch))
                batch = []
        if batch:
            flush()
            advance(len(batch))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    token_bytes = np.concatenate(byte_pieces) if byte_pieces else np.zeros(0, dtype=np.uint32)
    return tokens, token_bytes, num_documents, num_bytes


def tokenize_file(
    path: Path | str,
    tokenizer,
    split: str = "train",
    text_field: str = "text",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    cache_dir: Path | None = None,
) -> TokenizedFile:
    """Tokenize one file's split, or load it from the cache when the file and tokenizer are unchanged."""
    path = Path(path)
    check_readable(path)
    data_suffix(path)
    file_sha256 = sha256_file(path)
    cache = cache_dir or default_cache_dir()
    key = _cache_key(file_sha256, tokenizer_fingerprint(tokenizer), text_field, split, heldout_fraction)
    entry = cache / "tokens" / key
    # Ranks of one run tokenize the same files at once: one fills the entry, the others then read it.
    with exclusive_lock(cache / "locks" / f"{key}.lock"):
        cached = _read_cache_entry(entry, path, file_sha256)
        if cached is not None:
            return cached
        if entry.exists():
            console.print(f"[yellow]note:[/] the token cache entry of {path.name} ({entry}) is damaged; "
                          "rebuilding it")
        documents = select_split(iter_documents(path, text_field), split, heldout_fraction)
        tokens, token_bytes, num_documents, num_bytes = _tokenize_documents(documents, tokenizer,
                                                                             f"{path.name} ({split})")
        if num_documents == 0:
            total = sum(1 for _ in iter_documents(path, text_field))
            if total == 0 or split == "all":
                raise DataError(f"{path}: no non-empty documents; check the file and --text-field")
            raise DataError(f"{path}: none of its {total} document(s) falls in its {split} split (a hash of each "
                            f"text puts {heldout_fraction:.0%} in the held-out split); add documents, or pass the "
                            "held-out text as its own file (--heldout)")
        meta = {"source": str(path), "split": split, "num_documents": num_documents, "num_bytes": num_bytes,
                "num_tokens": len(tokens), "tokens_crc32": _crc32(tokens), "bytes_crc32": _crc32(token_bytes)}
        meta["meta_crc32"] = _meta_crc32(meta)
        with atomic_directory(entry, overwrite=True) as staging:
            np.save(staging / "tokens.npy", tokens)
            np.save(staging / "bytes.npy", token_bytes)
            (staging / "meta.json").write_text(json.dumps(meta))
        written = _read_cache_entry(entry, path, file_sha256)
        if written is None:
            raise DataError(f"cannot read back the token cache entry {entry}; check that disk, or set "
                            "$FLEXOLMO_CACHE")
        return written


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


def _meta_crc32(meta: dict) -> int:
    fields = {key: value for key, value in meta.items() if key != "meta_crc32"}
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode())


def _read_cache_entry(entry: Path, path: Path, file_sha256: str) -> TokenizedFile | None:
    """A cached split, or None when the entry is absent or damaged (an interrupted copy, a disk error, a changed
    value). The checksums cost one pass over the arrays per run, far less than tokenizing them again, and keep
    a flipped token or byte count from silently changing what is trained on or how bits per byte divide."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        tokens = np.load(entry / "tokens.npy", mmap_mode="r", allow_pickle=False)
        token_bytes = np.load(entry / "bytes.npy", mmap_mode="r", allow_pickle=False)
        intact = (meta["meta_crc32"] == _meta_crc32(meta) and tokens.ndim == 1 and token_bytes.shape == tokens.shape
                  and len(tokens) == meta["num_tokens"] and tokens.dtype.kind == "u" and token_bytes.dtype == np.uint32
                  and _crc32(tokens) == meta["tokens_crc32"] and _crc32(token_bytes) == meta["bytes_crc32"])
        if not intact:
            return None
        return TokenizedFile(path, tokens, token_bytes, int(meta["num_documents"]), int(meta["num_bytes"]),
                             file_sha256)
    except (OSError, ValueError, KeyError, TypeError, EOFError, AttributeError, OverflowError):
        return None


class TokenStream:
    """Several tokenized files read as one stream, cut into fixed-length sequences on demand.

    Sequence `i` covers tokens `[i*L, i*L + L + 1)` of the concatenated stream: L inputs and their L next-token
    targets. Windows never overlap in targets, so a pass over all windows scores each token at most once.
    """

    def __init__(self, files: Sequence[TokenizedFile]):
        self.files = list(files)
        self._arrays = [file.tokens for file in self.files]
        self._byte_arrays = [file.token_bytes for file in self.files]
        self._offsets = np.cumsum([0] + [len(array) for array in self._arrays])

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_bytes(self) -> int:
        return sum(file.num_bytes for file in self.files)

    @property
    def num_documents(self) -> int:
        return sum(file.num_documents for file in self.files)

    def num_sequences(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the concatenated stream."""
        return self._slice(self._arrays, start, stop)

    def byte_counts(self, start: int, stop: int) -> np.ndarray:
        """UTF-8 bytes of text encoded by each of the tokens `[start, stop)` (0 for EOS and other specials)."""
        return self._slice(self._byte_arrays, start, stop)

    def _slice(self, arrays: list[np.ndarray], start: int, stop: int) -> np.ndarray:
        parts = []
        for array, offset in zip(arrays, self._offsets[:-1]):
            lo, hi = max(start - offset, 0), min(stop - offset, len(array))
            if lo < hi:
                parts.append(np.asarray(array[lo:hi], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def sequence(self, index: int, seq_len: int) -> np.ndarray:
        """Window `index`: seq_len + 1 tokens."""
        return self.tokens(index * seq_len, index * seq_len + seq_len + 1)

    def sequence_bytes(self, index: int, seq_len: int) -> np.ndarray:
        """The bytes of text each token of window `index` encodes (seq_len + 1 counts)."""
        return self.byte_counts(index * seq_len, index * seq_len + seq_len + 1)

    def fingerprint(self) -> str:
        """SHA-256 over the token ids in order: names the training stream without revealing any text."""
        digest = hashlib.sha256()
        for array in self._arrays:
            digest.update(np.ascontiguousarray(array).astype(np.uint32).tobytes())
        return digest.hexdigest()


class JoinedStreams:
    """Several token streams read as one set of windows, each stream cut into windows on its own.

    Window `i` of the join is window `i - start` of the stream whose range holds `i`, so no window crosses from
    one stream into the next: when an owner's text is joined with public text, a public window holds public
    tokens only (joining the token arrays instead would start the first public window with the owner's last
    tokens). `ranges` gives each stream's window range, for samplers that draw a share of a batch from each.
    """

    def __init__(self, streams: Sequence[TokenStream]):
        self.streams = list(streams)

    @property
    def num_tokens(self) -> int:
        return sum(stream.num_tokens for stream in self.streams)

    def num_sequences(self, seq_len: int) -> int:
        return sum(stream.num_sequences(seq_len) for stream in self.streams)

    def ranges(self, seq_len: int) -> list[tuple[int, int]]:
        """`[start, stop)` window indices of each stream, in order."""
        bounds = np.cumsum([0] + [stream.num_sequences(seq_len) for stream in self.streams])
        return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def sequence(self, index: int, seq_len: int) -> np.ndarray:
        for stream, (start, stop) in zip(self.streams, self.ranges(seq_len)):
            if start <= index < stop:
                return stream.sequence(index - start, seq_len)
        raise IndexError(f"window {index} is beyond the {self.num_sequences(seq_len)} windows of the join")


def load_token_stream(
    paths: Sequence[Path | str],
    tokenizer,
    split: str = "train",
    text_field: str = "text",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    cache_dir: Path | None = None,
) -> TokenStream:
    """Tokenize (or load from cache) the `split` of every file and join them into one stream."""
    if not paths:
        raise DataError("no data files given")
    return TokenStream(
        [tokenize_file(path, tokenizer, split, text_field, heldout_fraction, cache_dir) for path in paths]
    )
