"""The held-out/training overlap measure, its command, the demo corpora builder's cuts, and the shipped splits."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from flexolmo.cli import main
from flexolmo.data.overlap import build_index, covered_masks, measure_overlap

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
DOMAINS = ("public", "code", "math", "legal", "biomedical", "literature")

ROOT = Path(__file__).resolve().parents[1]
# N = 5. Shared with training: "abcdef" (two overlapping windows, 6 characters) and "€😀€😀€q" (two windows of
# multi-byte characters, 6 characters). Not shared: strings that exist only across a document boundary, and
# runs of one repeated character.
TRAIN = ["abcdefgh", "xyz€😀€😀€q", "p        q"]
HELDOUT = {
    "h-1": "zzabcdefZZ€😀€😀€qYY",  # 12 of 18 characters shared
    "h-2": "ZZghxyzZZ",             # "ghxyz" spans the first two training documents: not shared
    "h-3": "QQQabc",                # with h-4, "abcde" exists only across held-out documents: not shared
    "h-4": "deQQQQ",
    "h-5": "bcd",                   # shorter than N: no window
    "h-6": "r        s",            # eight spaces, as in training: no passage
}


def write_jsonl(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()), encoding="utf-8")
    return path


def test_covered_characters_match_a_hand_count():
    index = build_index(TRAIN, chars=5)
    masks = covered_masks(list(HELDOUT.values()), index)
    expected_h1 = np.array([c in "abcdef€😀q" for c in "zzabcdefZZ€😀€😀€qYY"])
    assert masks[0].tolist() == expected_h1.tolist() and masks[0].sum() == 12
    assert [int(m.sum()) for m in masks[1:]] == [0, 0, 0, 0, 0]
    assert [len(m) for m in masks] == [len(t) for t in HELDOUT.values()]  # code points, not bytes


def test_window_length_decides_what_is_shared():
    # At N = 7 neither shared run (6 characters each) contains a whole window.
    assert sum(int(m.sum()) for m in covered_masks(list(HELDOUT.values()), build_index(TRAIN, chars=7))) == 0
    # At N = 6 each run is exactly one window.
    assert int(covered_masks([HELDOUT["h-1"]], build_index(TRAIN, chars=6))[0].sum()) == 12


def test_report_per_file_and_per_document(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", {f"t-{i}": t for i, t in enumerate(TRAIN)})
    heldout = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    report = measure_overlap([train], [heldout], chars=5)
    (result,) = report.files
    assert (result.documents, result.characters, result.shared) == (6, 52, 12)
    assert result.share == pytest.approx(12 / 52)
    assert [(d.doc_id, d.shared, d.characters) for d in result.worst] == [("h-1", 12, 18)]
    assert result.documents_over_half == 1
    assert report.train_documents == 3 and report.train_characters == 27


def test_overlap_command_reports_ids_never_text(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", {f"t-{i}": t for i, t in enumerate(TRAIN)})
    heldout = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    out = tmp_path / "report.json"
    code = main(["data", "overlap", "--train", str(train), "--heldout", str(heldout), "--chars", "5",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "23.08%" in printed and "h-1" in printed and f"wrote overlap report: {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["heldout"][0]["shared"] == 12 and saved["heldout"][0]["worst"][0]["id"] == "h-1"
    for text in HELDOUT.values():
        assert text not in printed and text not in out.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--chars", "0"], "window length must be a positive number of characters"),
    (["--top", "-1"], "--top must be >= 0"),
])
def test_overlap_command_bad_settings_are_one_line(tmp_path, capsys, extra, message):
    train = write_jsonl(tmp_path / "train.jsonl", {"t": TRAIN[0]})
    assert main(["data", "overlap", "--train", str(train), "--heldout", str(train), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexolmo data: error: ") and message in err[0]


def test_overlap_command_missing_file_is_one_line(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", {"t": TRAIN[0]})
    assert main(["data", "overlap", "--train", str(train), "--heldout", str(tmp_path / "nope.jsonl")]) == 1
    expected = f"flexolmo data: error: {tmp_path / 'nope.jsonl'}: no such file; check the path"
    assert capsys.readouterr().err.strip() == expected


# ---------------------------------------------------------------------------------------------------------
# scripts/demo_corpora/cut.py (the demo corpora builder): how shared passages are cut out of evaluation text
# ---------------------------------------------------------------------------------------------------------

SHARED_LINE = "Permission is hereby granted, free of charge, to any person"
LONG_LINE = ("Alpha beta gamma delta free of charge, to any person epsilon zeta eta theta iota kappa lambda mu nu "
             "xi omicron pi rho")
EVAL_DOC = f"Unique opening line about apples and pears.\n{SHARED_LINE}\n{LONG_LINE}\nClosing line."


def builder():
    """The demo corpora builder's module that cuts shared passages (scripts/demo_corpora/cut.py)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("demo_corpora.cut")


def test_builder_cuts_shared_lines_whole_and_long_lines_at_word_boundaries():
    index = build_index([f"Some preface.\n{SHARED_LINE}\nMore text."], chars=20)
    cut = builder().cut_text(EVAL_DOC, covered_masks([EVAL_DOC], index)[0])
    # ".\nPermission ..." is shared, so "pears." (its word) goes; the shared line goes whole (a blank line
    # marks the gap); in the long line only " free of charge, to any person " goes.
    assert cut == ("Unique opening line about apples and\n\nAlpha beta gamma delta\n"
                   "epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho\nClosing line.")


def test_builder_cuts_until_nothing_is_shared_and_drops_short_leftovers():
    index = build_index([f"Some preface.\n{SHARED_LINE}\nMore text."], chars=20)
    unique = " ".join(f"word{i}" for i in range(40))
    rows = [{"id": "keeps", "text": f"{EVAL_DOC}\n{unique}"}, {"id": "drops", "text": EVAL_DOC},
            {"id": "clean", "text": unique}]
    kept, counts = builder().cut_shared(rows, index)
    assert [r["id"] for r in kept] == ["keeps", "clean"] and kept[1] == rows[2]
    assert not any(m.any() for m in covered_masks([r["text"] for r in kept], index))
    assert (counts["documents_cut"], counts["documents_dropped"]) == (1, 1)
    assert counts["characters_removed"] == sum(len(r["text"]) for r in rows) - sum(len(r["text"]) for r in kept)


# ---------------------------------------------------------------------------------------------------------------
# The shipped demo corpora: clean held-out and validation splits
# ---------------------------------------------------------------------------------------------------------------


def shipped(domain: str, split: str) -> Path:
    path = DEMO / f"{domain}.{split}.jsonl.gz"
    if not path.exists():
        pytest.fail(f"{path} is missing: rebuild the demo corpora with scripts/build_demo_corpora.py")
    return path


def shipped_texts(split: str) -> list[str]:
    from flexolmo.data.documents import iter_documents

    return [d.text for domain in DOMAINS for d in iter_documents(shipped(domain, split))]


def shared_share(texts: list[str], index) -> float:
    masks = covered_masks(texts, index)
    return sum(int(m.sum()) for m in masks) / sum(len(t) for t in texts)


@pytest.fixture(scope="module")
def train_index():
    return build_index(shipped_texts("train"), chars=50)


@pytest.fixture(scope="module")
def validation_index():
    return build_index(shipped_texts("validation"), chars=50)


@pytest.mark.parametrize("split", ["validation", "heldout"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_evaluation_text_is_not_in_any_training_file(train_index, domain, split):
    from flexolmo.data.documents import iter_documents

    texts = [d.text for d in iter_documents(shipped(domain, split))]
    share = shared_share(texts, train_index)
    assert share < 0.05, f"{domain}.{split}: {share:.2%} of its characters are in training text (50-char strings)"


@pytest.mark.parametrize("domain", DOMAINS)
def test_shipped_heldout_text_is_not_in_validation(validation_index, domain):
    from flexolmo.data.documents import iter_documents

    texts = [d.text for d in iter_documents(shipped(domain, "heldout"))]
    share = shared_share(texts, validation_index)
    assert share < 0.05, f"{domain}.heldout: {share:.2%} of its characters are in validation text"


def test_shipped_public_train_is_the_anchors_training_set():
    """The demo anchor was pretrained on this exact file: a rebuild must not change it."""
    record = json.loads((DEMO / "anchor" / "flexolmo_pretrain.json").read_text())
    digest = hashlib.sha256(shipped("public", "train").read_bytes()).hexdigest()
    assert digest == record["inputs"]["data/demo/public.train.jsonl.gz"]
