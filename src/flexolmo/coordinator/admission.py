"""Admission checks: what the coordinator measures before an expert may join a merged model.

A member controls its router row, and the router row decides which tokens its expert gets. Scaled up, or
turned towards the public row's direction, it takes tokens of every domain from every other expert (the
softmax saturates and the other experts' weights underflow). So, before the merged model is published, each
candidate is measured inside the model it would join:
- router-row norms: per layer, the candidate row's norm over the public row's; the largest over layers;
- a probe on public held-out text the coordinator holds: the share of public tokens on which the candidate
  outranks every other expert (its router logit is the highest, whatever top-k), the share on which it is in
  the top-k, and the change in public bits per byte with it against without it (masked);
- a probe of every member's domain, on that member's proxies (`flexolmo select-proxy`: public documents that
  look like its data, resolved in the coordinator's public text): the share of the member's proxy tokens on
  which the member's own expert has the top router logit, and the member's proxy bits per byte, with the
  candidate and without it (masked). A candidate may not take a member's tokens from that member's expert,
  nor worsen its text beyond a limit: a member's row pushed further from the public row, under every norm
  limit, outranks that member's expert on every token it wins, while public text is unchanged. (The share of
  tokens on which the member's expert is merely in the top-k is reported too, but not judged: at top-2 the
  stolen expert stays second, and that share hardly moves.) Without proxy files, members' domains are not
  probed (the report says so).
A candidate beyond a limit is refused with one line naming the number and the limit; a NaN or infinite
number is always refused. The default limits come from the demo's honest experts
(benchmarks/docs/trust.md, admission checks), with margin; flags change them.

Public text is the one domain every member agrees the public expert should keep; an honest expert, trained
next to the frozen public expert on its own data (and some public text), wins few public tokens. A member's
proxies are the closest text to its domain the coordinator may read; an honest newcomer with other data takes
few of their tokens from the member's expert.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from flexolmo.coordinator.member_probe import MemberImpact, ProbeWindows, TopLogits, member_proxy_texts, probe_members
from flexolmo.core.errors import TrustError
from flexolmo.core.fileio import sha256_file
from flexolmo.core.progress import console, print_table
from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import MERGED_ROUTER
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import score_stream
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.moe import set_active_experts
from flexolmo.model.runtime import LoadedModel, load_model

# From the demo's five honest experts (benchmarks/docs/trust.md): their largest row-norm ratio is 0.99,
# top-logit share of public tokens 7.5% and public bits-per-byte rise 0.013; every hijacker measured 1.5-45,
# 66-84% and 0.13-0.16. Each limit is about 3x the honest maximum and below every hijacker but the
# public-aligned row for the norm (which the top-logit share catches).
DEFAULT_MAX_ROW_NORM_RATIO = 3.0
DEFAULT_MAX_PUBLIC_TOP_SHARE = 0.25
DEFAULT_MAX_PUBLIC_BPB_INCREASE = 0.05
# On members' proxies, over the 20 (honest expert, member) pairs of the same demo: the largest drop of the
# member's top-logit share is 0.074 and the largest proxy bits-per-byte rise 0.015; a member's row pushed from
# the public row (admitted by the checks above, +42% on the victim's held-out text) drops it by 0.214 (all
# the victim had). The drop limit is the midpoint; the rise limit, about 3x the honest maximum, catches every
# hijacker on every member (0.10-0.24) but not the pushed row (0.016-0.024), which the drop catches.
DEFAULT_MAX_MEMBER_TOP_DROP = 0.14
DEFAULT_MAX_MEMBER_BPB_INCREASE = 0.05


class AdmissionPolicy(BaseModel):
    """The coordinator's admission limits and the public probe's settings."""

    max_row_norm_ratio: float = Field(DEFAULT_MAX_ROW_NORM_RATIO, gt=0, allow_inf_nan=False,
                                      description="largest allowed (candidate row norm / public row norm) over layers")
    max_public_top_share: float = Field(DEFAULT_MAX_PUBLIC_TOP_SHARE, gt=0, le=1,
                                        description="largest allowed share of public tokens on which the candidate "
                                                    "has the highest router logit")
    max_public_bpb_increase: float = Field(DEFAULT_MAX_PUBLIC_BPB_INCREASE, ge=0, allow_inf_nan=False,
                                           description="largest allowed rise of public bits per byte with the "
                                                       "candidate against without it")
    max_member_top_drop: float = Field(DEFAULT_MAX_MEMBER_TOP_DROP, ge=0, le=1, allow_inf_nan=False,
                                       description="largest allowed drop of the share of a member's proxy tokens on "
                                                   "which its own expert has the top router logit, with the "
                                                   "candidate against without it")
    max_member_bpb_increase: float = Field(DEFAULT_MAX_MEMBER_BPB_INCREASE, ge=0, allow_inf_nan=False,
                                           description="largest allowed rise of a member's proxy bits per byte with "
                                                       "the candidate against without it")
    proxies: list[Path] = Field(default_factory=list, description="members' proxy files (`flexolmo select-proxy`), "
                                                                  "one per member whose domain is probed")
    public: list[Path] = Field(default_factory=list, description="the coordinator's public text the proxies were "
                                                                 "chosen from, in which they are resolved")
    probe_data: list[Path] = Field(default_factory=list, description="public held-out text for the probe")
    probe_sequences: int = Field(48, ge=1, description="windows of the probe text (and of each member's proxy "
                                                       "text) scored per pass")
    seq_len: int = Field(256, ge=2, description="tokens per probe window (capped at the model's context)")
    batch_size: int = Field(8, ge=1, description="probe windows per forward pass")
    text_field: str = Field("text", description="JSONL/parquet field of the probe text")
    device: str = Field("cpu", description="torch device of the probe")


@dataclass
class Verdict:
    """One candidate's measurements and the limits it broke (none: admitted)."""

    name: str
    row_norm_ratio: float
    public_top_share: float | None = None
    public_selected_share: float | None = None
    public_bpb_change: float | None = None
    members: list[MemberImpact] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def admitted(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"name": self.name, "row_norm_ratio": self.row_norm_ratio, "public_top_share": self.public_top_share,
                "public_selected_share": self.public_selected_share, "public_bpb_change": self.public_bpb_change,
                "members": [impact.as_dict() for impact in self.members], "admitted": self.admitted,
                "problems": self.problems}


@dataclass
class AdmissionReport:
    """Every candidate's verdict, what the public probe and the members' probe read (or why they were skipped),
    and their cost."""

    verdicts: list[Verdict]
    probe: str
    public_bits_per_byte: float | None
    seconds: float
    members_probe: str = "skipped"
    members_probed: bool = False

    def as_dict(self) -> dict:
        return {"verdicts": [verdict.as_dict() for verdict in self.verdicts], "probe": self.probe,
                "public_bits_per_byte": self.public_bits_per_byte, "members_probe": self.members_probe,
                "members_probed": self.members_probed, "seconds": self.seconds}


def recorded_public_heldout(anchor_dir: Path | str) -> tuple[list[Path], str] | None:
    """The public held-out text the anchor was trained with, when its record names files that still exist
    unchanged (found as recorded, or beside the anchor directory): (files, split)."""
    anchor_dir = Path(anchor_dir)
    record_file = anchor_dir / "flexolmo_pretrain.json"
    if not record_file.exists():
        return None
    try:
        record = json.loads(record_file.read_text())
        config, hashes = record["config"], record.get("inputs", {})
        recorded, split = (config["heldout"], "all") if config.get("heldout") else (config["data"], "heldout")
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    files = []
    for name in recorded:
        found = next((path for path in (Path(name), anchor_dir.parent / Path(name).name) if path.is_file()), None)
        if found is None or (name in hashes and sha256_file(found) != hashes[name]):
            return None
        files.append(found)
    return (files, split) if files else None


def row_norm_ratios(model_dir: Path, names: Sequence[str]) -> dict[str, float]:
    """Per expert, the largest over layers of its router row's norm over the public row's (slot 0); NaN or
    infinite values propagate."""
    reader = LazyReader(model_dir)
    per_layer = []
    while MERGED_ROUTER.format(layer=len(per_layer)) in reader:
        norms = reader.get(MERGED_ROUTER.format(layer=len(per_layer))).float().norm(dim=-1)
        per_layer.append(norms / norms[0])
    largest = torch.stack(per_layer).amax(dim=0)
    return {name: float(largest[index]) for index, name in enumerate(names)}


def _probe(loaded: LoadedModel, candidates: Sequence[str], policy: AdmissionPolicy, files: list[Path],
           split: str) -> tuple[dict[str, dict], float, str]:
    """Score the merged model on the public probe text with every expert, then without each candidate."""

    names = loaded.expert_names
    stream = load_token_stream(files, loaded.tokenizer, split, policy.text_field)
    seq_len = min(policy.seq_len, getattr(loaded.model.config, "max_position_embeddings", policy.seq_len))
    sequences = min(policy.probe_sequences, stream.num_sequences(seq_len))
    if sequences < 1:
        raise TrustError(f"the probe text ({', '.join(map(str, files))}) holds fewer than {seq_len + 1} tokens; "
                         "pass a longer public held-out file with --probe-data")

    def score(description: str):
        return score_stream(loaded.model, stream, seq_len, policy.batch_size, sequences, policy.device,
                            description, names)

    routing = TopLogits(loaded.model, len(names))
    with routing.recording():
        full = score("probe: every expert")
    results = {}
    for name in candidates:
        index = names.index(name)
        set_active_experts(loaded.model, [other != name for other in names])
        without = score(f"probe: without {name}")
        set_active_experts(loaded.model, [True] * len(names))
        results[name] = {"top": routing.top_share(index), "selected": full.routing["mean_share"][name],
                         "bpb_change": full.bits_per_byte - without.bits_per_byte}
    where = ", ".join(path.name for path in files)
    return results, full.bits_per_byte, f"{sequences} windows of {seq_len} tokens of {where}"


def _judge(verdict: Verdict, policy: AdmissionPolicy) -> None:
    checks = [
        ("its router rows are {}x the public row's norm", verdict.row_norm_ratio, policy.max_row_norm_ratio,
         "{:.2f}", "--max-row-norm-ratio"),
        ("it has the top router logit on {} of public tokens", verdict.public_top_share,
         policy.max_public_top_share, "{:.1%}", "--max-public-top-share"),
        ("public bits per byte rise by {} with it", verdict.public_bpb_change, policy.max_public_bpb_increase,
         "{:.4f}", "--max-public-bpb-increase"),
    ]
    for impact in verdict.members:
        checks += [
            (f"it takes member '{impact.member}''s proxy tokens from its own expert: the top router logit on "
             f"{impact.top_without:.1%} of them without it, {impact.top_with:.1%} with it (a drop of {{}})",
             impact.top_drop, policy.max_member_top_drop, "{:.3f}", "--max-member-top-drop"),
            (f"member '{impact.member}''s proxy bits per byte rise by {{}} with it ({impact.bpb_without:.4f} -> "
             f"{impact.bpb_with:.4f})", impact.bpb_increase, policy.max_member_bpb_increase, "{:.4f}",
             "--max-member-bpb-increase"),
        ]
    for words, value, limit, number, flag in checks:
        if value is None:
            continue
        if not math.isfinite(value):
            verdict.problems.append(words.format(value) + " (NaN or infinite values are always refused)")
        elif value > limit:
            verdict.problems.append(words.format(number.format(value)) +
                                    f", above the limit {number.format(limit)} (change it with {flag})")


def assess(model_dir: Path, candidates: Sequence[str], policy: AdmissionPolicy,
           probe: tuple[list[Path], str] | None, no_probe_reason: str = "",
           no_members_reason: str = "no member proxy files were given (--proxies)") -> AdmissionReport:
    """Measure every candidate inside the merged model written at `model_dir` and judge it against `policy`.

    `probe` is the public text to probe with, as (files, split); None skips the probe for `no_probe_reason`.
    `policy.proxies` (resolved in `policy.public`) probe the members' domains; none skips that probe for
    `no_members_reason`."""

    start = time.perf_counter()
    names = read_merged_info(model_dir).expert_names
    ratios = row_norm_ratios(model_dir, names)
    verdicts = {name: Verdict(name, ratios[name]) for name in candidates}
    texts = member_proxy_texts(model_dir, policy.proxies, policy.public, policy.text_field) if policy.proxies else {}
    public_bpb, described = None, f"skipped: {no_probe_reason}"
    members = f"not probed: {no_members_reason}"
    if candidates and (probe is not None or texts):
        loaded = load_model(model_dir, device=policy.device)
        if probe is not None:
            results, public_bpb, described = _probe(loaded, candidates, policy, *probe)
            for name, result in results.items():
                verdicts[name].public_top_share = result["top"]
                verdicts[name].public_selected_share = result["selected"]
                verdicts[name].public_bpb_change = result["bpb_change"]
        if texts:
            windows = ProbeWindows(policy.seq_len, policy.probe_sequences, policy.batch_size, policy.device,
                                   policy.text_field)
            impacts, members = probe_members(loaded, candidates, texts, windows)
            for name, found in impacts.items():
                verdicts[name].members = found
    for verdict in verdicts.values():
        _judge(verdict, policy)
    return AdmissionReport(list(verdicts.values()), described, public_bpb, time.perf_counter() - start,
                           members, bool(texts))


def enforce(report: AdmissionReport) -> None:
    """Refuse, in one line, the first candidate beyond a limit."""
    for verdict in report.verdicts:
        if not verdict.admitted:
            raise TrustError(f"expert '{verdict.name}' refused at admission: {'; '.join(verdict.problems)}")


def print_report(report: AdmissionReport) -> None:
    """The admission tables: one row per joining expert with its measured numbers and its verdict; one row per
    (joining expert, member) with the member's proxy numbers; or one warning line that members' domains were not
    probed."""

    def share(value):
        return "-" if value is None else f"{value:.1%}"

    rows = [[v.name, f"{v.row_norm_ratio:.2f}", share(v.public_top_share), share(v.public_selected_share),
             "-" if v.public_bpb_change is None else f"{v.public_bpb_change:+.4f}",
             "admitted" if v.admitted else "REFUSED"] for v in report.verdicts]
    print_table(f"admission checks (probe: {report.probe}; {report.seconds:.0f} s)",
                ["expert", "row norm / public", "top logit on public", "in top-k on public",
                 "public bits/byte change", "verdict"], rows)
    if not report.members_probed:
        console.print(f"[yellow]warning:[/] members' domains are {report.members_probe}", soft_wrap=True)
        return
    rows = [[v.name, m.member, f"{m.top_without:.1%} -> {m.top_with:.1%}", f"{m.top_drop:+.3f}",
             f"{m.share_without:.1%} -> {m.share_with:.1%}", f"{m.bpb_without:.4f} -> {m.bpb_with:.4f}",
             f"{m.bpb_increase:+.4f}"] for v in report.verdicts for m in v.members]
    print_table(f"members' domains ({report.members_probe})",
                ["joining expert", "member", "member's expert has the top logit, without -> with", "drop",
                 "in top-k, without -> with", "member's proxy bits/byte, without -> with", "rise"], rows)
