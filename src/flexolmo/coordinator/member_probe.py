"""The probe of members' domains at admission: each member's proxy text (`flexolmo select-proxy`: public
documents that look like its data, resolved in the coordinator's public text) scored inside the merged model with
every expert, then without each joining candidate (masked), through the one scoring path (`score_stream`).

What a candidate does to a member is read from two numbers, with it against without it: the share of the
member's proxy tokens on which the member's own expert has the top router logit (a candidate that outranks the
member's expert on the member's tokens takes them, whatever the top-k), and the member's proxy bits per byte.
The share on which the member's expert is merely in the top-k is kept too: at top-2, an expert outranked on its
own tokens usually stays second, so that share says little about theft. `admission` judges the numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo.coordinator.proxies import check_proxies, resolve_member_proxies, write_proxy_text
from flexolmo.core.errors import ProxyError
from flexolmo.data.tokens import TokenStream, load_token_stream
from flexolmo.evaluation.scoring import score_stream
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.moe import moe_blocks, set_active_experts
from flexolmo.model.runtime import LoadedModel

# The fewest tokens of a member's proxy text that make one scored window (two tokens predicted from the first).
MIN_PROXY_TOKENS = 3


@dataclass(frozen=True)
class ProbeWindows:
    """How probe text is cut and scored: window length (capped at the model's context and the text), windows
    scored per pass at most, windows per forward pass, torch device, and the text field of the files."""

    seq_len: int
    max_sequences: int
    batch_size: int
    device: str
    text_field: str


class TopLogits:
    """Forward hooks on every MoE block: per expert, the tokens on which its router logit is the highest (over
    the active experts: a masked expert's logit is -inf)."""

    def __init__(self, model: torch.nn.Module, num_experts: int):

        self.blocks = list(moe_blocks(model))
        self.top = torch.zeros(num_experts)
        self.tokens = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [block.register_forward_hook(self._hook) for block in self.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, block, args, _output) -> None:
        logits = block.route(args[0]).logits
        winners = logits.reshape(-1, logits.shape[-1]).argmax(dim=-1)
        self.top += torch.bincount(winners, minlength=len(self.top)).float().cpu()
        self.tokens += winners.numel()

    def top_share(self, index: int) -> float:
        return float(self.top[index] / max(self.tokens, 1))


@dataclass
class MemberImpact:
    """What one candidate does to one member's domain, measured on the member's proxy text, with the candidate and
    without it (masked): the share of its tokens (over tokens and layers) on which the member's own expert has
    the top router logit (`top_*`, judged) or is in the top-k (`share_*`, reported), and its bits per byte."""

    member: str
    tokens: int
    top_with: float
    top_without: float
    share_with: float
    share_without: float
    bpb_with: float
    bpb_without: float

    @property
    def top_drop(self) -> float:
        return self.top_without - self.top_with

    @property
    def bpb_increase(self) -> float:
        return self.bpb_with - self.bpb_without

    def as_dict(self) -> dict:
        return {"member": self.member, "tokens": self.tokens, "top_with": self.top_with,
                "top_without": self.top_without, "top_drop": self.top_drop, "share_with": self.share_with,
                "share_without": self.share_without, "bpb_with": self.bpb_with, "bpb_without": self.bpb_without,
                "bpb_increase": self.bpb_increase}


def member_proxy_texts(model_dir: Path, proxies: list[Path], public: list[Path],
                       text_field: str) -> dict[str, list[str]]:
    """Each member's proxy texts: the proxy files checked against the model (one per member, members only) and
    resolved in `public`; one-line ProxyError otherwise."""
    if not public:
        raise ProxyError("members' proxy files are resolved in the public text they were chosen from; pass it with "
                         "--public-data")
    records = check_proxies(read_merged_info(model_dir), proxies, model_label="the merged model")
    return resolve_member_proxies(records, public, text_field)


def _member_streams(loaded: LoadedModel, texts: dict[str, list[str]], text_field: str) -> dict[str, TokenStream]:
    with tempfile.TemporaryDirectory(prefix="flexolmo-proxies-") as directory:
        streams = {}
        for member, member_texts in texts.items():
            path = Path(directory) / f"{member}.jsonl.gz"
            write_proxy_text(member_texts, path)
            streams[member] = load_token_stream([path], loaded.tokenizer, "all", text_field)
    return streams


def probe_members(loaded: LoadedModel, candidates: Sequence[str], texts: dict[str, list[str]],
                  windows: ProbeWindows) -> tuple[dict[str, list[MemberImpact]], str]:
    """Score every member's proxy text with every expert, then without each candidate other than the member:
    per candidate, its impact on each member. The same scoring path and routing counters as the public probe."""

    names = loaded.expert_names
    impacts: dict[str, list[MemberImpact]] = {name: [] for name in candidates}
    context = getattr(loaded.model.config, "max_position_embeddings", windows.seq_len)
    sizes = []
    for member, stream in _member_streams(loaded, texts, windows.text_field).items():
        # A member's proxies may be short: windows shrink to fit, so every member is probed.
        seq_len = min(windows.seq_len, context, stream.num_tokens - 1)
        if stream.num_tokens < MIN_PROXY_TOKENS:
            raise ProxyError(f"the proxies of '{member}' hold {stream.num_tokens} tokens, too few to probe its "
                             "domain; ask its owner for a larger proxy set")
        sequences = min(windows.max_sequences, stream.num_sequences(seq_len))

        def score(description: str, stream=stream, seq_len=seq_len, sequences=sequences):
            top = TopLogits(loaded.model, len(names))
            with top.recording():
                scored = score_stream(loaded.model, stream, seq_len, windows.batch_size, sequences,
                                      windows.device, description, names)
            return scored, top.top_share(names.index(member))

        full, full_top = score(f"members: {member}'s proxies, every expert")
        for name in candidates:
            if name == member:
                continue
            set_active_experts(loaded.model, [other != name for other in names])
            without, without_top = score(f"members: {member}'s proxies without {name}")
            set_active_experts(loaded.model, [True] * len(names))
            impacts[name].append(MemberImpact(member, full.tokens, full_top, without_top,
                                              full.routing["mean_share"][member],
                                              without.routing["mean_share"][member], full.bits_per_byte,
                                              without.bits_per_byte))
        sizes.append(f"{member} {full.tokens:,} tokens")
    unprobed = [name for name in names[1:] if name not in texts]
    described = "proxies of " + ", ".join(sizes) + (f"; no proxies of {', '.join(unprobed)}" if unprobed else "")
    return impacts, described
