"""legal: ScanCode licence texts, Debian common licences."""

from __future__ import annotations

import re
from pathlib import Path

from ..locate import find_package_dir
from ..settings import COMMON_LICENSES, INSTALL_HINT
from ..text import clean, need, read_text, split_long


def scancode_docs(site_packages: Path | None) -> list[str]:
    """Licence/EULA texts from ScanCode's licence database (YAML front matter dropped), deprecated keys skipped."""
    pkg = find_package_dir("licensedcode", site_packages)
    folder = need(pkg / "data" / "licenses", INSTALL_HINT["licensedcode"])
    docs: list[str] = []
    for path in sorted(folder.glob("*.LICENSE")):
        raw = read_text(path)
        front, body = "", raw
        if raw.startswith("---"):
            end = raw.find("\n---", 3)
            if end >= 0:
                front, body = raw[:end], raw[end + 4 :]
        if re.search(r"(?m)^is_deprecated: yes", front):
            continue  # superseded keys duplicate a current licence
        docs.extend(split_long(clean(body)))
    return docs


def debian_license_docs() -> list[str]:
    """The licences Debian ships verbatim in /usr/share/common-licenses (symlinked aliases read once)."""
    folder = need(COMMON_LICENSES, "apt-get install base-files")
    seen: set[Path] = set()
    docs: list[str] = []
    for path in sorted(folder.iterdir()):
        real = path.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        docs.extend(split_long(clean(read_text(real))))
    return docs
