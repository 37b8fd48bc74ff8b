"""Admission checks on the demo: what honest experts measure, what hijackers and domain stealers measure, and what
the checks cost.

    .venv/bin/python benchmarks/bench_admission.py

The demo's five honest experts (the demo's own settings: 60 steps, 8 x 256 tokens, lr 2e-3, half of each batch
public text; reused from `--demo-dir` when present, else trained there) and the five owners' proxy files
(`select-proxy` defaults, chosen from the anchor's public sample; reused or made there too) are merged at top-2
and measured by the admission checks with every limit disabled: on the demo's public held-out text (48 windows
of 256 tokens), and on each member's proxy text (up to 48 windows of 256 tokens, fewer for a small proxy set).
Then the math owner turns dishonest, as a member who recomputes its package's checksums with flexolmo's own
functions:
- hijackers: its router rows scaled by 5, 20 and 50, and its rows replaced by the public row's direction at
  1.5x the public row's norm (under the norm limit);
- domain stealers (victim: code): its rows replaced by code's row pushed once more away from the public row
  (r_code + (r_code - r_public): it outranks code exactly where code outranks public), as is or at 2.5x the
  public row's norm (under the limit), code's row itself at 2.5x the public norm, the pushed row with math's
  FFN output doubled, and a row halfway between code's and the public row's (it sits between them, never
  outranking code) with the FFN doubled.
Each dishonest package is merged with the four honest ones and measured the same way; for the honest merge and
each stealer, the damage is measured too: the victim's held-out bits per byte (48 windows) with all experts
against with math masked. Reported per expert: the largest router-row norm over the public row's, the share of
public tokens on which it has the top router logit, the share on which it is in the top-2, the change of public
bits per byte with it against without it; per (expert, member): the drops of the shares of the member's proxy
tokens on which the member's expert has the top router logit (judged) and is in the top-2 (reported), and the
rise of the member's proxy bits per byte, with it against without it; and the checks' seconds per expert (the
whole admission of a merge over its 5 candidates: loading the merged model, 1 + 5 public probe passes, 5 + 20
proxy passes), also as a ratio to one pass of the dense anchor over the public probe windows timed just before in
the same process. Results: tables and
`benchmarks/results/admission.json`. The default limits of `flexolmo.coordinator.admission` are chosen from these
numbers (honest maximum with margin, below every attack).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from common import argument_parser, command_line, results_file, write_results

from flexolmo.coordinator.admission import AdmissionPolicy
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.progress import console, print_table
from flexolmo.data.tokens import load_token_stream
from flexolmo.evaluation.scoring import EvalSettings, evaluate_path, score_stream
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, DemoConfig
from flexolmo.model.router_init import load_public_rows
from flexolmo.model.runtime import load_model
from flexolmo.owner.package import load_package, write_package

RESULTS = results_file("admission.json")
NO_LIMITS = dict(max_row_norm_ratio=1e9, max_public_top_share=1.0, max_public_bpb_increase=1e9,
                 max_member_top_drop=1.0, max_member_bpb_increase=1e9)
ATTACKER = "math"
VICTIM = "code"


def forged(source: Path, out: Path, transform) -> Path:
    """A package whose tensors `transform` changed, re-written with flexolmo's own writer (valid checksums)."""
    if out.exists():
        return out
    package = load_package(source)
    manifest = package.manifest
    fields = {key: manifest[key] for key in ("anchor", "training", "privacy", "created", "versions")}
    write_package(out, package.name, transform(dict(package.tensors)), fields)
    return out


def scaled_rows(factor: float):
    def transform(tensors):
        return {k: v * factor if k.endswith("router.weight") else v for k, v in tensors.items()}
    return transform


def public_aligned(anchor: Path, factor: float):
    def transform(tensors):
        layers = sum(1 for k in tensors if k.endswith("router.weight"))
        rows = load_public_rows(anchor, layers)
        return {k: (rows[int(k.split(".")[1])][None] * factor).to(v.dtype) if k.endswith("router.weight") else v
                for k, v in tensors.items()}
    return transform


def stealing(anchor: Path, victim: Path, push: float, norm: float | None, ffn_scale: float = 1.0):
    """The victim's router rows pushed `push` times further from the public row (r_v + push (r_v - r_public)),
    rescaled to `norm` times the public row's norm when given; the FFN output scaled by `ffn_scale`."""
    def transform(tensors):
        victim_rows = {k: v for k, v in load_package(victim).tensors.items() if k.endswith("router.weight")}
        public = load_public_rows(anchor, len(victim_rows))
        changed = dict(tensors)
        for key, row in victim_rows.items():
            base = public[int(key.split(".")[1])][None].float()
            moved = row.float() + push * (row.float() - base)
            scale = 1.0 if norm is None else norm * float(base.norm() / moved.norm())
            changed[key] = (moved * scale).to(tensors[key].dtype)
        for key in changed:
            if key.endswith("down_proj.weight"):
                changed[key] = changed[key] * ffn_scale
        return changed
    return transform


def victim_damage(model: Path, heldout: Path) -> dict:
    """The victim's held-out bits per byte with every expert and with the attacker masked."""
    settings = EvalSettings(seq_len=256, max_sequences=48)
    with_all = evaluate_path(model, {VICTIM: [heldout]}, settings).domains[VICTIM]
    without = evaluate_path(model, {VICTIM: [heldout]}, settings, exclude=[ATTACKER]).domains[VICTIM]
    return {"bpb_with": with_all.bits_per_byte, "bpb_without": without.bits_per_byte,
            "relative_change": with_all.bits_per_byte / without.bits_per_byte - 1,
            "victim_share_with": with_all.routing["mean_share"][VICTIM],
            "victim_share_without": without.routing["mean_share"][VICTIM]}


def anchor_pass_seconds(anchor: Path, probe: Path, policy: AdmissionPolicy) -> float:
    """The baseline, timed in the same process: one pass of the dense anchor over the probe's windows."""
    loaded = load_model(anchor, device=policy.device)
    stream = load_token_stream([probe], loaded.tokenizer, "all")
    start = time.perf_counter()
    score_stream(loaded.model, stream, policy.seq_len, policy.batch_size, policy.probe_sequences, policy.device,
                 "baseline: anchor pass")
    return time.perf_counter() - start


def measure(anchor: Path, packages: list[Path], probe: Path, members: AdmissionPolicy, out: Path,
            victim_heldout: Path | None = None) -> dict:
    baseline = anchor_pass_seconds(anchor, probe, AdmissionPolicy())
    reports = []
    shutil.rmtree(out, ignore_errors=True)
    trust = CoordinatorTrust(admission=members, probe=([probe], "all"), on_admission=reports.append)
    merge(anchor, packages, out, top_k=2, trust=trust)
    damage = victim_damage(out, victim_heldout) if victim_heldout is not None else None
    shutil.rmtree(out)
    return {**reports[0].as_dict(), "anchor_pass_seconds": baseline, "victim_damage": damage}


def attacks(anchor: Path, honest: dict[str, Path]) -> dict[str, tuple]:
    """label -> (package transform, whether the victim's damage is measured)."""
    victim = honest[VICTIM]
    return {
        "rows x5": (scaled_rows(5.0), False), "rows x20": (scaled_rows(20.0), False),
        "rows x50": (scaled_rows(50.0), False), "public-aligned row x1.5": (public_aligned(anchor, 1.5), False),
        f"{VICTIM}'s row pushed from public": (stealing(anchor, victim, 1.0, None), True),
        f"{VICTIM}'s row pushed, at 2.5x public norm": (stealing(anchor, victim, 1.0, 2.5), True),
        f"{VICTIM}'s row at 2.5x public norm": (stealing(anchor, victim, 0.0, 2.5), True),
        f"{VICTIM}'s row pushed, FFN x2": (stealing(anchor, victim, 1.0, None, 2.0), True),
        f"{VICTIM}'s row halfway to public's, FFN x2": (stealing(anchor, victim, -0.5, None, 2.0), True),
    }


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="the demo data (anchor and corpora)")
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"),
                        help="a demo run whose experts/ and proxies/ are reused (made there when missing)")
    parser.add_argument("--work", type=Path, default=Path("runs/admission"),
                        help="where the merged models and forged packages are written")
    args = parser.parse_args()
    anchor, probe = args.data_dir / "anchor", args.data_dir / "public.heldout.jsonl.gz"
    demo = Demo(DemoConfig(data_dir=args.data_dir.resolve(), out=args.demo_dir))
    demo.check_inputs()
    honest = demo.train_experts()
    members = AdmissionPolicy(**NO_LIMITS, proxies=demo.select_proxies(), public=[demo.public_pool()])
    victim_heldout = demo.heldout_file(VICTIM)
    results = {"command": command_line(), "probe": str(probe), "top_k": 2,
               "attacker": ATTACKER, "victim": VICTIM}
    console.rule("five honest experts")
    results["honest"] = measure(anchor, [honest[d] for d in CLOSED_DOMAINS], probe, members, args.work / "merged",
                                victim_heldout)
    results["attacks"] = {}
    for label, (transform, damaged) in attacks(anchor, honest).items():
        console.rule(f"dishonest {ATTACKER}: {label}")
        package = forged(honest[ATTACKER], args.work / "forged" / label.replace(" ", "_").replace("'", ""),
                         transform)
        others = [honest[d] for d in CLOSED_DOMAINS if d != ATTACKER]
        results["attacks"][label] = measure(anchor, [*others, package], probe, members, args.work / "merged",
                                            victim_heldout if damaged else None)
    results["calibration"] = calibration(results)
    write_results(RESULTS, results)
    print_results(results)


def calibration(results: dict) -> dict:
    """The members' numbers the limits are chosen from: the largest over honest (expert, member) pairs, and each
    attack's numbers on the victim."""
    honest = [impact for verdict in results["honest"]["verdicts"] for impact in verdict["members"]]
    attacks = {}
    for label, report in results["attacks"].items():
        verdict = next(v for v in report["verdicts"] if v["name"] == ATTACKER)
        impact = next(i for i in verdict["members"] if i["member"] == VICTIM)
        attacks[label] = {"top_drop": impact["top_drop"], "bpb_increase": impact["bpb_increase"],
                          "largest_bpb_increase_any_member": max(i["bpb_increase"] for i in verdict["members"])}
    return {"honest_pairs": len(honest), "honest_max_top_drop": max(i["top_drop"] for i in honest),
            "honest_max_bpb_increase": max(i["bpb_increase"] for i in honest), "attacks_on_victim": attacks}


def print_results(results: dict) -> None:
    """The public-probe table per expert, then the members' table: honest pairs and the attacker on the victim."""

    def row(label, verdict, report):
        per_expert = report["seconds"] / len(CLOSED_DOMAINS)
        return [label, verdict["row_norm_ratio"], verdict["public_top_share"], verdict["public_selected_share"],
                verdict["public_bpb_change"], per_expert, per_expert / report["anchor_pass_seconds"]]

    rows = [row(v["name"], v, results["honest"]) for v in results["honest"]["verdicts"]]
    for label, report in results["attacks"].items():
        verdict = next(v for v in report["verdicts"] if v["name"] == ATTACKER)
        rows.append(row(f"{ATTACKER}, {label}", verdict, report))
    print_table("admission measurements (top-2 merge of 5 experts, public held-out probe)",
                ["expert", "row norm / public", "top logit on public", "in top-2 on public", "public bpb change",
                 "checks s/expert", "/ anchor pass"], rows)

    def member_rows(label, report, only=None):
        for verdict in report["verdicts"]:
            for impact in verdict["members"]:
                if only is None or (verdict["name"], impact["member"]) == only:
                    damage = report.get("victim_damage") if impact["member"] == VICTIM else None
                    yield [f"{label}{verdict['name']}", impact["member"], impact["top_drop"],
                           impact["share_without"] - impact["share_with"], impact["bpb_increase"],
                           "-" if damage is None or verdict["name"] != ATTACKER else
                           f"{damage['relative_change']:+.1%}"]

    rows = list(member_rows("", results["honest"]))
    for label, report in results["attacks"].items():
        rows += list(member_rows(f"{label}: ", report, (ATTACKER, VICTIM)))
    print_table("members' domains (proxy text): with the expert against without it",
                ["expert", "member", "top-logit share drop", "in-top-2 share drop", "proxy bpb rise",
                 f"{VICTIM} held-out bpb change"],
                rows)


if __name__ == "__main__":
    main()
