"""Admission of one uploaded package: the same verification and checks `flexolmo merge` runs, reused as is.

The package is authenticated with its member's key only, then merged, with the anchor and the experts admitted
before it (fetched from the store by digest), into a scratch model in which `coordinator.admission` measures
the candidate alone: its router rows, the public probe, and the probe of every admitted member's domain on that
member's proxies (`member_proxies`), with the candidate and without it. The scratch model is thrown away; what
is kept is the verdict with its reasons.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flexolmo.coordinator.admission import AdmissionPolicy, AdmissionReport
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import FlexOlmoError
from flexolmo.owner.package import authenticate_package, package_digest, read_manifest
from flexolmo.service.errors import Forbidden
from flexolmo.service.member_proxies import ProbedMember, write_proxy_files
from flexolmo.service.settings import DEFAULT_TOP_K
from flexolmo.trust.signing import PUBLIC_SUFFIX, TrustedKeys


@dataclass
class Outcome:
    """Admission's answer: the package digest, whether it is admitted, and the report with its reasons."""

    digest: str
    admitted: bool
    report: dict


@dataclass
class Joined:
    """What a candidate joins: the members admitted before it with their local, digest-checked packages, and
    the public text their proxies are resolved in (empty: members' domains are not probed)."""

    members: list[tuple[ProbedMember, Path]] = field(default_factory=list)
    public: list[Path] = field(default_factory=list)


def check_owner(package: Path, member: str) -> None:
    """A member submits its own expert only: the package's name must be the member's."""
    name = read_manifest(package)["name"]
    if name != member:
        raise Forbidden(f"member '{member}' cannot submit the expert '{name}': a member acts on its own expert only")


def _trusting(member: str, public_key_pem: str, directory: Path) -> TrustedKeys:
    directory.mkdir()
    (directory / f"{member}{PUBLIC_SUFFIX}").write_text(public_key_pem)
    return TrustedKeys(directory)


def _policy(joined: Joined, directory: Path) -> tuple[AdmissionPolicy, str]:
    """The admission limits with the members' proxy files (written into `directory`), and why members that are
    not probed are not."""
    if not joined.members:
        return AdmissionPolicy(), "no other member is admitted yet"
    if not joined.public:
        return AdmissionPolicy(), ("the consortium was initialised without --public-data, the public text "
                                   "members' proxies are chosen from")
    directory.mkdir()
    files, unprobed = write_proxy_files(joined.members, directory)
    reason = "no admitted member sent proxies: " + ", ".join(unprobed)
    return AdmissionPolicy(proxies=files, public=joined.public), reason


def admit(package: Path, member: str, public_key_pem: str, anchor: Path,
          probe: tuple[list[Path], str] | None, no_probe_reason: str, joined: Joined | None = None) -> Outcome:
    """Authenticate, verify and measure `package` inside the model it would join; every refusal is an outcome,
    not an exception. The members admitted before were authenticated at their own admission: their packages
    are verified again (by digest and contents), not re-authenticated, so a member's later key rotation cannot
    make another member's admission fail."""
    digest = package_digest(package) if (package / "manifest.json").is_file() else "0" * 64
    joined = joined or Joined()
    reports: list[AdmissionReport] = []
    with tempfile.TemporaryDirectory(prefix="flexolmo-admission-") as scratch:
        root = Path(scratch)
        try:
            authenticate_package(package, _trusting(member, public_key_pem, root / "keys"))
            policy, no_members_reason = _policy(joined, root / "proxies")
            trust = CoordinatorTrust(admission=policy, probe=probe, no_probe_reason=no_probe_reason,
                                     no_members_reason=no_members_reason, judged=[member],
                                     on_admission=reports.append)
            others = [path for _, path in joined.members]
            merge(anchor, [*others, package], root / "model", top_k=min(DEFAULT_TOP_K, len(others) + 2),
                  trust=trust)
        except FlexOlmoError as error:
            report = reports[0].as_dict() if reports else {}
            return Outcome(digest, False, {**report, "refused": str(error)})
    return Outcome(digest, True, reports[0].as_dict() if reports else {})
