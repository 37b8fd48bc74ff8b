"""The demo's baselines under one protocol: the owners' dense experts trained as the protocol says, and every model
built from them (model soup, BTM, prompt routing, BTX), each scored on held-out text.

Paths: the FLOP-matched protocol keeps the demo's historical places (`dense/`, `dense_packages/`); the data-matched
one writes beside them with a `_data_matched` suffix. Models, validation and evaluation caches are under
`models/<protocol>/`, `validation/<protocol>/` and `evals/<protocol>/`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexolmo.coordinator.merge import merge
from flexolmo.core.progress import console
from flexolmo.data.tokens import load_token_stream
from flexolmo.experiments.baselines import (
    BranchTrainMergeEnsemble,
    PromptRoutedModel,
    SequenceBTM,
    dense_expert_package,
    model_soup,
    train_dense_expert,
)
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PROTOCOLS, PUBLIC, merged_model_dir
from flexolmo.experiments.demo_steps import Demo
from flexolmo.model.anchor import load_anchor


class ProtocolBaselines:
    """One protocol's dense experts and the baselines built from them."""

    def __init__(self, demo: Demo, protocol: str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        self.demo, self.config, self.protocol = demo, demo.config, protocol
        self.suffix = "" if protocol == "flop_matched" else f"_{protocol}"

    def name(self, method: str) -> str:
        """`method` under this protocol, as the caches and model directories name it."""
        return f"{self.protocol}/{method}"

    def dense_experts(self) -> dict[str, Path]:
        """Each owner's dense expert: the anchor's FFNs fine-tuned on the owner's text alone, as the protocol says."""
        optim = self.config.dense_optim(self.protocol, self.demo.anchor_config())
        dense = {}
        for domain in CLOSED_DOMAINS:
            dense[domain] = self.demo.out / f"dense{self.suffix}" / domain
            if not dense[domain].exists():
                console.rule(f"baseline: dense expert '{domain}', {PROTOCOLS[self.protocol]} ({optim.steps} steps of "
                             f"{optim.batch_size} owner sequences)")
                train_dense_expert(self.demo.anchor_dir, [self.demo.train_file(domain)], dense[domain], optim)
        return dense

    def unrestricted(self) -> Path:
        """The upper bound no consortium can build: the anchor's FFNs on all closed data pooled, as much owner text
        as the five dense experts together."""
        pooled = self.demo.out / f"dense{self.suffix}" / "unrestricted"
        if not pooled.exists():
            console.rule(f"upper bound: unrestricted (all closed data pooled), {PROTOCOLS[self.protocol]}")
            train_dense_expert(self.demo.anchor_dir, [self.demo.train_file(d) for d in CLOSED_DOMAINS], pooled,
                               self.config.dense_optim(self.protocol, self.demo.anchor_config(), len(CLOSED_DOMAINS)))
        return pooled

    def soup(self, dense: dict[str, Path]) -> Path:
        out = self.demo.out / "models" / self.protocol / "model_soup"
        if not out.exists():
            console.rule(f"baseline: model soup, {PROTOCOLS[self.protocol]}")
            model_soup(self.demo.anchor_dir, [self.demo.anchor_dir, *[dense[d] for d in CLOSED_DOMAINS]], out)
        return out

    def btx_untuned(self, dense: dict[str, Path]) -> Path:
        """The dense experts' FFNs merged next to the public FFN with FlexOlmo's router initialisation."""
        out = merged_model_dir(self.demo.out, self.name("btx_ffn"), None)
        if out.exists():
            return out
        console.rule(f"baseline: BTX from FFN-only dense experts, no coordinated training, {PROTOCOLS[self.protocol]}")
        anchor = load_anchor(self.demo.anchor_dir, dtype=getattr(torch, self.config.dtype), device=self.config.device)
        packages = []
        for domain in CLOSED_DOMAINS:
            target = self.demo.out / f"dense_packages{self.suffix}" / domain
            if not target.exists():
                stream = load_token_stream([self.demo.train_file(domain)], anchor.tokenizer, "all")
                dense_expert_package(anchor, dense[domain], stream, domain, target, "mean_hidden",
                                     self.config.seq_len, 64, self.config.seed)
            packages.append(target)
        merge(self.demo.anchor_dir, packages, out, self.config.top_k)
        return out

    def evaluate(self, proxies: list[Path], ablation: bool) -> tuple[dict[str, dict], dict]:
        """Held-out scores of every baseline of this protocol (and its extra rows with `ablation`), and the
        router-tuning choice the rule made for BTX on validation text."""
        demo, dense = self.demo, self.dense_experts()
        results = {"model_soup": demo.evaluated(self.name("model_soup"), demo.model_builder(self.soup(dense)))}
        results["btm"] = demo.evaluated(self.name("btm"), self._btm(dense, per_position=False))
        results["prompt_routing"] = demo.evaluated(self.name("prompt_routing"),
                                                   self._prompt_routing(dense, lambda: demo.prompt_router(proxies)))
        untuned = self.btx_untuned(dense)
        chosen, selection = demo.choose(self.name("btx_ffn"), untuned, proxies)
        scores = demo.evaluated_choice(self.name("btx_ffn"), untuned, chosen)
        results.update({method.split("/", 1)[1]: score for method, score in scores.items()})
        if ablation:
            results["btm_per_position"] = demo.evaluated(self.name("btm_per_position"),
                                                         self._btm(dense, per_position=True))
            results["prompt_routing_private"] = demo.evaluated(
                self.name("prompt_routing_private"), self._prompt_routing(dense, lambda: demo.prompt_router(None)))
            for domain in CLOSED_DOMAINS:
                results[f"dense_{domain}"] = demo.evaluated(self.name(f"dense_{domain}"),
                                                            demo.model_builder(dense[domain]))
            results["unrestricted"] = demo.evaluated(self.name("unrestricted"),
                                                     demo.model_builder(self.unrestricted()))
        return results, selection

    def _members(self, dense: dict[str, Path]) -> tuple[dict, object]:
        """The public model and the five dense experts, loaded, and the tokenizer."""
        anchor = self.demo.load(self.demo.anchor_dir)
        return {PUBLIC: anchor.model, **{d: self.demo.load(dense[d]).model for d in CLOSED_DOMAINS}}, anchor.tokenizer

    def _btm(self, dense: dict[str, Path], per_position: bool):
        def build():
            members, tokenizer = self._members(dense)
            ensemble = (BranchTrainMergeEnsemble(list(members.values()), self.config.btm_top_k) if per_position
                        else SequenceBTM(list(members.values()), self.config.btm_top_k, self.config.context_tokens))
            return ensemble, tokenizer, [], []
        return build

    def _prompt_routing(self, dense: dict[str, Path], fit_router):
        def build():
            members, tokenizer = self._members(dense)
            routed = PromptRoutedModel(members, fit_router(), tokenizer, prompt_tokens=self.config.context_tokens)
            return routed, tokenizer, [], []
        return build
