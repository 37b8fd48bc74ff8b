"""The coordinator's side of trust in one place: what `merge`, `add` and `remove` check and record between
writing a merged model into its staging directory and publishing it.

In order, inside the staging directory (so a refusal leaves nothing at `--out`):
1. admission checks of the joining experts (`trust.admission`), reported through a callback, then enforced;
2. one record appended to the merge log (`trust.history`);
3. the coordinator's signature over every file (`trust.signing`), when it gave a key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flexolmo.coordinator.admission import AdmissionPolicy, AdmissionReport, assess, enforce
from flexolmo.trust.history import append_record
from flexolmo.trust.signing import TrustedKeys, sign_directory


@dataclass
class CoordinatorTrust:
    """What the coordinator trusts and checks in one merge, add or remove.

    - `trusted_keys`: members' public keys; packages must then be signed by the key of their own name.
    - `admission`: the limits and probe of the admission checks; None skips them (the CLI always checks).
    - `probe`: the public probe text as (files, split), or None with `no_probe_reason`.
    - `no_members_reason`: why members' domains are not probed when `admission` names no proxy files.
    - `judged`: the joining experts admission measures; None: all of them. The consortium service merges the
      experts admitted before with the one candidate, and judges the candidate only.
    - `sign_key`: the coordinator's private key; it signs the merged model's files.
    - `on_admission`: receives the admission report before it is enforced (the CLI prints it).
    """

    trusted_keys: TrustedKeys | None = None
    admission: AdmissionPolicy | None = None
    probe: tuple[list[Path], str] | None = None
    no_probe_reason: str = "no public probe text was given (--probe-data)"
    no_members_reason: str = "no member proxy files were given (--proxies)"
    judged: Sequence[str] | None = None
    sign_key: Path | None = None
    on_admission: Callable[[AdmissionReport], None] | None = None

    def seal(self, staging: Path, source: Path | None, operation: str, candidates: list[str],
             record: dict) -> dict:
        """Admit the candidates, log the operation and sign, inside `staging` before it is published; returns
        the log record."""
        judged = [name for name in candidates if self.judged is None or name in self.judged]
        if self.admission is not None and judged:
            report = assess(staging, judged, self.admission, self.probe, self.no_probe_reason,
                            self.no_members_reason)
            if self.on_admission is not None:
                self.on_admission(report)
            enforce(report)
            record = {**record, "admission": report.as_dict()}
        logged = append_record(staging, source, {"operation": operation, **record}, sign_key=self.sign_key)
        if self.sign_key is not None:
            sign_directory(staging, self.sign_key)
        return logged
