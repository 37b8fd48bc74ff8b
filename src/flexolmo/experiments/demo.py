"""The demo: the whole FlexOlmo story on the shipped anchor and corpora, with every baseline.

Five owners (code, math, legal, biomedical, literature) each train an expert alone (half of every batch is the
anchor's public sample, train-expert's default) and choose public proxy documents like their data; the
coordinator merges the experts and tunes the router rows on the proxies (the paper's full method). Every
baseline merges the same members (the public anchor and five owners' dense experts) and gets at least
FlexOlmo's training compute (dense steps are matched by FLOPs, `flexolmo.experiments.compute`). Every choice (the router
tuning's learning rate, for FlexOlmo and for BTX alike) is made on the `*.validation` text; every reported
number is on the `*.heldout` text, which nothing trains on or is chosen by. Each expert is then withdrawn in
turn. Every step writes its output under `out/` atomically and is skipped when that output exists, so an
interrupted demo resumes where it stopped.
"""

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
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import EvalSettings, evaluate
from flexolmo.experiments.baselines import (
    BranchTrainMergeEnsemble,
    PromptRoutedModel,
    PromptRouter,
    dense_expert_package,
    model_soup,
    train_dense_expert,
)
from flexolmo.experiments.demo_config import (
    CLOSED_DOMAINS,
    MIXED,
    NO_TUNING,
    PUBLIC,
    DemoConfig,
    merged_model_dir,
)
from flexolmo.experiments.demo_summary import method_costs, show, summarise
from flexolmo.experiments.report import write_report
from flexolmo.model.anchor import load_anchor, read_config
from flexolmo.model.runtime import LoadedModel, load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.proxy import ProxyConfig, select_proxies


class Demo:
    """The demo's steps, in order; each is skipped when its output already exists."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = config.out
        self.anchor_dir = config.data_dir / "anchor"
        self.settings = EvalSettings(seq_len=config.seq_len, batch_size=8, max_sequences=config.eval_max_sequences,
                                      split="all", context_tokens=config.context_tokens, device=config.device,
                                      dtype=config.dtype)

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
            raise DataError(f"{self.out} holds a demo run with other settings; pass another --out or delete it")
        atomic_write_json(settings_file, {"digest": digest, "config": self.config.model_dump(mode="json")})

    # -- owners -----------------------------------------------------------------------------------------
    def train_experts(self, variant: str = "", **settings) -> dict[str, Path]:
        """The five owners' experts; `variant` names a set trained with other `settings` (the ablation)."""
        packages = {}
        for domain in CLOSED_DOMAINS:
            packages[domain] = self.out / f"experts{variant}" / domain
            if not packages[domain].exists():
                console.rule(f"owner '{domain}' trains its expert{' (' + variant.strip('_') + ')' if variant else ''}")
                train_expert(ExpertConfig(
                    anchor=self.anchor_dir, data=[self.train_file(domain)], heldout=[self.heldout_file(domain)],
                    name=domain, out=packages[domain], eval_max_sequences=self.config.eval_max_sequences,
                    public_share=self.config.public_share,  # of the anchor's public sample, the default
                    optim=self.config.optim(self.config.expert_steps), **settings),
                    resume=self._resumable(packages[domain]))
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

    def dense_steps(self) -> int:

        return self.config.dense_steps(read_config(self.anchor_dir))

    def train_dense(self) -> dict[str, Path]:
        """The owners' dense experts, each FLOP-matched to FlexOlmo: the members of every merging baseline."""
        dense, steps = {}, self.dense_steps()
        for domain in CLOSED_DOMAINS:
            dense[domain] = self.out / "dense" / domain
            if not dense[domain].exists():
                console.rule(f"baseline: dense expert '{domain}' ({steps} steps, FLOP-matched to FlexOlmo)")
                train_dense_expert(self.anchor_dir, [self.train_file(domain)], dense[domain], self.config.optim(steps))
        return dense

    def train_unrestricted(self) -> Path:
        """The upper bound no consortium can build: the anchor's FFNs on all closed data pooled, at the five dense
        experts' compute."""
        pooled = self.out / "dense" / "unrestricted"
        if not pooled.exists():
            console.rule("upper bound: unrestricted (all closed data pooled, the five dense experts' compute)")
            train_dense_expert(self.anchor_dir, [self.train_file(d) for d in CLOSED_DOMAINS], pooled,
                               self.config.optim(self.dense_steps() * len(CLOSED_DOMAINS)))
        return pooled

    def _resumable(self, out: Path) -> bool:
        return (out.with_name(out.name + ".ckpt") / "checkpoint").exists()

    # -- coordinator -------------------------------------------------------------------------------------
    def build_models(self, packages: dict[str, Path], dense: dict[str, Path]) -> dict[str, Path]:
        models = {"flexolmo_untuned": merged_model_dir(self.out, "flexolmo", None),
                  "btx_untuned": merged_model_dir(self.out, "btx", None),
                  "model_soup": self.out / "models" / "model_soup"}
        if not models["flexolmo_untuned"].exists():
            console.rule("coordinator merges the five experts (admission checks on public validation text)")
            trust = CoordinatorTrust(admission=AdmissionPolicy(), probe=([self.validation_file(PUBLIC)], "all"),
                                     on_admission=self._show_admission)
            merge(self.anchor_dir, [packages[d] for d in CLOSED_DOMAINS], models["flexolmo_untuned"],
                  self.config.top_k, trust=trust)
        if not models["btx_untuned"].exists():
            console.rule("baseline: BTX from uncoordinated dense experts")
            anchor = load_anchor(self.anchor_dir, dtype=getattr(torch, self.config.dtype),
                                 device=self.config.device)
            dense_packages = []
            for domain in CLOSED_DOMAINS:
                target = self.out / "dense_packages" / domain
                if not target.exists():
                    stream = load_token_stream([self.train_file(domain)], anchor.tokenizer, "all")
                    dense_expert_package(anchor, dense[domain], stream, domain, target, "mean_hidden",
                                         self.config.seq_len, 64, self.config.seed)
                dense_packages.append(target)
            merge(self.anchor_dir, dense_packages, models["btx_untuned"], self.config.top_k)
        if not models["model_soup"].exists():
            console.rule("baseline: model soup")
            model_soup(self.anchor_dir, [self.anchor_dir, *[dense[d] for d in CLOSED_DOMAINS]], models["model_soup"])
        return models

    def tune(self, models: dict[str, Path], proxies: list[Path]) -> tuple[dict[str, Path], dict]:
        """Router tuning of FlexOlmo and of BTX at every learning rate tried. Each method keeps, of its untuned
        model and its tunings, the one with the best closed-domain average on validation text, so tuning is only
        kept where it helps there. Returns the chosen models and every validation score."""
        chosen, selection = {}, {}
        for method, untuned in (("flexolmo", models["flexolmo_untuned"]), ("btx", models["btx_untuned"])):
            candidates = {NO_TUNING: untuned}
            for lr in self.config.tune_lrs:
                candidates[f"{lr:g}"] = self.tuned(untuned, merged_model_dir(self.out, method, lr), proxies, lr)
            scores = {name: self.validated(path.name, path) for name, path in candidates.items()}
            best = min(scores, key=lambda name: scores[name]["closed_average"])  # ties: the untuned model
            chosen[method] = candidates[best]
            selection[method] = {"chosen_lr": None if best == NO_TUNING else float(best), "validation": scores}
        return chosen, selection

    def tuned(self, untuned: Path, out: Path, proxies: list[Path], lr: float) -> Path:
        """`untuned` with its router rows tuned at `lr` on `proxies` and public text, written to `out` (once)."""
        if not out.exists():
            console.rule(f"coordinator tunes the router rows of {untuned.name} (lr {lr:g}, {self.config.tune_steps} "
                         "steps) on the owners' proxies and public text")
            optim = self.config.optim(self.config.tune_steps).model_copy(update={"lr": lr})
            tune_router(TuneConfig(model=untuned, public=[self.public_pool()], proxies=proxies, out=out,
                                   optim=optim), resume=self._resumable(out))
        return out

    def ablation(self, proxies: list[Path], lr: float | None) -> dict[str, dict]:
        """The paper's reference and the parts of the method that need experts of their own: the unrestricted upper
        bound (pooled data), a random router row instead of the domain's mean hidden state (merged, and tuned as
        FlexOlmo was: at its chosen lr, or not when the untuned model won on validation), and the negative bias
        (the merged model scored without it, as transformers and vLLM run the checkpoint, and with it, by
        flexolmo's runtime)."""
        results = {"unrestricted": self.evaluated("unrestricted", self.model_builder(self.train_unrestricted()))}
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

    def merged(self, packages: dict[str, Path], variant: str) -> Path:
        out = self.out / "models" / f"flexolmo_{variant}_untuned"
        if not out.exists():
            merge(self.anchor_dir, [packages[d] for d in CLOSED_DOMAINS], out, self.config.top_k)
        return out

    def model_builder(self, path: Path, exclude: Sequence[str] = (), router_bias: bool = False):
        def build():
            loaded = self.load(path, exclude, router_bias)
            return loaded.model, loaded.tokenizer, loaded.expert_names, list(exclude)
        return build

    def validated(self, name: str, model: Path) -> dict:
        """Bits per byte of `model` on the validation text of every domain (cached), for choices only."""
        cache = self.out / "validation" / f"{name}.json"
        if not cache.exists():
            console.rule(f"validation score of {name}")
            loaded = self.load(model)
            files = {d: [self.validation_file(d)] for d in (PUBLIC, *CLOSED_DOMAINS)}
            result = evaluate(loaded.model, loaded.tokenizer, files, self.settings, loaded.expert_names, name)
            scores = {d: score.bits_per_byte for d, score in result.domains.items()}
            scores["closed_average"] = sum(scores[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
            atomic_write_json(cache, scores)
        return json.loads(cache.read_text())

    def _show_admission(self, report) -> None:
        print_report(report)
        atomic_write_json(self.out / "admission.json", report.as_dict())

    # -- evaluation --------------------------------------------------------------------------------------
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

    def evaluated(self, method: str, build) -> dict:
        """The cached evaluation of `method`, or run it: `build()` returns (module, tokenizer, expert names,
        excluded)."""
        cache = self.out / "evals" / f"{method}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        console.rule(f"evaluating {method}")
        model, tokenizer, experts, excluded = build()
        result = evaluate(model, tokenizer, self.eval_domains(), self.settings, experts, method, excluded)
        atomic_write_json(cache, result.as_dict())
        return result.as_dict()

    def evaluate_all(self, dense: dict[str, Path], models: dict[str, Path]) -> dict[str, dict]:
        results = {}
        from_path = self.model_builder
        results["public"] = self.evaluated("public", from_path(self.anchor_dir))
        for domain in CLOSED_DOMAINS:
            results[f"dense_{domain}"] = self.evaluated(f"dense_{domain}", from_path(dense[domain]))
        results["model_soup"] = self.evaluated("model_soup", from_path(models["model_soup"]))
        results["btm"] = self.evaluated("btm", self._btm(dense))
        results["prompt_routing"] = self.evaluated("prompt_routing", self._prompt_routing(dense))
        for method in ("btx", "flexolmo"):
            untuned = f"{method}_untuned"
            results[untuned] = self.evaluated(untuned, from_path(models[untuned]))
            # Where validation kept the untuned model, the method *is* that model: its scores, not a second run.
            results[method] = (results[untuned] if models[method] == models[untuned]
                               else self.evaluated(method, from_path(models[method])))
        return results

    def _btm(self, dense: dict[str, Path]):
        def build():
            anchor = self.load(self.anchor_dir)
            members = [anchor.model, *[self.load(dense[d]).model for d in CLOSED_DOMAINS]]
            return BranchTrainMergeEnsemble(members, self.config.btm_top_k), anchor.tokenizer, [], []
        return build

    def _prompt_routing(self, dense: dict[str, Path]):
        def build():
            router = PromptRouter({PUBLIC: [self.train_file(PUBLIC)],
                                   **{d: [self.train_file(d)] for d in CLOSED_DOMAINS}},
                                  self.config.router_samples, self.config.seed)
            anchor = self.load(self.anchor_dir)
            members = {PUBLIC: anchor.model, **{d: self.load(dense[d]).model for d in CLOSED_DOMAINS}}
            routed = PromptRoutedModel(members, router, anchor.tokenizer, prompt_tokens=self.config.context_tokens)
            return routed, anchor.tokenizer, [], []
        return build

    def opt_out(self, merged: Path) -> dict[str, dict]:
        results = {}
        for domain in CLOSED_DOMAINS:
            def build(domain=domain):
                loaded = self.load(merged, exclude=[domain])
                return loaded.model, loaded.tokenizer, loaded.expert_names, [domain]
            results[domain] = self.evaluated(f"flexolmo_without_{domain}", build)
        return results


def run_demo(config: DemoConfig) -> dict:
    """Run every step (skipping finished ones) and write `report.md`, `results.json` and plots to `config.out`."""
    torch.manual_seed(config.seed)
    demo = Demo(config)
    demo.check_inputs()
    packages = demo.train_experts()
    proxies = demo.select_proxies()
    dense = demo.train_dense()
    models = demo.build_models(packages, dense)
    tuned, selection = demo.tune(models, proxies)
    models.update(tuned)
    evaluations = demo.evaluate_all(dense, models)
    opt_out = demo.opt_out(models["flexolmo"])
    if config.ablation:
        evaluations.update(demo.ablation(proxies, selection["flexolmo"]["chosen_lr"]))
    costs = method_costs(config, demo.anchor_dir, selection["flexolmo"]["chosen_lr"])
    results = summarise(config, evaluations, opt_out, costs)
    results["router_tuning"] = selection
    atomic_write_json(config.out / "results.json", results)
    write_report(config.out, results)
    show(results)
    return results


