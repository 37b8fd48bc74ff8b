"""The documentation stays navigable and true to the code: every relative link in the Markdown pages reaches a
file (and a heading, where it names one), the README stays short, and the CLI reference is what the parsers
print today (regenerate it with `scripts/gen_cli_docs.py`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def markdown_pages() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "TESTING.md"]
    for folder in ("docs", "benchmarks"):
        pages += sorted((ROOT / folder).rglob("*.md"))
    return [page for page in pages if page.exists()]


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not match:
            continue
        base = slug(match.group(1))
        seen = counts.get(base, 0)
        counts[base] = seen + 1
        found.add(base if seen == 0 else f"{base}-{seen}")
    return found


def relative_links(page: Path):
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            yield number, target


def test_there_are_pages_to_check():
    names = {page.relative_to(ROOT).as_posix() for page in markdown_pages()}
    assert {"README.md", "TESTING.md", "benchmarks/README.md", "docs/cli.md"} <= names


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    broken = []
    for number, target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not destination.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors_of(destination):
            broken.append(f"{where} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


def _cli_docs_module():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    module = _cli_docs_module()
    expected = module.render()
    current = module.TARGET.read_text() if module.TARGET.exists() else ""
    assert current == expected, (
        "docs/cli.md differs from the CLI's --help: run `.venv/bin/python scripts/gen_cli_docs.py` and commit it")


def test_cli_reference_names_every_command():
    from flexolmo.cli import COMMANDS

    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [name for name in COMMANDS if f"## `flexolmo {name}`" not in text]
    assert not missing, f"docs/cli.md lacks {missing}"
