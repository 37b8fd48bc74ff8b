"""The split stage: raw files -> the shipped train/validation/held-out corpora with shared passages cut
out, stats.json, ATTRIBUTION.md and sources.json."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from .attribution import attribution
from .cut import cut_shared, uncut_counts
from .files import jsonl_gz_bytes, read_jsonl_gz, write_atomic
from .settings import DEDUP_CHARS, DOMAINS, HELDOUT_PERMILLE, SPLIT_PERMILLE, SPLITS, TRAIN_PRECEDENCE
from .text import hash_bucket, order_key


class StageInputError(Exception):
    """The split stage's input is missing or is not what the sources stage writes."""


def split_of(domain: str, text: str) -> str:
    """train, validation or heldout, from the text's hash bucket and SPLIT_PERMILLE."""
    heldout, validation = SPLIT_PERMILLE[domain]
    bucket = hash_bucket(text)
    return "heldout" if bucket < heldout else "validation" if bucket < heldout + validation else "train"


def load_raw(raw: Path) -> tuple[dict, dict[str, list[dict[str, str]]]]:
    """sources.json and each domain's raw documents (train + held-out) in the sources stage's order."""
    record_path = raw / "sources.json"
    if not record_path.is_file():
        raise StageInputError(f"{record_path} not found: run the sources stage into {raw}, or copy "
                              "data/demo/sources.json there (see this script's docstring)")
    record = json.loads(record_path.read_text())
    pools: dict[str, list[dict[str, str]]] = {}
    for domain in DOMAINS:
        rows = []
        for name in ("train", "heldout"):
            path = raw / f"{domain}.{name}.jsonl.gz"
            if not path.is_file():
                raise StageInputError(f"{path} not found: run `--stage sources --domains {domain} --raw {raw}`")
            for row in read_jsonl_gz(path):
                if (hash_bucket(row["text"]) < HELDOUT_PERMILLE[domain]) != (name == "heldout"):
                    raise StageInputError(f"{path}: document {row['id']} is not in its raw split; {raw} must "
                                          "hold the sources stage's output, not the split stage's")
                rows.append(row)
        if domain not in record.get("domains", {}):
            raise StageInputError(f"{record_path} does not describe {domain}: rerun the sources stage for it")
        pools[domain] = sorted(rows, key=order_key)
    return record, pools


def split_and_cut(pools: dict[str, list[dict[str, str]]]) -> tuple[dict, dict]:
    """Split every domain three ways, then cut shared passages: closed training sets across domains (in
    TRAIN_PRECEDENCE), validation against every training set, held-out against every training and validation
    set. Returns the rows and the cut counts per domain and split."""
    from flexolmo.data.overlap import build_index

    splits = {d: {name: [r for r in pools[d] if split_of(d, r["text"]) == name] for name in SPLITS} for d in DOMAINS}
    counts: dict[str, dict[str, dict[str, int]]] = {d: {} for d in DOMAINS}

    def texts(names: Iterable[str], domains: Iterable[str] = DOMAINS) -> Iterator[str]:
        return (r["text"] for d in domains for name in names for r in splits[d][name])

    counts["public"]["train"] = uncut_counts(splits["public"]["train"])  # the anchor's training set: untouched
    for n, domain in enumerate(TRAIN_PRECEDENCE[1:], start=1):
        index = build_index(texts(["train"], TRAIN_PRECEDENCE[:n]), DEDUP_CHARS)
        splits[domain]["train"], counts[domain]["train"] = cut_shared(splits[domain]["train"], index)
    for name, against in (("validation", ["train"]), ("heldout", ["train", "validation"])):
        index = build_index(texts(against), DEDUP_CHARS)
        for domain in DOMAINS:
            splits[domain][name], counts[domain][name] = cut_shared(splits[domain][name], index)
    return splits, counts


def build_splits(raw: Path, out: Path) -> dict[str, dict[str, dict]]:
    """The split stage: raw files in `raw` -> shipped corpora, stats.json, ATTRIBUTION.md, sources.json in `out`."""
    try:
        import flexolmo.data.overlap  # noqa: F401  (numpy and flexolmo: the project's Python)
    except ImportError as error:
        raise StageInputError(f"the split stage needs flexolmo and numpy ({error}): run it with the project's "
                              "Python, e.g. .venv/bin/python") from None
    if raw.resolve() == out.resolve():
        raise StageInputError("--raw and --out are the same folder: the split stage would overwrite its input")
    record, pools = load_raw(raw)
    splits, counts = split_and_cut(pools)
    payloads = {f"{d}.{name}.jsonl.gz": jsonl_gz_bytes(splits[d][name]) for d in DOMAINS for name in SPLITS}
    if payloads["public.train.jsonl.gz"] != (raw / "public.train.jsonl.gz").read_bytes():
        raise RuntimeError("public.train would change: it is the demo anchor's training set and must stay as is")
    stats: dict[str, dict[str, dict]] = {}
    for domain in DOMAINS:
        stats[domain] = {}
        for name in SPLITS:
            rows = splits[domain][name]
            stats[domain][name] = {
                "documents": len(rows),
                "characters": sum(len(r["text"]) for r in rows),
                "bytes": sum(len(r["text"].encode("utf-8")) for r in rows),
                "gz_bytes": len(payloads[f"{domain}.{name}.jsonl.gz"]),
                "cut": counts[domain][name],
            }
        s = stats[domain]
        print(f"{domain:11s} " + " | ".join(
            f"{name} {s[name]['documents']:5d} docs {s[name]['characters']:>10,} chars "
            f"(-{s[name]['cut']['characters_removed']:,})" for name in SPLITS), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        write_atomic(out / name, payload)
    write_atomic(out / "stats.json", (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "sources.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "ATTRIBUTION.md", attribution(record, stats).encode())
    return stats
