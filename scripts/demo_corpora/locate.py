"""Where the sources are installed, and their versions (for sources.json and ATTRIBUTION.md)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

from .settings import DEFAULT_VENV_GLOB, INSTALL_HINT, SourceMissing
from .text import read_text


def find_package_dir(name: str, site_packages: Path | None) -> Path:
    """Directory of an installed top-level package: --site-packages, else this interpreter, else the default venv."""
    candidates: list[Path] = []
    if site_packages is not None:
        candidates.append(site_packages / name)
    else:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(Path(p) for p in spec.submodule_search_locations)
        base, pattern = DEFAULT_VENV_GLOB
        candidates.extend(sorted(p / name for p in Path(base).glob(pattern)))
    for cand in candidates:
        if cand.is_dir():
            return cand
    where = f"in {site_packages}" if site_packages else "in this Python or /tmp/corpora-venv"
    raise SourceMissing(f"Python package {name!r} not found {where}: install it with `{INSTALL_HINT[name]}`")


def dist_version(pkg_dir: Path, dist_prefix: str) -> str:
    """Version of the distribution that installed pkg_dir, from its .dist-info folder name."""
    for info in sorted(pkg_dir.parent.glob(f"{dist_prefix}-*.dist-info")):
        return info.name[len(dist_prefix) + 1 : -len(".dist-info")]
    return "unknown"


def deb_version(package: str) -> str:
    """Installed version of a Debian package (for the attribution file)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def go_version(go_sqlite: Path) -> str:
    """GO.db version from the R package's DESCRIPTION (the .deb is unpacked, not installed, so dpkg has none)."""
    desc = go_sqlite.parent.parent / "DESCRIPTION"
    if desc.is_file():
        m = re.search(r"(?m)^Version: *(\S+)", read_text(desc))
        if m:
            return m.group(1)
    return "unknown"
