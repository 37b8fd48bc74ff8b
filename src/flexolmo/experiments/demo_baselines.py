"""The demo's baselines under one protocol: the owners' dense experts trained as the protocol says, and every model
built from them (model soup, BTM, prompt routing, BTX), each scored on held-out text.

Dense experts train their FFNs only (the default rows) or, as in the paper, every weight (`full_model`: the
paper's model soup, BTM, prompt routing and BTX, rows of `--ablation`).

Paths: the FLOP-matched protocol keeps the demo's historical places (`dense/`, `dense_packages/`); the data-matched
one writes beside them with a `_data_matched` suffix, full-model dense experts with `_full` before it. Models,
validation and evaluation caches are under `models/<protocol>/`, `validation/<protocol>/` and `evals/<protocol>/`.
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
    btx_trunk,
    dense_expert_package,
    model_soup,
    train_dense_expert,
)
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PROTOCOLS, PUBLIC, ROWS, merged_model_dir
from flexolmo.experiments.demo_steps import Demo
from flexolmo.model.anchor import load_anchor


class ProtocolBaselines:
    """One protocol's dense experts and the baselines built from them; with `full_model`, the paper's dense experts
    (every weight trained) and the paper's four baselines built from them."""

    def __init__(self, demo: Demo, protocol: str, full_model: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        self.demo, self.config, self.protocol, self.full_model = demo, demo.config, protocol, full_model
        self.suffix = ("_full" if full_model else "") + ("" if protocol == "flop_matched" else f"_{protocol}")

    def name(self, method: str) -> str:
        """`method` under this protocol, as the caches and model directories name it."""
        return f"{self.protocol}/{method}"

    def dense_experts(self) -> dict[str, Path]:
        """Each owner's dense expert: the anchor's FFNs (or every weight) trained on the owner's text alone, as the
        protocol says."""
        optim = self.config.dense_optim(self.protocol, self.demo.anchor_config(), full_model=self.full_model)
        what = "full-model dense expert" if self.full_model else "dense expert"
        dense = {}
        for domain in CLOSED_DOMAINS:
            dense[domain] = self.demo.out / f"dense{self.suffix}" / domain
            if not dense[domain].exists():
                console.rule(f"baseline: {what} '{domain}', {PROTOCOLS[self.protocol]} ({optim.steps} steps of "
                             f"{optim.batch_size} owner sequences)")
                train_dense_expert(self.demo.anchor_dir, [self.demo.train_file(domain)], dense[domain], optim,
                                   full_model=self.full_model)
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

    def method(self, baseline: str) -> str:
        """The row name of `baseline` (model_soup, btm, prompt_routing, btx) for this kind of dense expert."""
        if baseline == "btx":
            return "btx" if self.full_model else "btx_ffn"
        return f"{baseline}_full" if self.full_model else baseline

    def soup(self, dense: dict[str, Path]) -> Path:
        out = self.demo.out / "models" / self.protocol / self.method("model_soup")
        if not out.exists():
            console.rule(f"baseline: {self.method('model_soup')}, {PROTOCOLS[self.protocol]}")
            model_soup(self.demo.anchor_dir, [self.demo.anchor_dir, *[dense[d] for d in CLOSED_DOMAINS]], out,
                       every_weight=self.full_model)
        return out

    def trunk(self, dense: dict[str, Path]) -> Path:
        """What BTX merges the experts onto: the anchor; for full-model dense experts the paper's trunk, every
        non-FFN weight the members' average (`baselines.btx_trunk`)."""
        if not self.full_model:
            return self.demo.anchor_dir
        out = self.demo.out / "models" / self.protocol / "btx_trunk"
        if not out.exists():
            console.rule(f"baseline: the paper's BTX trunk (non-FFN weights averaged), {PROTOCOLS[self.protocol]}")
            btx_trunk(self.demo.anchor_dir, [self.demo.anchor_dir, *[dense[d] for d in CLOSED_DOMAINS]], out,
                      [self.demo.train_file(PUBLIC)], self.config.seq_len)
        return out

    def btx_untuned(self, dense: dict[str, Path]) -> Path:
        """The dense experts' FFNs merged next to the public FFN with FlexOlmo's router initialisation (on the
        trunk's hidden states)."""
        out = merged_model_dir(self.demo.out, self.name(self.method("btx")), None)
        if out.exists():
            return out
        trunk = self.trunk(dense)
        console.rule(f"baseline: {ROWS[self.method('btx')].label}, {PROTOCOLS[self.protocol]}")
        anchor = load_anchor(trunk, dtype=getattr(torch, self.config.dtype), device=self.config.device)
        packages = []
        for domain in CLOSED_DOMAINS:
            target = self.demo.out / f"dense_packages{self.suffix}" / domain
            if not target.exists():
                stream = load_token_stream([self.demo.train_file(domain)], anchor.tokenizer, "all")
                dense_expert_package(anchor, dense[domain], stream, domain, target, "mean_hidden",
                                     self.config.seq_len, 64, self.config.seed)
            packages.append(target)
        merge(trunk, packages, out, self.config.top_k)
        return out

    def evaluate(self, proxies: list[Path], ablation: bool) -> tuple[dict[str, dict], dict]:
        """Held-out scores of every baseline of this protocol (and its extra rows with `ablation`), and the
        router-tuning choice the rule made for BTX on validation text."""
        demo, dense, method = self.demo, self.dense_experts(), self.method
        results = {method("model_soup"): demo.evaluated(self.name(method("model_soup")),
                                                        demo.model_builder(self.soup(dense)))}
        results[method("btm")] = demo.evaluated(self.name(method("btm")), self._btm(dense, per_position=False))
        results[method("prompt_routing")] = demo.evaluated(
            self.name(method("prompt_routing")), self._prompt_routing(dense, lambda: demo.prompt_router(proxies)))
        untuned = self.btx_untuned(dense)
        chosen, selection = demo.choose(self.name(method("btx")), untuned, proxies)
        scores = demo.evaluated_choice(self.name(method("btx")), untuned, chosen)
        results.update({name.split("/", 1)[1]: score for name, score in scores.items()})
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
