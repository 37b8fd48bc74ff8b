"""Members' proxy files in the service: sent over a signed request, checked, kept with the member, and handed
to admission, which probes each member's domain with them when another member's expert joins.

A proxy file (`flexolmo select-proxy`) names public documents that look like its owner's data, by hash. The
service resolves them in the public text fixed at init (`--public-data`). A file under another member's name,
naming a document the service does not hold, or too short to probe with is refused when it is sent, so that
one member's proxies can never make another member's admission fail later. Proxies of an expert trained with
DP are kept but not used (they were chosen from its private data outside DP), as `tune-router` refuses them.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flexolmo.coordinator.member_probe import MIN_PROXY_TOKENS
from flexolmo.coordinator.proxies import resolve_member_proxies
from flexolmo.core.errors import ProxyError
from flexolmo.model.anchor import load_tokenizer
from flexolmo.owner.package import read_manifest
from flexolmo.owner.proxy import read_proxies
from flexolmo.service.audit import append_event
from flexolmo.service.database import get_setting, in_transaction
from flexolmo.service.errors import Conflict, Forbidden, TooLarge
from flexolmo.service.models import Member
from flexolmo.service.registry import active_submissions, proxy_public_text
from flexolmo.service.storage import work_dir

MAX_PROXY_BYTES = 4 << 20  # a proxy file holds hashes only: 64 hex digits each, ~60,000 of them
TEXT_FIELD = "text"


@dataclass(frozen=True)
class ProbedMember:
    """An admitted member that admission merges beside a candidate: its package's digest and, when it sent
    any, its proxy file's JSON."""

    name: str
    package_sha256: str
    proxies: str | None


def _checked(body: bytes, member: str, public: list[Path], anchor: Path, work: Path) -> dict:
    """The proxy file sent by `member`, checked: its format, its name, every document found in `public`, and
    enough text for a probe window."""
    if len(body) > MAX_PROXY_BYTES:
        raise TooLarge(f"a proxy file of {len(body):,} bytes; the service takes at most {MAX_PROXY_BYTES:,}")
    with tempfile.TemporaryDirectory(prefix=".proxies-", dir=work) as scratch:
        path = Path(scratch) / "proxies.json"
        path.write_bytes(body)
        record = read_proxies(path)
    if record["name"] != member:
        raise Forbidden(f"member '{member}' cannot send the proxies of '{record['name']}': a member sends its own")
    texts = resolve_member_proxies([{**record, "file": "the proxy file sent"}], public, TEXT_FIELD)[member]
    tokenizer = load_tokenizer(anchor)
    tokens = sum(len(tokenizer(text).input_ids) + 1 for text in texts)  # +1: the EOS between documents
    if tokens < MIN_PROXY_TOKENS:
        raise ProxyError(f"the proxies name {len(texts)} document(s) of {tokens} tokens in all, too few to probe "
                         f"your domain with (at least {MIN_PROXY_TOKENS}); select more with `flexolmo select-proxy "
                         "--fraction`")
    return record


def receive_proxies(engine: Engine, member: Member, body: bytes) -> dict:
    """Check `member`'s proxy file and keep it (replacing an earlier one); an audit event records its digest."""
    with Session(engine) as session:
        public, anchor, work = proxy_public_text(session), Path(get_setting(session, "anchor")), work_dir(session)
    if not public:
        raise Conflict("this consortium was initialised without --public-data, the public text proxies are chosen "
                       "from: members' domains are not probed, and proxies cannot be resolved")
    work.mkdir(parents=True, exist_ok=True)
    record = _checked(body, member.name, public, anchor, work)
    digest = hashlib.sha256(body).hexdigest()

    def keep(session: Session) -> None:
        session.get(Member, member.name).proxies = body.decode("utf-8")
        append_event(session, "proxies-received", member.name, {"member": member.name, "sha256": digest,
                                                                "documents": len(record["proxies"])})

    in_transaction(engine, keep)
    return {"member": member.name, "proxies_sha256": digest, "documents": len(record["proxies"])}


def probed_members(session: Session, candidate: str) -> list[ProbedMember]:
    """Every member admitted now other than `candidate`, with its proxies (if any): what the candidate joins."""
    members = {row.name: row for row in session.query(Member).all()}
    return [ProbedMember(row.member, row.package_sha256, members[row.member].proxies)
            for row in active_submissions(session) if row.member != candidate]


def trained_with_dp(package: Path) -> bool:
    return bool((read_manifest(package).get("privacy") or {}).get("dp"))


def write_proxy_files(members: list[tuple[ProbedMember, Path]], directory: Path) -> tuple[list[Path], list[str]]:
    """The proxy files admission may probe with, written into `directory`, and the members left unprobed with
    why: no proxies sent, or an expert trained with DP."""
    files, unprobed = [], []
    for member, package in members:
        if member.proxies is None:
            unprobed.append(f"{member.name} (no proxies sent)")
        elif trained_with_dp(package):
            unprobed.append(f"{member.name} (trained with DP)")
        else:
            files.append(directory / f"{member.name}.proxies.json")
            files[-1].write_text(member.proxies)
    return files, unprobed


def proxies_summary(member: Member) -> dict | None:
    """What the status says of a member's proxies: their digest and size, never their hashes."""
    if member.proxies is None:
        return None
    return {"sha256": hashlib.sha256(member.proxies.encode()).hexdigest(),
            "documents": len(json.loads(member.proxies)["proxies"])}
