"""The demo's shared steps: the owners' experts and proxies, the coordinator's merge and the rule that chooses
router tuning on validation text, and scoring on held-out text (`flexolmo.experiments.demo` runs them)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from flexolmo.coordinator.admission import AdmissionPolicy, print_report
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.coordinator.router_tuning import TuneConfig, tune_router
from flexolmo.core.errors import DataError
from flexolmo.core.fileio import atomic_write_bytes, atomic_write_json
from flexolmo.core.progress import console
from flexolmo.data.documents import iter_documents
from flexolmo.data.public_sample import anchor_public_sample
from flexolmo.evaluation.scoring import EvalSettings, evaluate
from flexolmo.experiments.baselines import PromptRouter
from flexolmo.experiments.demo_config import (
    CLOSED_DOMAINS,
    MIXED,
    NO_TUNING,
    PUBLIC,
    DemoConfig,
    merged_model_dir,
)
from flexolmo.model.anchor import read_config
from flexolmo.model.runtime import LoadedModel, load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.proxy import ProxyConfig, select_proxies
from flexolmo.training.loop import OptimConfig


class Demo:
    """The demo's shared steps (owners, coordinator, scoring); each is skipped when its output already exists.
    The protocol-dependent baselines are `demo_baselines.ProtocolBaselines`."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = config.out
        self.anchor_dir = config.data_dir / "anchor"
        # Windows of 24: on 2 CPU cores a third less CPU time than 8 (larger matmuls), the same sums to 1e-7.
        self.settings = EvalSettings(seq_len=config.seq_len, batch_size=24, max_sequences=config.eval_max_sequences,
                                      split="all", context_tokens=config.context_tokens, device=config.device,
                                      dtype=config.dtype)
        self._routers: dict[str, PromptRouter] = {}

    def load(self, path: Path, exclude: Sequence[str] = (), router_bias: bool = False) -> LoadedModel:
        """A model of the demo, on the demo's device and in its dtype."""
        return load_model(path, exclude=list(exclude), dtype=getattr(torch, self.config.dtype),
                          device=self.config.device, router_bias=router_bias)

    def train_file(self, domain: str) -> Path:
        return self.config.data_dir / f"{domain}.train.jsonl.gz"

    def heldout_file(self, domain: str) -> Path:
        return self.config.data_dir / f"{domain}.heldout.jsonl.gz"

    def validation_file(self, domain: str) -> Path:
        return self.config.data_dir / f"{domain}.validation.jsonl.gz"

    def public_pool(self) -> Path:
        """The coordinator's public text: the anchor's published sample, where owners pick proxies."""
        return self.anchor_dir / "flexolmo_public_sample.jsonl.gz"

    def anchor_config(self) -> dict:
        return read_config(self.anchor_dir)

    def check_inputs(self) -> None:
        missing = [str(p) for d in (PUBLIC, *CLOSED_DOMAINS)
                   for p in (self.train_file(d), self.validation_file(d), self.heldout_file(d)) if not p.exists()]
        if anchor_public_sample(self.anchor_dir) is None:
            missing.append(str(self.public_pool()))
        if missing or not (self.anchor_dir / "config.json").exists():
            raise DataError(f"shipped demo data is missing under {self.config.data_dir} "
                            f"({', '.join(missing) or 'anchor'}); run from a full clone of the repository")
        self.out.mkdir(parents=True, exist_ok=True)
        settings_file = self.out / "demo_config.json"
        digest = self.config.digest()
        if settings_file.exists() and json.loads(settings_file.read_text()).get("digest") != digest:
            raise DataError(f"{self.out} holds a demo run with other settings or of an older flexolmo; pass another "
                            "--out or delete it")
        atomic_write_json(settings_file, {"digest": digest, "config": self.config.model_dump(mode="json")})

    # -- owners -----------------------------------------------------------------------------------------
    def train_experts(self, variant: str = "", optim: OptimConfig | None = None, **settings) -> dict[str, Path]:
        """The five owners' experts; `variant` names a set trained with another `optim` or other `settings` (the
        ablation). Each owner's own before/after check reads its validation text: held-out text is for the table."""
        packages = {}
        for domain in CLOSED_DOMAINS:
            packages[domain] = self.out / f"experts{variant}" / domain
            if not packages[domain].exists():
                console.rule(f"owner '{domain}' trains its expert{' (' + variant.strip('_') + ')' if variant else ''}")
                options = dict(anchor=self.anchor_dir, data=[self.train_file(domain)],
                               heldout=[self.validation_file(domain)], name=domain, out=packages[domain],
                               eval_max_sequences=self.config.eval_max_sequences,
                               public_share=self.config.public_share,  # of the anchor's public sample, the default
                               optim=optim or self.config.optim(self.config.expert_steps))
                train_expert(ExpertConfig(**{**options, **settings}), resume=self._resumable(packages[domain]))
        return packages

    def select_proxies(self, directory: str = "proxies", **options) -> list[Path]:
        """Each owner, alone, names the public documents most like its data (content hashes, no text), into
        `out/directory`. `options` (embedder, fraction) override select-proxy's defaults: the router-tuning
        benchmark compares them."""
        files = []
        for domain in CLOSED_DOMAINS:
            out = self.out / directory / f"{domain}.json"
            if not out.exists():
                console.rule(f"owner '{domain}' selects public proxy documents")
                select_proxies(ProxyConfig(data=[self.train_file(domain)], public=[self.public_pool()], name=domain,
                                           out=out, anchor=self.anchor_dir, device=self.config.device,
                                           seed=self.config.seed, **{**self._proxy_sizes(), **options}))
            files.append(out)
        return files

    def _proxy_sizes(self) -> dict:
        return {"max_documents": 24, "fraction": 0.05} if self.config.quick else {}

    def _resumable(self, out: Path) -> bool:
        return (out.with_name(out.name + ".ckpt") / "checkpoint").exists()

    # -- coordinator -------------------------------------------------------------------------------------
    def merge_flexolmo(self, packages: dict[str, Path], proxies: list[Path]) -> Path:
        """The five experts merged, after the admission checks: public validation text, and each member's
        proxies (resolved in the public pool they were chosen from) so no expert takes another's domain."""
        out = merged_model_dir(self.out, "flexolmo", None)
        if not out.exists():
            console.rule("coordinator merges the five experts (admission checks on public validation text and on "
                         "every member's proxies)")
            policy = AdmissionPolicy(proxies=proxies, public=[self.public_pool()])
            trust = CoordinatorTrust(admission=policy, probe=([self.validation_file(PUBLIC)], "all"),
                                     on_admission=self._show_admission)
            merge(self.anchor_dir, [packages[d] for d in CLOSED_DOMAINS], out, self.config.top_k, trust=trust)
        return out

    def merged(self, packages: dict[str, Path], variant: str) -> Path:
        out = self.out / "models" / f"flexolmo_{variant}_untuned"
        if not out.exists():
            merge(self.anchor_dir, [packages[d] for d in CLOSED_DOMAINS], out, self.config.top_k)
        return out

    def choose(self, method: str, untuned: Path, proxies: list[Path]) -> tuple[Path, dict]:
        """The rule of docs/demo.md, fixed before any run: the candidates are the untuned model, then router
        tuning at each learning rate tried, smallest first; the one with the lowest closed-domain average bits per
        byte on the `*.validation` files is kept; a tie keeps the earlier candidate (untuned, then the smaller lr).
        `method` names the models (`merged_model_dir`). Returns the kept model and every validation score."""
        candidates = {NO_TUNING: untuned}
        for lr in sorted(self.config.tune_lrs):
            candidates[f"{lr:g}"] = self.tuned(untuned, merged_model_dir(self.out, method, lr), proxies, lr)
        scores = {name: self.validated(self._validation_name(method, path), path)
                  for name, path in candidates.items()}
        best = min(scores, key=lambda name: scores[name]["closed_average"])  # min keeps the first of equals
        return candidates[best], {"chosen_lr": None if best == NO_TUNING else float(best), "validation": scores}

    def _validation_name(self, method: str, path: Path) -> str:
        """A validation cache name unique across protocols (`method` may be `protocol/name`)."""
        return str(Path(method).parent / path.name) if "/" in method else path.name

    def tuned(self, untuned: Path, out: Path, proxies: list[Path], lr: float) -> Path:
        """`untuned` with its router rows tuned at `lr` on `proxies` and public text, written to `out` (once)."""
        if not out.exists():
            console.rule(f"coordinator tunes the router rows of {untuned.name} (lr {lr:g}, {self.config.tune_steps} "
                         "steps) on the owners' proxies and public text")
            optim = self.config.optim(self.config.tune_steps).model_copy(update={"lr": lr})
            tune_router(TuneConfig(model=untuned, public=[self.public_pool()], proxies=proxies, out=out,
                                   optim=optim), resume=self._resumable(out))
        return out

    def validated(self, name: str, model: Path) -> dict:
        """Bits per byte of `model` on the validation text of every domain (cached), for choices only."""
        cache = self.out / "validation" / f"{name}.json"
        if not cache.exists():
            console.rule(f"validation score of {name}")
            atomic_write_json(cache, self.validation_scores(self.load(model), name))
        return json.loads(cache.read_text())

    def validation_scores(self, loaded: LoadedModel, name: str) -> dict:
        """Bits per byte of a loaded model on every domain's validation text, and the closed-domain average."""
        files = {d: [self.validation_file(d)] for d in (PUBLIC, *CLOSED_DOMAINS)}
        result = evaluate(loaded.model, loaded.tokenizer, files, self.settings, loaded.expert_names, name)
        scores = {d: score.bits_per_byte for d, score in result.domains.items()}
        scores["closed_average"] = sum(scores[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
        return scores

    def prompt_router(self, proxies: list[Path] | None) -> PromptRouter:
        """A prompt router over the public model and the owners, fit once per run (it depends on no protocol).
        With `proxies`, the paper's: fit on what a coordinator holds, each owner's proxy documents and the rest of
        its public pool. Without, ours: fit on the owners' own documents, which a coordinator cannot hold."""
        kind = "public" if proxies is not None else "private"
        if kind not in self._routers:
            console.rule(f"fitting the prompt router on {'public proxies' if proxies is not None else 'owner text'}")
            self._routers[kind] = (
                PromptRouter.from_proxies(proxies, [self.public_pool()], PUBLIC, self.config.router_samples,
                                          self.config.seed) if proxies is not None else
                PromptRouter.from_files({PUBLIC: [self.train_file(PUBLIC)],
                                         **{d: [self.train_file(d)] for d in CLOSED_DOMAINS}},
                                        self.config.router_samples, self.config.seed))
            # What it was fit on, for the record: documents per label (the public one's proxies are public text).
            atomic_write_json(self.out / "prompt_routers" / f"{kind}.json", {
                "fit_on": "owners' proxy documents and the public pool" if proxies is not None else "owners' documents",
                "documents": self._routers[kind].documents})
        return self._routers[kind]

    def _show_admission(self, report) -> None:
        print_report(report)
        atomic_write_json(self.out / "admission.json", report.as_dict())

    # -- evaluation on held-out text, for the tables only -------------------------------------------------
    def eval_domains(self) -> dict[str, list[Path]]:
        domains = {PUBLIC: [self.heldout_file(PUBLIC)]}
        domains.update({d: [self.heldout_file(d)] for d in CLOSED_DOMAINS})
        domains[MIXED] = [self.mixed_file()]
        return domains

    def mixed_file(self) -> Path:
        """Held-out documents stitched from two closed domains: first part from one, second from the next."""
        path = self.out / "data" / "mixed.heldout.jsonl.gz"
        if path.exists():
            return path
        docs = {d: [doc.text for doc in iter_documents(self.heldout_file(d))] for d in CLOSED_DOMAINS}
        lines = []
        for i in range(self.config.mixed_documents):
            first, second = CLOSED_DOMAINS[i % 5], CLOSED_DOMAINS[(i + 1) % 5]
            a, b = docs[first][i % len(docs[first])], docs[second][i % len(docs[second])]
            lines.append(json.dumps({"id": f"mixed-{first}-{second}-{i}", "text": a[:800] + "\n\n" + b[:800]}))
        atomic_write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
        return path

    def model_builder(self, path: Path, exclude: Sequence[str] = (), router_bias: bool = False):
        def build():
            loaded = self.load(path, exclude, router_bias)
            return loaded.model, loaded.tokenizer, loaded.expert_names, list(exclude)
        return build

    def evaluated(self, method: str, build) -> dict:
        """The cached evaluation of `method` (a name, or `protocol/name`), or run it: `build()` returns (module,
        tokenizer, expert names, excluded)."""
        cache = self.out / "evals" / f"{method}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        console.rule(f"evaluating {method}")
        model, tokenizer, experts, excluded = build()
        result = evaluate(model, tokenizer, self.eval_domains(), self.settings, experts, method, excluded)
        atomic_write_json(cache, result.as_dict())
        return result.as_dict()

    def evaluated_choice(self, method: str, untuned: Path, chosen: Path) -> dict[str, dict]:
        """`method_untuned` and `method` (the model the rule kept). Where the rule kept the untuned model, the method
        *is* that model: its scores, not a second run."""
        results = {f"{method}_untuned": self.evaluated(f"{method}_untuned", self.model_builder(untuned))}
        results[method] = (results[f"{method}_untuned"] if chosen == untuned
                           else self.evaluated(method, self.model_builder(chosen)))
        return results

    def opt_out(self, merged: Path) -> dict[str, dict]:
        results = {}
        for domain in CLOSED_DOMAINS:
            def build(domain=domain):
                loaded = self.load(merged, exclude=[domain])
                return loaded.model, loaded.tokenizer, loaded.expert_names, [domain]
            results[domain] = self.evaluated(f"flexolmo_without_{domain}", build)
        return results

    # -- the ablation's FlexOlmo variants (the same models under both protocols) ---------------------------
    def ablation(self, proxies: list[Path], selection: dict) -> dict[str, dict]:
        """FlexOlmo variants that need experts of their own. Owner text only (public share 0, the paper's owners):
        as many owner tokens in as many steps as the default experts, chosen by the same rule. A random router row
        instead of the domain's mean hidden state (merged, and tuned as FlexOlmo was: at its chosen lr, or not when
        the untuned model won on validation). The negative bias (the merged model scored without it, as
        transformers and vLLM run the checkpoint, and with it, by flexolmo's runtime)."""
        optim = self.config.optim(self.config.expert_steps).model_copy(
            update={"batch_size": self.config.owner_sequences()})
        owner_only = self.merged(self.train_experts("_owner_only", optim=optim, public_share=0), "owner_only")
        chosen, selection["flexolmo_owner_only"] = self.choose("flexolmo_owner_only", owner_only, proxies)
        results = {"flexolmo_owner_only": self.evaluated("flexolmo_owner_only", self.model_builder(chosen))}
        lr = selection["flexolmo"]["chosen_lr"]
        random_init = self.merged(self.train_experts("_random_init", router_init="random"), "random_init")
        tuned = (random_init if lr is None
                 else self.tuned(random_init, self.out / "models" / "flexolmo_random_init_tuned", proxies, lr))
        results["flexolmo_random_init"] = self.evaluated("flexolmo_random_init", self.model_builder(tuned))
        biased = self.merged(self.train_experts("_negative_bias", negative_bias=True), "negative_bias")
        results["flexolmo_bias_dropped_untuned"] = self.evaluated("flexolmo_bias_dropped_untuned",
                                                                  self.model_builder(biased))
        results["flexolmo_bias_untuned"] = self.evaluated("flexolmo_bias_untuned",
                                                          self.model_builder(biased, router_bias=True))
        return results
