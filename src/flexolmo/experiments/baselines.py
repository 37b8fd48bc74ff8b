"""The paper's baselines. Each becomes a model (a module with `.logits`) that goes through `evaluate`.

Every merging baseline combines the same members as FlexOlmo: the public model (the anchor) and one dense
expert per owner, as in the paper, where the public model is one of the merged models.
- dense experts: the anchor with its FFNs fine-tuned on one owner's data (no router, no public expert), or, as
  in the paper, every weight of it trained (continued pretraining, `full_model`);
- unrestricted: the same on all closed data pooled (what sharing the data would buy);
- model soup: the members' FFNs averaged (everything else is the anchor's, shared by all members), or every
  weight averaged for full-model dense experts;
- Branch-Train-Merge (BTM) as the paper defines it (`SequenceBTM`): an ensemble of the members whose weights are
  chosen once per sequence from its context prefix (the posterior under a uniform prior: a softmax of each
  member's log-likelihood of the context), top-k members, renormalised, applied to every scored position;
- BTM per position (`BranchTrainMergeEnsemble`, ours, stronger): the same posterior recomputed at every position
  from all preceding tokens, scored ones included;
- BTX without coordination: the dense experts' FFNs merged next to the public FFN into a mixture through the
  same merge as FlexOlmo, with the same router initialisation, never trained next to the public expert; the
  paper's BTX (full-model dense experts) merges them onto a trunk whose other weights are the members' average
  (`btx_trunk`);
- prompt routing: one member per sequence, chosen by a classifier over MiniLM embeddings of its first tokens;
  the paper's classifier never saw private text (`PromptRouter.from_proxies`: the owners' public proxy documents
  and the rest of the public pool), ours reads the owners' documents (`PromptRouter.from_files`).
Both BTM and prompt routing read the first tokens of each window, so `routing_prefix_tokens` tells evaluation
not to score them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from flexolmo.coordinator.pretrain import PUBLIC_ROUTER_SEQUENCES
from flexolmo.coordinator.proxies import resolve_member_proxies
from flexolmo.core.fileio import atomic_directory, atomic_write_json
from flexolmo.core.provenance import software_versions, utc_now
from flexolmo.core.tensor_io import LazyReader
from flexolmo.core.weights import ANCHOR_FFN, PACKAGE_FFN, PACKAGE_ROUTER, parse
from flexolmo.data.documents import iter_documents
from flexolmo.data.tokens import TokenStream, load_token_stream
from flexolmo.model.anchor import Anchor, load_anchor, load_pretrained, load_tokenizer
from flexolmo.model.router_init import READS_PRIVATE_DATA, initial_rows, mean_direction_rows, save_public_rows
from flexolmo.owner.expert import anchor_record
from flexolmo.owner.package import write_package
from flexolmo.owner.proxy import load_minilm, read_proxies, text_sha256
from flexolmo.training.loop import OptimConfig, lm_loss_fn, train

DENSE_METADATA_FILE = "flexolmo_dense.json"


def dense_parameters(model: nn.Module, full_model: bool) -> list[tuple[str, nn.Parameter]]:
    """The parameters dense training updates: the FFNs only (everything else frozen), or every one."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(full_model or parse(ANCHOR_FFN, name) is not None)
        if param.requires_grad:
            trainable.append((name, param))
    return trainable


def dense_kind_name(full_model: bool) -> str:
    """How a dense model's metadata and packages name its training."""
    return "dense-full-model (continued pretraining)" if full_model else "dense-ffn-finetune"


def train_dense_expert(anchor_dir: Path, data: Sequence[Path], out: Path, optim: OptimConfig,
                       text_field: str = "text", split: str = "all", resume: bool = True,
                       full_model: bool = False) -> Path:
    """Fine-tune the anchor's FFNs (every weight with `full_model`) on `data`; save a dense transformers model at
    `out`."""
    anchor = load_anchor(anchor_dir, dtype=getattr(torch, optim.dtype), device=optim.device)
    stream = load_token_stream(list(data), anchor.tokenizer, split, text_field)
    work = out.with_name(out.name + ".ckpt")
    work.mkdir(parents=True, exist_ok=True)
    result = train(anchor.model, dense_parameters(anchor.model, full_model), stream, optim, work,
                   loss_fn=lm_loss_fn, resume=resume and (work / "checkpoint").exists(),
                   description=f"dense {out.name}")
    with atomic_directory(out) as staging:
        anchor.model.save_pretrained(str(staging))
        anchor.tokenizer.save_pretrained(str(staging))
        atomic_write_json(staging / DENSE_METADATA_FILE, {
            "kind": dense_kind_name(full_model), "anchor": anchor_record(anchor.fingerprint, anchor.config),
            "optim": optim.model_dump(),
            "tokens": optim.steps * optim.tokens_per_step, "losses": result.losses,
            "token_stream_sha256": stream.fingerprint(), "created": utc_now(), "versions": software_versions(),
        })
    shutil.rmtree(work)
    return out


def dense_expert_package(anchor: Anchor, dense_dir: Path, owner_stream: TokenStream, name: str, out: Path,
                         router_init: str, seq_len: int, router_sequences: int, seed: int) -> dict:
    """Package a dense expert's FFNs with a router row initialised as FlexOlmo's, for the BTX baselines. `anchor`
    is what the package merges onto: the anchor itself, or the paper's BTX trunk (`btx_trunk`)."""
    rows = initial_rows(router_init, anchor, owner_stream, seq_len, router_sequences, seed)
    reader = LazyReader(dense_dir)
    tensors = {}
    for layer, row in enumerate(rows):
        for proj in anchor.family.ffn_projections:
            tensors[PACKAGE_FFN.format(layer=layer, proj=proj)] = reader.get(ANCHOR_FFN.format(layer=layer, proj=proj))
        tensors[PACKAGE_ROUTER.format(layer=layer)] = row[None].float()
    kind = json.loads((dense_dir / DENSE_METADATA_FILE).read_text())["kind"]
    return write_package(out, name, tensors, {
        "anchor": anchor_record(anchor.fingerprint, anchor.config),
        "training": {"config": {"kind": f"{kind} (uncoordinated)"}, "tokens": 0, "public_share": 0.0,
                     "public_data": []},
        "privacy": {"dp": None, "router_init": router_init,
                    "router_row_from_private_data": router_init in READS_PRIVATE_DATA},
        "created": utc_now(), "versions": software_versions(),
    })


def model_soup(anchor_dir: Path, member_dirs: Sequence[Path], out: Path,
               weights: Sequence[float] | None = None, every_weight: bool = False) -> Path:
    """Average the members' FFNs (uniformly unless `weights` are given); all else is the anchor's. A member is any
    model directory that shares the anchor's other weights: the anchor itself or an FFN-only dense expert. With
    `every_weight`, every weight is averaged (full-model dense experts, whose other weights differ too)."""
    def averaged(name: str) -> bool:
        return every_weight or parse(ANCHOR_FFN, name) is not None

    model = _averaged(anchor_dir, member_dirs, weights, averaged)
    return _save_dense(model, anchor_dir, out, {"kind": "model-soup", "every_weight": every_weight,
                                                "weights": _weights(member_dirs, weights),
                                                "members": [Path(p).name for p in member_dirs]})


def btx_trunk(anchor_dir: Path, member_dirs: Sequence[Path], out: Path, public_data: Sequence[Path],
              seq_len: int) -> Path:
    """The paper's BTX shares every weight but the FFNs among its experts: the members' (public model and
    full-model dense experts) uniform average of those weights, around the anchor's own FFN (the public expert's).
    Written as an anchor the merge takes: the public router rows recomputed on the trunk, as the anchor's were on
    the anchor (the mean hidden direction of public text), since the averaged layers change every hidden state."""
    model = _averaged(anchor_dir, member_dirs, None, lambda name: parse(ANCHOR_FFN, name) is None)
    # In the anchor's dtype, as every merge writes its checkpoint; the rows are taken on the rounded weights.
    reader = LazyReader(anchor_dir)
    dtype = reader.dtype(next(name for name in reader.names() if parse(ANCHOR_FFN, name) is not None))
    model = model.to(dtype).float()
    stream = load_token_stream(list(public_data), load_tokenizer(anchor_dir), "all")
    rows = mean_direction_rows(model, stream, seq_len, PUBLIC_ROUTER_SEQUENCES)
    return _save_dense(model.to(dtype), anchor_dir, out,
                       {"kind": "btx-trunk", "members": [Path(p).name for p in member_dirs]},
                       lambda staging: save_public_rows(out, rows, staging=staging))


def _weights(member_dirs: Sequence[Path], weights: Sequence[float] | None) -> list[float]:
    return list(weights) if weights is not None else [1.0 / len(member_dirs)] * len(member_dirs)


def _averaged(anchor_dir: Path, member_dirs: Sequence[Path], weights: Sequence[float] | None, averaged) -> nn.Module:
    """The anchor with every parameter `averaged(name)` selects replaced by the members' weighted average."""
    weights = _weights(member_dirs, weights)
    model = load_pretrained(anchor_dir)
    readers = [LazyReader(path) for path in member_dirs]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if averaged(name):
                param.copy_(sum(w * reader.get(name).float() for w, reader in zip(weights, readers)))
    return model


def _save_dense(model: nn.Module, anchor_dir: Path, out: Path, metadata: dict, extra=None) -> Path:
    """`model` with the anchor's tokenizer and `metadata`, written to `out` at once (`extra(staging)` adds files)."""
    with atomic_directory(out) as staging:
        model.save_pretrained(str(staging))
        load_tokenizer(anchor_dir).save_pretrained(str(staging))
        atomic_write_json(staging / DENSE_METADATA_FILE, metadata)
        if extra is not None:
            extra(staging)
    return out


class BranchTrainMergeEnsemble(nn.Module):
    """BTM per position (ours): p(x_t) = sum_j w_j(t) p_j(x_t | x_<t), w_j(t) proportional to p_j(x_<t) over the
    top-k members.

    The weights are the posterior over members given the sequence so far (uniform prior), recomputed at every
    position from the members' own likelihoods of the preceding tokens; no router is trained.
    """

    def __init__(self, models: Sequence[nn.Module], top_k: int):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.top_k = min(top_k, len(models))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        log_probs = torch.stack([torch.log_softmax(m(input_ids=input_ids).logits.float(), -1) for m in self.members])
        # log p_j(x_{s+1} | x_<=s) for every position s, then the running sum: log p_j(x_1..x_t).
        context = torch.cat([torch.zeros_like(log_probs[:, :, :1, 0]),
                             _token_log_likelihoods(log_probs, input_ids).cumsum(-1)], dim=-1)
        return SimpleNamespace(logits=torch.logsumexp(_top_k_log_weights(context, self.top_k)[..., None] + log_probs,
                                                      dim=0))


class SequenceBTM(nn.Module):
    """BTM as the paper defines it: p(x_t) = sum_j w_j p_j(x_t | x_<t) with one weight vector per sequence,
    w_j proportional to p_j(x_1..x_{c-1} | x_0) over the top-k members (renormalised), where x_0..x_{c-1} are the
    sequence's first `context_tokens` tokens. Tokens after the context never change the weights.

    Every member reads the context; only the k kept members read the rest of the window. The context decides
    the weights, so `routing_prefix_tokens` tells evaluation not to score it."""

    def __init__(self, models: Sequence[nn.Module], top_k: int, context_tokens: int):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.top_k = min(top_k, len(models))
        self.context_tokens = context_tokens
        self.routing_prefix_tokens = context_tokens

    def log_weights(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(members, batch) log weights: -inf outside each sequence's top-k, log-softmax over the kept ones.
        With fewer than two context tokens nothing is predicted: all members tie, the first k are kept."""
        prefix = input_ids[:, : self.context_tokens]
        if prefix.shape[1] < 2:
            likelihood = torch.zeros(len(self.members), input_ids.shape[0], device=input_ids.device)
        else:
            likelihood = torch.stack([
                _token_log_likelihoods(torch.log_softmax(m(input_ids=prefix).logits.float(), -1)[None], prefix)[0]
                .sum(-1) for m in self.members])
        return _top_k_log_weights(likelihood, self.top_k)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        log_weights = self.log_weights(input_ids)
        mixture = None
        for member, member_log_weights in zip(self.members, log_weights):
            rows = torch.isfinite(member_log_weights).nonzero().flatten()
            if len(rows) == 0:
                continue
            log_probs = torch.log_softmax(member(input_ids=input_ids[rows]).logits.float(), -1)
            if mixture is None:
                mixture = log_probs.new_full(input_ids.shape + log_probs.shape[-1:], float("-inf"))
            mixture[rows] = torch.logaddexp(mixture[rows], member_log_weights[rows, None, None] + log_probs)
        return SimpleNamespace(logits=mixture)


def _token_log_likelihoods(log_probs: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(members, batch, length - 1): log p_j(x_{s+1} | x_<=s) from members' log-probabilities (members, batch,
    length, vocab)."""
    targets = input_ids[None, :, 1:, None].expand(log_probs.shape[0], -1, -1, 1)
    return log_probs[:, :, :-1].gather(-1, targets)[..., 0]


def _top_k_log_weights(log_likelihood: torch.Tensor, top_k: int) -> torch.Tensor:
    """Log posterior over members (dim 0, uniform prior) restricted to the top-k and renormalised; -inf elsewhere.
    Exactly k are kept: a stable sort breaks ties by member order, so the first member (the public model) first."""
    if top_k < log_likelihood.shape[0]:
        ranked = torch.sort(log_likelihood, dim=0, descending=True, stable=True).indices[:top_k]
        kept = torch.zeros_like(log_likelihood, dtype=torch.bool).scatter(0, ranked, True)
        log_likelihood = log_likelihood.masked_fill(~kept, float("-inf"))
    return torch.log_softmax(log_likelihood, dim=0)


class PromptRouter:
    """A logistic-regression classifier over all-MiniLM-L6-v2 embeddings: which member a text is like.
    `from_proxies` fits it on what a coordinator holds; `from_files` on documents (the owners', in our variant)."""

    def __init__(self, texts: dict[str, Sequence[str]], seed: int = 0, max_chars: int = 1000):
        from sklearn.linear_model import LogisticRegression

        self.embedder = load_minilm()
        self.labels = list(texts)
        self.documents = {label: len(documents) for label, documents in texts.items()}  # what it was fit on
        chosen = [(label, text[:max_chars]) for label, documents in texts.items() for text in documents]
        # Balanced classes: a class's prior must not come from how many documents happened to be at hand.
        self.classifier = LogisticRegression(max_iter=2000, random_state=seed, class_weight="balanced")
        self.classifier.fit(self.embed([text for _, text in chosen]), [label for label, _ in chosen])

    @classmethod
    def from_files(cls, domain_files: dict[str, Sequence[Path]], samples_per_domain: int, seed: int = 0,
                   text_field: str = "text") -> "PromptRouter":
        """Fit on up to `samples_per_domain` documents of each label's files, evenly spaced."""
        return cls({label: _spaced([doc.text for path in files for doc in iter_documents(path, text_field)],
                                   samples_per_domain) for label, files in domain_files.items()}, seed)

    @classmethod
    def from_proxies(cls, proxy_files: Sequence[Path], public: Sequence[Path], public_label: str,
                     samples_per_label: int, seed: int = 0, text_field: str = "text") -> "PromptRouter":
        """Fit on public text only: each owner's first `samples_per_label` proxy documents (`select-proxy` hashes,
        most owner-like first, resolved in the coordinator's `public` files) labelled with its name, and up to
        `samples_per_label` of the other public documents, evenly spaced, labelled `public_label`. Reads no owner
        file."""
        records = [{**read_proxies(path), "file": path} for path in proxy_files]
        members = resolve_member_proxies(records, list(public), text_field)
        proxied = {digest for record in records for digest in record["proxies"]}
        rest = [document.text for path in public for document in iter_documents(path, text_field)
                if text_sha256(document.text) not in proxied]
        texts = {public_label: _spaced(list(dict.fromkeys(rest)), samples_per_label),
                 **{name: documents[:samples_per_label] for name, documents in members.items()}}
        return cls(texts, seed)

    def embed(self, texts: Sequence[str]):
        return self.embedder.encode(list(texts), normalize_embeddings=True, batch_size=32, show_progress_bar=False)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return list(self.classifier.predict(self.embed(texts)))


def _spaced(documents: list[str], count: int) -> list[str]:
    """Up to `count` of `documents`, evenly spaced (deterministic)."""
    return documents[:: max(1, len(documents) // count)][:count]


class PromptRoutedModel(nn.Module):
    """One model per sequence, chosen by `router` from the text of the sequence's first `prompt_tokens` tokens.

    Those tokens decide the choice, so they must not be scored: `routing_prefix_tokens` says how many, and
    `flexolmo.evaluation.scoring` refuses to score this model with fewer context tokens."""

    def __init__(self, models: dict[str, nn.Module], router: PromptRouter, tokenizer, prompt_tokens: int = 32):
        super().__init__()
        self.members = nn.ModuleDict(models)
        self.router = router
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.routing_prefix_tokens = prompt_tokens
        self.choices: list[str] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        prompts = self.tokenizer.batch_decode(input_ids[:, : self.prompt_tokens])
        choices = self.router.predict(prompts)
        self.choices += choices
        logits = None
        for label in sorted(set(choices)):
            rows = torch.tensor([i for i, choice in enumerate(choices) if choice == label])
            chosen = self.members[label](input_ids=input_ids[rows]).logits
            if logits is None:
                logits = chosen.new_zeros(input_ids.shape + (chosen.shape[-1],))
            logits[rows] = chosen
        return SimpleNamespace(logits=logits)

