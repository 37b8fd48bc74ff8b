"""Data extraction and differential privacy on the demo: can a model regenerate an owner's training text?

    .venv/bin/python benchmarks/bench_privacy.py --domain code

Smoke check of the whole script, with tiny settings, under /tmp (numbers not meaningful):

    .venv/bin/python benchmarks/bench_privacy.py --tiny

Models audited on the owner's *training* documents (`<data-dir>/<domain>.train.jsonl.gz`), all with the same
sampled documents (same tokenizer, same seed):
- `public`: the anchor, which never saw the owner's data (the floor);
- `dense_<domain>`: the anchor's FFNs fine-tuned on the data (the demo's dense expert);
- `flexolmo`: the merged model the demo reports (the candidate its validation text chose), with every expert,
  and `flexolmo_without_<domain>` (the expert masked);
- `overfit`: the audit's sanity check. All parameters of the anchor fine-tuned ~60 epochs on the first 32
  training documents and audited on those same documents, next to `public` on them: the audit must see leakage
  where there certainly is some;
- DP experts: the owner's expert trained with DP-SGD at several epsilons, and a non-private reference with the
  same optimisation settings and router initialisation (`public`), so that only DP differs. Each is measured
  as the owner's own training model (anchor + its expert, top-2 of 2): held-out bits per byte on the domain,
  the epsilon the accountant spent, and the extraction rate.

The paper's protocol samples 10,000 documents and generates 256 tokens per sample; the defaults here are 100
documents and 64 new tokens, because the demo anchor was trained on 256-token windows and because generation
is paid for on 2 CPU cores. Both are flags.

Every step writes its artefact under `--work` and is skipped when that artefact exists, so an interrupted run
resumes where it stopped; elapsed seconds per step are kept in `<work>/timings.json`. A changed flag or anchor
makes the script refuse the old work directory instead of mixing artefacts of two settings.

The merged pair stores the expert in the anchor's dtype (bf16 for the demo anchor), as every merged model
does, so its bits per byte differ from the float32 owner model's (`owner_model_heldout_bits_per_byte`, from
the manifest) in the fourth or fifth decimal; both are recorded, as a cross-check. The results (every number,
the settings and the command) go to `benchmarks/results/privacy.json`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_directory, atomic_write_bytes, atomic_write_json
from flexolmo.core.progress import console, print_table
from flexolmo.data.documents import iter_documents
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.audit import AuditConfig, audit_loaded
from flexolmo.evaluation.scoring import EvalSettings, evaluate
from flexolmo.experiments.baselines import DENSE_METADATA_FILE, train_dense_expert
from flexolmo.experiments.demo_config import DemoConfig, chosen_model_dir
from flexolmo.model.anchor import compute_fingerprint, load_anchor
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.package import read_manifest
from flexolmo.owner.privacy import DPConfig
from flexolmo.training.loop import OptimConfig, config_digest, lm_loss_fn, train

from common import argument_parser, results_file, write_results

RESULTS = results_file("privacy.json")
TINY_ROOT = Path("/tmp/flexolmo-bench-privacy-tiny")
# Overrides of --tiny: every flag still wins when given explicitly.
TINY_DEFAULTS = dict(num_docs=4, new_tokens=8, samples=2, dp_steps=3, dp_batch_size=8, seq_len=64,
                     overfit_docs=4, overfit_epochs=3, max_sequences=2, work=TINY_ROOT / "work",
                     results=TINY_ROOT / "privacy.json")
PAPER_NOTE = ("the paper samples 10,000 documents and 256 new tokens per sample; here {docs} documents and "
              "{new} new tokens (the demo anchor was trained on 256-token windows, and generation runs on "
              "2 CPU cores)")
# Flags that change no number (where results go, and --tiny itself, whose effect is in the other flags).
_NOT_IN_DIGEST = {"results", "tiny", "work"}


# -- settings -----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--domain", default="code", help="the owner whose training documents are audited")
    parser.add_argument("--anchor", type=Path, default=Path("data/demo/anchor"),
                        help="the anchor every audited model and expert is built on")
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"),
                        help="holds <domain>.train.jsonl.gz and <domain>.heldout.jsonl.gz")
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"),
                        help="the demo's output (dense/<domain> and the merged model its validation chose)")
    parser.add_argument("--work", type=Path, default=Path("runs/privacy"), help="artefacts of this benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results file (JSON)")
    audit = parser.add_argument_group("extraction audit")
    audit.add_argument("--num-docs", type=int, default=100, help="training documents audited (paper: 10,000)")
    audit.add_argument("--prefix-tokens", type=int, default=32, help="prompt tokens per document (paper: 32)")
    audit.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample (paper: 256)")
    audit.add_argument("--samples", type=int, default=10, help="samples per prompt (paper: 10)")
    audit.add_argument("--threshold", type=float, default=0.9,
                       help="similarity from which a document counts as extracted (paper: 0.9)")
    audit.add_argument("--seed", type=int, default=0, help="document sample, generation and training seed")
    overfit = parser.add_argument_group("overfit sanity check")
    overfit.add_argument("--overfit-docs", type=int, default=32, help="first N training documents memorised")
    overfit.add_argument("--overfit-epochs", type=float, default=60, help="times each document is seen")
    overfit.add_argument("--overfit-batch-size", type=int, default=8, help="sequences per step")
    overfit.add_argument("--overfit-lr", type=float, default=1e-3, help="learning rate")
    dp = parser.add_argument_group("DP experts")
    dp.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0, 32.0], help="one DP expert each")
    dp.add_argument("--dp-delta", type=float, default=1e-6, help="DP delta of every DP expert")
    dp.add_argument("--dp-steps", type=int, default=60, help="steps of every expert, the non-private one too")
    dp.add_argument("--dp-batch-size", type=int, default=32, help="(expected) sequences per step")
    dp.add_argument("--dp-lr", type=float, default=5e-4, help="learning rate of every expert, the non-private one too")
    parser.add_argument("--seq-len", type=int, default=256, help="training and evaluation sequence length")
    parser.add_argument("--max-sequences", type=int, default=48, help="held-out sequences scored")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke check: tiny settings, work and results under {TINY_ROOT}; demo models "
                             "that are missing are skipped instead of trained")
    args = parser.parse_args(argv)
    if args.tiny:  # second pass: tiny values become the defaults, explicit flags still override them
        parser.set_defaults(**TINY_DEFAULTS)
        args = parser.parse_args(argv)
    args.epsilons = sorted(set(args.epsilons))
    return args


@dataclass
class Bench:
    """Paths, settings and the per-step timing record of one benchmark run."""

    args: argparse.Namespace
    anchor_fingerprint: str
    timings: dict[str, float] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def work(self) -> Path:
        return self.args.work

    @property
    def domain(self) -> str:
        return self.args.domain

    @property
    def train_file(self) -> Path:
        return self.args.data_dir / f"{self.domain}.train.jsonl.gz"

    @property
    def heldout_file(self) -> Path:
        return self.args.data_dir / f"{self.domain}.heldout.jsonl.gz"

    def note(self, text: str) -> None:
        self.notes.append(text)
        console.print(f"[yellow]note:[/] {text}")

    def step(self, name: str, done: Path, action: Callable[[], Any]) -> None:
        """Run `action` unless `done` exists; record its wall time (kept across resumed runs)."""
        if done.exists():
            return
        console.rule(name)
        began = time.perf_counter()
        action()
        self.timings[name] = time.perf_counter() - began
        self.ran.append(name)
        atomic_write_json(self.work / "timings.json", self.timings)


def open_bench(args: argparse.Namespace) -> Bench:
    """Check the inputs, refuse a work directory holding a run with other settings, load earlier timings."""
    for path in (args.anchor / "config.json", args.data_dir / f"{args.domain}.train.jsonl.gz",
                 args.data_dir / f"{args.domain}.heldout.jsonl.gz"):
        if not path.exists():
            sys.exit(f"error: {path} is missing")
    fingerprint = compute_fingerprint(args.anchor)
    settings = {key: value for key, value in vars(args).items() if key not in _NOT_IN_DIGEST}
    # The anchor's fingerprint is in the digest: artefacts built on another anchor must not be mixed in.
    digest = config_digest({**settings, "anchor_fingerprint": fingerprint})
    args.work.mkdir(parents=True, exist_ok=True)
    settings_file = args.work / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()).get("digest") != digest:
        sys.exit(f"error: {args.work} holds a run with other settings (or another anchor); pass another "
                 "--work or delete it")
    readable = json.loads(json.dumps(settings, default=str))
    atomic_write_json(settings_file, {"digest": digest, "settings": readable,
                                      "anchor_fingerprint": fingerprint})
    timings_file = args.work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    return Bench(args, fingerprint, timings)


# -- the models -------------------------------------------------------------------------------------------
def demo_dense(bench: Bench) -> Path | None:
    """The demo's dense expert if built on this anchor; else trained here (full run) or skipped (tiny)."""
    shipped = bench.args.demo_dir / "dense" / bench.domain
    metadata = shipped / DENSE_METADATA_FILE
    if metadata.exists():
        if json.loads(metadata.read_text())["anchor"]["fingerprint"] == bench.anchor_fingerprint:
            return shipped
    if bench.args.tiny:
        bench.note(f"{shipped} is missing or built on another anchor: dense_{bench.domain} row skipped "
                   "(--tiny)")
        return None
    own = bench.work / "dense" / bench.domain
    demo = DemoConfig()  # the demo's settings, so the row is the demo's dense expert
    bench.step(f"train dense_{bench.domain}", own, lambda: train_dense_expert(
        bench.args.anchor, [bench.train_file], own, demo.optim(demo.expert_steps)))
    return own


def demo_flexolmo(bench: Bench) -> Path | None:
    """The demo's merged model if it holds the domain's expert on this anchor; the full run needs it."""
    try:
        merged = chosen_model_dir(bench.args.demo_dir)
    except FlexOlmoError as error:
        if bench.args.tiny:
            bench.note(f"{error}: flexolmo rows skipped (--tiny)")
            return None
        sys.exit(f"error: {error}")
    problem = None
    if not (merged / "config.json").exists():
        problem = "is missing"
    else:
        info = read_merged_info(merged)
        if info.anchor_fingerprint != bench.anchor_fingerprint:
            problem = "was merged on another anchor"
        elif bench.domain not in info.expert_names:
            problem = f"has no expert '{bench.domain}'"
    if problem is None:
        return merged
    if bench.args.tiny:
        bench.note(f"{merged} {problem}: flexolmo rows skipped (--tiny)")
        return None
    sys.exit(f"error: {merged} {problem}; run the demo first (.venv/bin/flexolmo demo) with --anchor "
             f"{bench.args.anchor}")


def write_overfit_docs(bench: Bench) -> Path:
    """The first `--overfit-docs` training documents, as a JSONL file of their own (ids kept)."""
    out = bench.work / "data" / f"{bench.domain}.overfit.jsonl.gz"

    def write() -> None:
        lines = []
        for document in iter_documents(bench.train_file):
            lines.append(json.dumps({"id": document.doc_id, "text": document.text}))
            if len(lines) == bench.args.overfit_docs:
                break
        atomic_write_bytes(out, gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))

    bench.step("overfit documents", out, write)
    return out


def overfit_optim(bench: Bench, num_sequences: int) -> OptimConfig:
    """Steps so that each sequence (hence each document) is seen ~`--overfit-epochs` times."""
    args = bench.args
    steps = max(1, math.ceil(args.overfit_epochs * num_sequences / args.overfit_batch_size))
    return OptimConfig(steps=steps, batch_size=args.overfit_batch_size, seq_len=args.seq_len,
                       lr=args.overfit_lr, warmup_steps=max(1, steps // 20),
                       checkpoint_every=max(1, steps // 4), seed=args.seed)


def train_overfit(bench: Bench, docs: Path) -> Path:
    """The anchor with ALL parameters fine-tuned on `docs` until it memorises them; a dense HF directory."""
    out = bench.work / "models" / "overfit"

    def run() -> None:
        anchor = load_anchor(bench.args.anchor)
        stream = load_token_stream([docs], anchor.tokenizer, "all")
        optim = overfit_optim(bench, stream.num_sequences(bench.args.seq_len))
        # Every tensor trains (not just the FFNs, as dense experts do): the point is maximal memorisation.
        trainable = [(name, param.requires_grad_(True)) for name, param in anchor.model.named_parameters()]
        run_dir = out.with_name(out.name + ".ckpt")
        run_dir.mkdir(parents=True, exist_ok=True)
        result = train(anchor.model, trainable, stream, optim, run_dir, loss_fn=lm_loss_fn,
                       resume=(run_dir / "checkpoint").exists(), description="overfit (all parameters)")
        with atomic_directory(out) as staging:
            anchor.model.save_pretrained(str(staging))
            anchor.tokenizer.save_pretrained(str(staging))
            atomic_write_json(staging / "bench_overfit.json", {
                "documents": stream.num_documents, "tokens": stream.num_tokens,
                "sequences": stream.num_sequences(bench.args.seq_len), "epochs": bench.args.overfit_epochs,
                "optim": optim.model_dump(), "losses": result.losses, "final_loss": result.losses[-1]})
        shutil.rmtree(run_dir)

    bench.step("train overfit", out, run)
    return out


def expert_names(bench: Bench) -> dict[str, float | None]:
    """Name of each expert of the DP comparison -> its target epsilon (None: the non-private reference)."""
    names: dict[str, float | None] = {f"{bench.domain}-nodp": None}
    names.update({f"{bench.domain}-dp{eps:g}": eps for eps in reversed(bench.args.epsilons)})
    return names


def train_private_expert(bench: Bench, name: str, epsilon: float | None) -> Path:
    """One expert; DP and non-DP share every setting but `dp`, router init included."""
    args = bench.args
    out = bench.work / "experts" / name
    optim = OptimConfig(steps=args.dp_steps, batch_size=args.dp_batch_size, seq_len=args.seq_len,
                        lr=args.dp_lr, warmup_steps=max(1, args.dp_steps // 10),
                        checkpoint_every=max(1, args.dp_steps // 3), seed=args.seed)
    dp = DPConfig(epsilon=epsilon, delta=args.dp_delta) if epsilon is not None else None
    config = ExpertConfig(anchor=args.anchor, data=[bench.train_file], heldout=[bench.heldout_file],
                          name=name, out=out, router_init="public", dp=dp,
                          eval_max_sequences=args.max_sequences, optim=optim)
    resume = (out.with_name(out.name + ".ckpt") / "checkpoint").exists()
    bench.step(f"train expert {name}", out, lambda: train_expert(config, resume=resume))
    return out


def pair_model(bench: Bench, name: str, package: Path) -> Path:
    """Anchor + one expert, top-2 of 2: exactly the model the owner trained, in the merged format."""
    out = bench.work / "models" / f"pair-{name}"
    bench.step(f"merge pair {name}", out, lambda: merge(bench.args.anchor, [package], out, top_k=2))
    return out


# -- measurements -----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a model (experts masked), the documents it is audited on, its eval key."""

    label: str
    model: Path
    audit_data: Path
    num_docs: int
    exclude: list[str] = field(default_factory=list)
    eval_key: str = ""
    privacy: dict | None = None

    def __post_init__(self) -> None:
        self.eval_key = self.eval_key or self.label


def audit_config(bench: Bench, row: Row) -> AuditConfig:
    args = bench.args
    return AuditConfig(model=row.model, data=row.audit_data, exclude=row.exclude, num_docs=row.num_docs,
                       prefix_tokens=args.prefix_tokens, new_tokens=args.new_tokens, samples=args.samples,
                       threshold=args.threshold, seed=args.seed)


def measure(bench: Bench, row: Row) -> None:
    """Audit `row` and score its model on the domain's held-out text; the model is loaded once for both."""
    audit_file = bench.work / "audits" / f"{row.label}.json"
    eval_file = bench.work / "evals" / f"{row.eval_key}.json"
    if audit_file.exists() and eval_file.exists():
        return
    loaded = load_model(row.model, exclude=row.exclude)

    def audit() -> None:
        atomic_write_json(audit_file, audit_loaded(loaded, audit_config(bench, row)).as_dict())

    def score() -> None:
        settings = EvalSettings(seq_len=bench.args.seq_len, max_sequences=bench.args.max_sequences,
                                split="all")
        result = evaluate(loaded.model, loaded.tokenizer, {bench.domain: [bench.heldout_file]}, settings,
                          loaded.expert_names, row.eval_key, row.exclude)
        atomic_write_json(eval_file, result.as_dict())

    bench.step(f"audit {row.label}", audit_file, audit)
    bench.step(f"eval {row.eval_key}", eval_file, score)


def dp_record(package: Path) -> dict:
    """What the expert's manifest says about its privacy and its own held-out score."""
    manifest = read_manifest(package)
    dp = manifest["privacy"]["dp"]
    training = manifest["training"]
    return {
        "dp": dp is not None,
        "epsilon_spent": dp["epsilon"] if dp else None,
        "epsilon_target": dp["epsilon_target"] if dp else None,
        "delta": dp["delta"] if dp else None,
        "noise_multiplier": dp["noise_multiplier"] if dp else None,
        "max_grad_norm": dp["max_grad_norm"] if dp else None,
        "sample_rate": dp["sample_rate"] if dp else None,
        "steps": dp["steps"] if dp else training["config"]["optim"]["steps"],
        "router_init": manifest["privacy"]["router_init"],
        "final_train_loss": training["final_train_loss"],
        # Scored inside train_expert on the owner's training model: must match the merged pair's evaluation.
        "owner_model_heldout_bits_per_byte": training["heldout_bits_per_byte_after"],
        "anchor_heldout_bits_per_byte": training["heldout_bits_per_byte_before"],
        "training_seconds": training["seconds"],
    }


def row_result(bench: Bench, row: Row) -> dict:
    """Every number of one row, read back from its artefacts."""
    audit = json.loads((bench.work / "audits" / f"{row.label}.json").read_text())
    score = json.loads((bench.work / "evals" / f"{row.eval_key}.json").read_text())["domains"][bench.domain]
    similarity = audit["similarity"]
    return {
        "model": str(row.model),
        "exclude": row.exclude,
        "audit_data": str(row.audit_data),
        "documents": audit["documents"],
        "extracted": audit["extracted"],
        "rate": audit["rate"],
        "rate_ci95": audit["rate_ci95"],
        "similarity_mean": similarity["mean"],
        "similarity_max": similarity["quantiles"]["max"],
        "similarity": similarity,
        "top": [{"doc_id": item["doc_id"], "similarity": item["similarity"]} for item in audit["top"]],
        "audit_seconds": audit["seconds"],
        "heldout_bits_per_byte": score["bits_per_byte"],
        "heldout_loss": score["loss"],
        "heldout_tokens": score["tokens"],
        "privacy": row.privacy,
    }


# -- output -----------------------------------------------------------------------------------------------
def show(results: dict) -> None:
    # rich wraps tables to 80 columns when stdout is not a terminal (a log file); this table needs more.
    os.environ.setdefault("COLUMNS", "160")

    def epsilon(privacy: dict | None) -> str:
        if privacy is None:
            return "-"
        return f"{privacy['epsilon_spent']:.2f}" if privacy["dp"] else "inf (no DP)"

    rows = [[label, f"{r['extracted']}/{r['documents']['audited']}", r["rate"],
             f"[{r['rate_ci95'][0]:.3f}, {r['rate_ci95'][1]:.3f}]", r["similarity_mean"], r["similarity_max"],
             r["heldout_bits_per_byte"], epsilon(r["privacy"])]
            for label, r in results["rows"].items()]
    settings = results["audit_settings"]
    title = (f"extraction of '{results['domain']}' training documents ({settings['prefix_tokens']}-token "
             f"prefix, {settings['samples']} samples x {settings['new_tokens']} tokens, similarity >= "
             f"{settings['threshold']}); held-out bits per byte on {results['domain']}")
    if results["tiny"]:
        title += " -- TINY SMOKE RUN, NOT MEANINGFUL"
    columns = ["model", "extracted", "rate", "95% CI", "mean sim", "max sim", "held-out bpb", "epsilon"]
    print_table(title, columns, rows)
    print(PAPER_NOTE.format(docs=settings["num_docs"], new=settings["new_tokens"]))
    for text in results["notes"]:
        print(f"note: {text}")


def main(argv: Sequence[str] | None = None) -> dict:
    began = time.perf_counter()
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    bench = open_bench(args)
    console.print(f"[bold]{PAPER_NOTE.format(docs=args.num_docs, new=args.new_tokens)}[/]")

    rows = [Row("public", args.anchor, bench.train_file, args.num_docs)]
    dense = demo_dense(bench)
    if dense is not None:
        rows.append(Row(f"dense_{args.domain}", dense, bench.train_file, args.num_docs))
    merged = demo_flexolmo(bench)
    if merged is not None:
        rows.append(Row("flexolmo", merged, bench.train_file, args.num_docs))
        rows.append(Row(f"flexolmo_without_{args.domain}", merged, bench.train_file, args.num_docs,
                        exclude=[args.domain]))
    docs = write_overfit_docs(bench)
    rows.append(Row("public_on_overfit_docs", args.anchor, docs, args.overfit_docs, eval_key="public"))
    rows.append(Row("overfit", train_overfit(bench, docs), docs, args.overfit_docs))
    for name, epsilon in expert_names(bench).items():
        package = train_private_expert(bench, name, epsilon)
        rows.append(Row(name, pair_model(bench, name, package), bench.train_file, args.num_docs,
                        privacy=dp_record(package)))
    for row in rows:
        measure(bench, row)

    results = {
        "command": shlex.join([".venv/bin/python", "benchmarks/bench_privacy.py", *sys.argv[1:]]),
        "tiny": args.tiny,
        "domain": args.domain,
        "anchor": str(args.anchor),
        "anchor_fingerprint": bench.anchor_fingerprint,
        "audit_settings": {key: getattr(args, key) for key in
                           ("num_docs", "prefix_tokens", "new_tokens", "samples", "threshold", "seed")}
                          | {"top_k": 50, "top_p": 0.95, "temperature": 1.0},
        "paper_protocol_note": PAPER_NOTE.format(docs=args.num_docs, new=args.new_tokens),
        "overfit": {"documents": args.overfit_docs, "epochs": args.overfit_epochs,
                    **json.loads((bench.work / "models" / "overfit" / "bench_overfit.json").read_text())},
        "dp_settings": {"epsilons": args.epsilons, "delta": args.dp_delta, "steps": args.dp_steps,
                        "batch_size": args.dp_batch_size, "lr": args.dp_lr, "seq_len": args.seq_len,
                        "router_init": "public"},
        "eval_settings": {"seq_len": args.seq_len, "max_sequences": args.max_sequences, "split": "all",
                          "data": str(bench.heldout_file)},
        "rows": {row.label: row_result(bench, row) for row in rows},
        "notes": bench.notes,
        "elapsed_seconds_per_step": bench.timings,
        "steps_run_this_invocation": bench.ran,
        "wall_seconds_this_invocation": time.perf_counter() - began,
        "machine": {"torch_threads": torch.get_num_threads()},
    }
    write_results(args.results, results)
    show(results)
    return results


if __name__ == "__main__":
    main()
