"""The demo: the whole FlexOlmo story on the shipped anchor and corpora, with every baseline.

Five owners (code, math, legal, biomedical, literature) each train an expert alone (half of every batch is the
anchor's public sample, train-expert's default) and choose public proxy documents like their data; the
coordinator merges the experts and tunes the router rows on the proxies (the paper's full method). Every
baseline merges the same members (the public anchor and five owners' dense experts) and gets at least
FlexOlmo's training compute (dense steps are matched by FLOPs, `flexolmo.compute`). Every choice (the router
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
from pydantic import BaseModel, Field

import flexolmo
from flexolmo.anchor import load_anchor
from flexolmo.baselines import (
    BranchTrainMergeEnsemble,
    PromptRoutedModel,
    PromptRouter,
    dense_expert_package,
    model_soup,
    train_dense_expert,
)
from flexolmo.data import iter_documents, load_token_stream
from flexolmo.errors import DataError, FlexOlmoError
from flexolmo.evaluate import EvalSettings, evaluate
from flexolmo.expert import ExpertConfig, train_expert
from flexolmo.fileio import atomic_write_bytes, atomic_write_json
from flexolmo.merge import merge
from flexolmo.progress import console, print_table
from flexolmo.proxy import ProxyConfig, select_proxies
from flexolmo.public_sample import anchor_public_sample
from flexolmo.report import write_report
from flexolmo.router_tuning import DEFAULT_STEPS as TUNE_STEPS
from flexolmo.router_tuning import TuneConfig, tune_router
from flexolmo.runtime import LoadedModel, load_model
from flexolmo.training import OptimConfig, config_digest
from flexolmo.trust.admission import AdmissionPolicy, print_report
from flexolmo.trust.publish import CoordinatorTrust

CLOSED_DOMAINS = ("code", "math", "legal", "biomedical", "literature")
NO_TUNING = "untuned"  # the router-tuning candidate that keeps the merged model's rows
PUBLIC = "public"
MIXED = "mixed"


def merged_model_dir(out: Path, method: str, lr: float | None) -> Path:
    """Where a demo under `out` keeps `method`'s merged model: untuned, or router-tuned at `lr`."""
    return out / "models" / (f"{method}_untuned" if lr is None else f"{method}_tuned_lr{lr:g}")


def chosen_model_dir(out: Path, method: str = "flexolmo") -> Path:
    """The model a finished demo under `out` reports as `method`: the candidate its validation text chose."""
    results = out / "results.json"
    try:
        lr = json.loads(results.read_text())["router_tuning"][method]["chosen_lr"]
    except (OSError, ValueError, KeyError) as error:
        raise FlexOlmoError(f"{results} holds no finished demo ({error}); run the demo first") from None
    return merged_model_dir(out, method, lr)


def finished_demo_config(out: Path) -> "DemoConfig":
    """The settings of the finished demo under `out`, for work that builds on its models (the benchmarks)."""
    if not (out / "results.json").exists():
        raise FlexOlmoError(f"{out} holds no finished demo; run `flexolmo demo --out {out}` first")
    return DemoConfig(**{**json.loads((out / "demo_config.json").read_text())["config"], "out": out})


def shipped_data_dir() -> Path:
    """`data/demo` of the repository this package runs from."""
    return Path(flexolmo.__file__).resolve().parents[2] / "data" / "demo"


class DemoConfig(BaseModel):
    """`flexolmo demo`: sizes of every step; the defaults are the full demo (19 minutes on 2 idle cores)."""

    data_dir: Path = Field(default_factory=shipped_data_dir, description="shipped corpora and anchor")
    out: Path = Field(Path("runs/demo"), description="where every artefact and the report go")
    quick: bool = Field(False, description="a smoke run: a few steps and sequences; numbers not meaningful")
    expert_steps: int = Field(60, ge=1, description="optimizer steps per owner's expert")
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=16)
    lr: float = Field(2e-3, gt=0, description="peak learning rate of expert and dense fine-tuning")
    public_share: float = Field(0.5, ge=0, lt=1, description="share of each owner batch drawn from public text")
    top_k: int = Field(2, ge=1, description="experts per token in the merged model")
    tune_steps: int = Field(TUNE_STEPS, ge=1, description="router tuning steps")
    tune_lrs: tuple[float, ...] = Field((1e-3, 3e-3), min_length=1,
                                        description="router tuning learning rates tried; the best closed-domain "
                                                    "average on validation text is kept")
    btm_top_k: int = Field(2, ge=1, description="experts per position in the BTM ensemble")
    eval_max_sequences: int = Field(48, ge=1, description="held-out sequences scored per domain")
    context_tokens: int = Field(32, ge=0, description="leading tokens of each held-out window given as context "
                                "and not scored; prompt routing chooses its member from them")
    router_samples: int = Field(100, ge=2, description="documents per domain to fit the prompt router")
    mixed_documents: int = Field(100, ge=1, description="stitched documents in the mixed-domain set")
    ablation: bool = Field(False, description="also the unrestricted upper bound (all closed data pooled) and the "
                                               "ablation's experts: a random router row, the negative bias")
    seed: int = 0
    device: str = Field("cpu", description="torch device every model trains and runs on")
    dtype: str = Field("float32", pattern="^(float32|bfloat16)$",
                       description="dtype every model trains and runs in")

    @classmethod
    def quick_run(cls, **overrides) -> "DemoConfig":
        settings = dict(quick=True, expert_steps=3, batch_size=2, eval_max_sequences=3, router_samples=8,
                        mixed_documents=12, context_tokens=8, tune_steps=2, out=Path("runs/demo-quick"))
        return cls(**{**settings, **overrides})

    def optim(self, steps: int) -> OptimConfig:
        return OptimConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=max(1, steps // 10), checkpoint_every=max(1, steps // 3), seed=self.seed,
                           device=self.device, dtype=self.dtype)

    def digest(self) -> str:
        """What decides the demo's numbers (the device only places the work)."""
        # --ablation only adds steps: a run with it extends, and reuses, the run without it.
        return config_digest(self.model_dump(mode="json", exclude={"out", "device", "ablation"}))

    def dense_steps(self, anchor_config: dict) -> int:
        """Steps of each dense expert so that five of them cost at least FlexOlmo's training: five coordinated
        experts and every router tuning run (`flexolmo.compute`); never fewer than the owners' steps."""
        from flexolmo.compute import training_flops_per_token

        flexolmo = sum(run.flops(anchor_config, self.seq_len) for run in flexolmo_runs(self))
        per_dense_step = self.batch_size * self.seq_len * training_flops_per_token(anchor_config, self.seq_len,
                                                                                    "dense_ffn")
        steps = -(-flexolmo // (len(CLOSED_DOMAINS) * per_dense_step))  # ceiling
        return max(self.expert_steps, int(steps))


def flexolmo_runs(config: DemoConfig) -> list:
    """FlexOlmo's training runs: five coordinated experts, then one router tuning per learning rate tried."""
    from flexolmo.compute import TrainingRun

    owner_sequences = config.batch_size - round(config.batch_size * config.public_share)
    owners = [TrainingRun("coordinated", config.expert_steps, config.batch_size, owner_sequences)]
    tunings = [TrainingRun("router_only", config.tune_steps, config.batch_size, 0, top_k=config.top_k)]
    return owners * len(CLOSED_DOMAINS) + tunings * len(config.tune_lrs)


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
        from flexolmo.anchor import read_config

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
        """The cached evaluation of `method`, or run it: `build()` returns (module, tokenizer, expert names, excluded)."""
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


def method_costs(config: DemoConfig, anchor_dir: Path, flexolmo_lr: float | None) -> dict[str, dict]:
    """Per method: its members and what it costs (`flexolmo.compute`): training FLOPs and tokens over all its
    runs, the owners' tokens among them, and inference FLOPs per token (the anchor's pretraining, shared by all,
    is not counted). `flexolmo_lr`: the router-tuning lr validation chose for FlexOlmo (None: untuned won), which
    decides whether the random-init ablation was tuned."""
    from flexolmo.anchor import read_config
    from flexolmo.compute import TrainingRun, method_cost

    anchor_config = read_config(anchor_dir)
    batch, owners, k, members = config.batch_size, len(CLOSED_DOMAINS), config.top_k, len(CLOSED_DOMAINS) + 1
    dense_steps = config.dense_steps(anchor_config)
    dense_run = TrainingRun("dense_ffn", dense_steps, batch, batch)
    flexolmo = flexolmo_runs(config)
    coordinated, tunings = flexolmo[:owners], flexolmo[owners:]
    tuned = f"router tuned on the owners' proxies ({len(tunings)} learning rates tried on validation)"
    specs = {
        "public": ("the anchor", [], {}),
        **{f"dense_{d}": (f"anchor FFNs fine-tuned on {d}", [dense_run], {}) for d in CLOSED_DOMAINS},
        "model_soup": ("public + 5 dense experts, FFNs averaged", [dense_run] * owners, {}),
        "btm": (f"public + 5 dense experts, ensemble of top-{config.btm_top_k} per position",
                [dense_run] * owners, {"forward_passes": members}),
        "prompt_routing": ("public + 5 dense experts, one per window (MiniLM classifier)", [dense_run] * owners,
                           {}),
        "btx_untuned": (f"public FFN + 5 dense experts' FFNs, MoE top-{k}, router rows from mean hidden states",
                        [dense_run] * owners, {"experts_per_token": k}),
        "btx": (f"public FFN + 5 dense experts' FFNs, MoE top-{k}, {tuned}", [dense_run] * owners + tunings,
                {"experts_per_token": k}),
        "flexolmo_untuned": (f"public + 5 coordinated experts, MoE top-{k}, no router tuning", coordinated,
                             {"experts_per_token": k}),
        "flexolmo": (f"public + 5 coordinated experts, MoE top-{k}, {tuned}", flexolmo, {"experts_per_token": k}),
    }
    if config.ablation:
        random_init_tuning = [] if flexolmo_lr is None else tunings[:1]
        tuning_text = "not tuned (untuned flexolmo won)" if flexolmo_lr is None else f"tuned at lr {flexolmo_lr:g}"
        specs.update({
            "unrestricted": ("anchor FFNs fine-tuned on all closed data pooled (upper bound)",
                             [TrainingRun("dense_ffn", dense_steps * owners, batch, batch)], {}),
            "flexolmo_random_init": (f"as flexolmo, owners' router rows started at random; {tuning_text}",
                                     coordinated + random_init_tuning, {"experts_per_token": k}),
            "flexolmo_bias_dropped_untuned": ("owners trained with the negative bias; merged checkpoint as "
                                              "transformers/vLLM run it (no bias), no tuning", coordinated,
                                              {"experts_per_token": k}),
            "flexolmo_bias_untuned": ("the same, with the biases applied by flexolmo's runtime", coordinated,
                                      {"experts_per_token": k}),
        })
    return {method: {"members": members_text, **method_cost(anchor_config, config.seq_len, runs, **inference)}
            for method, (members_text, runs, inference) in specs.items()}


def summarise(config: DemoConfig, evaluations: dict[str, dict], opt_out: dict[str, dict],
              costs: dict[str, dict]) -> dict:
    """`results.json`: bits per byte per method and domain, averages, routing, opt-out deltas, costs."""
    methods = {}
    for method, result in evaluations.items():
        row = {domain: score["bits_per_byte"] for domain, score in result["domains"].items()}
        row["closed_average"] = sum(row[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
        row["average_with_public"] = (row["closed_average"] * len(CLOSED_DOMAINS) + row[PUBLIC]) / (len(CLOSED_DOMAINS) + 1)
        methods[method] = row
    full = methods["flexolmo"]
    deltas = {}
    for removed, result in opt_out.items():
        change = {d: result["domains"][d]["bits_per_byte"] - full[d] for d in (PUBLIC, *CLOSED_DOMAINS, MIXED)}
        others = [change[d] for d in CLOSED_DOMAINS if d != removed]
        deltas[removed] = {"delta_bits_per_byte": change, "own_domain": change[removed],
                           "other_closed_mean": sum(others) / len(others)}
    routing = {domain: score["routing"]["mean_share"]
               for domain, score in evaluations["flexolmo"]["domains"].items() if "routing" in score}
    return {
        "quick": config.quick,
        "note": "smoke run: a few steps, numbers are not meaningful" if config.quick else "full demo",
        "config": config.model_dump(mode="json"),
        "domains": [PUBLIC, *CLOSED_DOMAINS, MIXED],
        "methods": methods,
        "routing": routing,
        "opt_out": deltas,
        "costs": costs,
        "details": evaluations,
    }


def show(results: dict) -> None:
    columns = ["method", *results["domains"], "closed avg", "avg (+public)"]
    rows = [[method, *[row[d] for d in results["domains"]], row["closed_average"], row["average_with_public"]]
            for method, row in results["methods"].items()]
    title = "bits per byte on held-out text (lower is better)"
    if results["quick"]:
        title += " -- QUICK SMOKE RUN, NOT MEANINGFUL"
    print_table(title, columns, rows)
    print_table("opt-out: change in bits per byte when an expert is removed",
                ["removed", "own domain", "other closed (mean)", "public"],
                [[name, d["own_domain"], d["other_closed_mean"], d["delta_bits_per_byte"][PUBLIC]]
                 for name, d in results["opt_out"].items()])
