"""Admission of one uploaded package: the same verification and checks `flexolmo merge` runs, reused as is.

The package is verified by `load_package` against the anchor and authenticated with its member's key only,
then merged with the anchor into a scratch model in which `coordinator.admission` measures it. The scratch
model is thrown away; what is kept is the verdict with its reasons.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from flexolmo.coordinator.admission import AdmissionPolicy, AdmissionReport
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import FlexOlmoError
from flexolmo.owner.package import package_digest, read_manifest
from flexolmo.service.errors import Forbidden
from flexolmo.trust.signing import PUBLIC_SUFFIX, TrustedKeys


@dataclass
class Outcome:
    """Admission's answer: the package digest, whether it is admitted, and the report with its reasons."""

    digest: str
    admitted: bool
    report: dict


def check_owner(package: Path, member: str) -> None:
    """A member submits its own expert only: the package's name must be the member's."""
    name = read_manifest(package)["name"]
    if name != member:
        raise Forbidden(f"member '{member}' cannot submit the expert '{name}': a member acts on its own expert only")


def _trusting(member: str, public_key_pem: str, directory: Path) -> TrustedKeys:
    (directory / f"{member}{PUBLIC_SUFFIX}").write_text(public_key_pem)
    return TrustedKeys(directory)


def admit(package: Path, member: str, public_key_pem: str, anchor: Path,
          probe: tuple[list[Path], str] | None, no_probe_reason: str) -> Outcome:
    """Verify, authenticate and measure `package`; every refusal is an outcome, not an exception."""
    digest = package_digest(package) if (package / "manifest.json").is_file() else "0" * 64
    reports: list[AdmissionReport] = []
    with tempfile.TemporaryDirectory(prefix="flexolmo-admission-") as scratch:
        root = Path(scratch)
        (root / "keys").mkdir()
        trust = CoordinatorTrust(trusted_keys=_trusting(member, public_key_pem, root / "keys"),
                                 admission=AdmissionPolicy(), probe=probe,
                                 no_probe_reason=no_probe_reason,
                                 on_admission=reports.append)
        try:
            merge(anchor, [package], root / "model", top_k=2, trust=trust)
        except FlexOlmoError as error:
            report = reports[0].as_dict() if reports else {}
            return Outcome(digest, False, {**report, "refused": str(error)})
    return Outcome(digest, True, reports[0].as_dict() if reports else {})
