"""Owners' proxy files on the coordinator's side: checked against a merged model, resolved in the coordinator's
public text, and written as a text file that the token streams read.

A proxy file (`flexolmo select-proxy`) names public documents that look like an owner's data by their hashes.
Two coordinator steps read them: router tuning trains the router rows on them, and admission probes each
member's domain with them (a candidate must not take a member's tokens). Both go through these functions.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from flexolmo.core.errors import ProxyError
from flexolmo.core.fileio import atomic_write_bytes, sha256_file
from flexolmo.data.documents import iter_documents
from flexolmo.model.merged_format import MergedModelInfo
from flexolmo.owner.proxy import read_proxies, text_sha256


def check_proxies(info: MergedModelInfo, paths: list[Path], model_label: str | None = None) -> list[dict]:
    """Read every proxy file and check it may be used with this model; one proxy file per expert.

    `model_label` names the model in messages (default: its path)."""
    entries = {entry["name"]: entry for entry in info.metadata["experts"]}
    records, seen = [], set()
    for path in paths:
        record = read_proxies(path)
        name = record["name"]
        if name not in entries:
            raise ProxyError(f"{path}: proxies of '{name}', which is not an expert of {model_label or info.path} "
                             f"(it has: {', '.join(entries)}); an owner that left must not steer the router")
        if name in seen:
            raise ProxyError(f"{path}: a second proxy file for '{name}'; pass one per expert")
        dp = ((entries[name].get("manifest") or {}).get("privacy") or {}).get("dp")
        if dp:
            raise ProxyError(f"{path}: expert '{name}' was trained with DP (epsilon {dp.get('epsilon')}), but its "
                             "proxies were chosen from its private data outside DP; leave them out")
        seen.add(name)
        records.append({**record, "file": path, "sha256": sha256_file(path)})
    return records


def _found_texts(records: list[dict], public: list[Path], text_field: str) -> dict[str, str]:
    """Every proxy hash of `records` mapped to its public text; every hash must be found."""
    wanted = {digest for record in records for digest in record["proxies"]}
    found: dict[str, str] = {}
    for path in public:
        for document in iter_documents(path, text_field):
            digest = text_sha256(document.text)
            if digest in wanted:
                found.setdefault(digest, document.text)
    for record in records:
        missing = [digest for digest in record["proxies"] if digest not in found]
        if missing:
            raise ProxyError(f"{record['file']}: {len(missing)} of {len(record['proxies'])} proxies of "
                             f"'{record['name']}' are not in the --public-data text; pass the public files they were "
                             "selected from")
    return found


def resolve_proxies(records: list[dict], public: list[Path], text_field: str) -> list[str]:
    """The public texts the proxy hashes name, each once, in hash order; every hash must be found."""
    found = _found_texts(records, public, text_field)
    return [found[digest] for digest in sorted(found)]


def resolve_member_proxies(records: list[dict], public: list[Path], text_field: str) -> dict[str, list[str]]:
    """Per expert, the public texts its proxy file names, in the file's order (most owner-like first)."""
    found = _found_texts(records, public, text_field)
    return {record["name"]: [found[digest] for digest in record["proxies"]] for record in records}


def write_proxy_text(texts: list[str], path: Path) -> None:
    """`texts` as a gzipped JSONL file (`id`: the text's hash), byte-identical for the same texts."""
    lines = "".join(json.dumps({"id": text_sha256(text), "text": text}) + "\n" for text in texts)
    atomic_write_bytes(path, gzip.compress(lines.encode("utf-8"), mtime=0))
