"""One train-expert setting tried at other values: the demo's experts trained again, scored on validation.

    .venv/bin/python benchmarks/bench_owner_setting.py --demo runs/demo --setting router_init_sequences \
        --values 256 1024

    .venv/bin/python benchmarks/bench_owner_setting.py --demo runs/demo --setting negative_bias_start \
        --values -0.5 -1 -2 --also negative_bias=true --router-bias

For each value the five owners train their experts again (the demo's settings and step count otherwise, and each
--also setting), the coordinator merges them the demo's way (top-k, untuned), and the merge is scored on the
shipped `*.validation` files through the demo's evaluation: bits per byte, and the share of each domain's tokens
that reach its own expert (mean over layers). The demo's own merge stands for train-expert's current default of
the setting (at another --seed, or with --also, the default is trained again). --router-bias scores the merges
with the owners' learned router biases applied (flexolmo's runtime; the standard checkpoint, read by
transformers and vLLM, has none); the trained experts are shared with the run without it. Validation only: this
chooses a setting, so the held-out files are not read. The rule, the same for every setting and written before
any run: a value may replace the default only if it lowers the closed-domain average on validation and leaves no
domain (public included) worse than the default by more than 1%; across seeds, the passing value with the
lowest closed average over the seeds run, and a tie keeps the default. Studies: benchmarks/docs/router-lr.md
(router_lr_scale: 0.3 became the default), benchmarks/docs/router-init.md (router_init_sequences),
benchmarks/docs/ablation.md (negative_bias_start). Every step is cached under --work; writes
`benchmarks/results/SETTING.json` (the --seed, --also and --router-bias choices appended to the name:
SETTING_seedN.json, SETTING_negative_bias-true_bias-applied.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.fileio import atomic_write_json
from flexolmo.core.progress import print_table
from flexolmo.evaluation.scoring import evaluate
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import (CLOSED_DOMAINS, PUBLIC, expert_defaults, finished_demo_config,
                                              merged_model_dir)
from flexolmo.owner.expert import ExpertConfig

from common import argument_parser, command_line, results_file, write_results

DOMAINS = [PUBLIC, *CLOSED_DOMAINS]
NUMERIC_SETTINGS = sorted(name for name, field in ExpertConfig.model_fields.items() if field.annotation in (int, float))


def scored(demo: Demo, name: str, model: Path, cache: Path, router_bias: bool) -> dict:
    """Validation bits per byte and own-expert routing share of every domain (cached in `cache`)."""
    if cache.exists():
        return json.loads(cache.read_text())
    loaded = demo.load(model, router_bias=router_bias)
    files = {domain: [demo.validation_file(domain)] for domain in DOMAINS}
    result = evaluate(loaded.model, loaded.tokenizer, files, demo.settings, loaded.expert_names, name)
    bpb = {domain: score.bits_per_byte for domain, score in result.domains.items()}
    bpb["closed_average"] = sum(bpb[domain] for domain in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
    own = {domain: result.domains[domain].routing["mean_share"][domain] for domain in DOMAINS}
    entry = {"bits_per_byte": bpb, "own_expert_share": own}
    atomic_write_json(cache, entry)
    return entry


def adopted(candidate: dict, reference: dict) -> bool:
    """The rule of the module docstring, at one seed."""
    better = candidate["closed_average"] < reference["closed_average"]
    return better and all(candidate[domain] <= 1.01 * reference[domain] for domain in DOMAINS)


def held_settings(pairs: list[str], varied: str) -> dict:
    """`--also NAME=VALUE ...` as train-expert settings, each value read as its ExpertConfig field's type."""
    held = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in ExpertConfig.model_fields or name == varied:
            raise SystemExit(f"error: --also {pair}: expected NAME=VALUE with NAME a train-expert setting other "
                             f"than --setting {varied} (e.g. negative_bias=true)")
        try:
            held[name] = TypeAdapter(ExpertConfig.model_fields[name].annotation).validate_python(value)
        except ValidationError as error:
            raise SystemExit(f"error: --also {pair}: {error.errors()[0]['msg']}") from None
    return held


def run_name(setting: str, seed: int | None, held: dict, router_bias: bool) -> str:
    """The run's name, for its work folder and results file: the setting, then what differs from a plain run."""
    parts = [setting, *([f"seed{seed}"] if seed is not None else []),
             *(f"{name}-{str(value).lower()}" for name, value in sorted(held.items())),
             *(["bias-applied"] if router_bias else [])]
    return "_".join(parts)


def parse_args() -> argparse.Namespace:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo run")
    parser.add_argument("--setting", required=True, choices=NUMERIC_SETTINGS, help="the train-expert setting varied")
    parser.add_argument("--values", type=float, nargs="+", required=True, help="the values tried besides the default")
    parser.add_argument("--seed", type=int, default=None,
                        help="train every set of experts with this seed instead of the demo's (then the default is "
                             "trained again too): the seed-to-seed spread the differences are read against")
    parser.add_argument("--also", nargs="+", default=[], metavar="NAME=VALUE",
                        help="train-expert settings held at VALUE for every value tried, the default's included "
                             "(which is then trained again instead of taken from the demo)")
    parser.add_argument("--router-bias", action="store_true",
                        help="score with the owners' learned router biases applied (flexolmo's runtime only)")
    parser.add_argument("--work", type=Path, default=Path("runs/owner-setting"),
                        help="where every step is cached (a folder per setting, seed and --also)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: benchmarks/results/SETTING.json, the --seed, --also and "
                             "--router-bias choices appended to the name)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    held = held_settings(args.also, args.setting)
    demo_config = finished_demo_config(args.demo)
    cast = ExpertConfig.model_fields[args.setting].annotation
    if cast is int and any(value != int(value) for value in args.values):
        raise SystemExit(f"error: --setting {args.setting} takes whole numbers, not {args.values}")
    values = sorted({cast(value) for value in args.values})
    default = expert_defaults()[args.setting]
    seed = demo_config.seed if args.seed is None else args.seed
    training = run_name(args.setting, None if seed == demo_config.seed else seed, held, False)
    scoring = "_bias-applied" if args.router_bias else ""
    out = args.out or results_file(f"{training}{scoring}.json")
    work = args.work / training  # the trained experts, shared by the runs with and without --router-bias
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if seed == demo_config.seed and not held:
        results[default] = scored(Demo(demo_config), "flexolmo_untuned", merged_model_dir(args.demo, "flexolmo", None),
                                  work / f"value{default:g}{scoring}.json", args.router_bias)
    for value in sorted({*values, default} - set(results)):
        bench = Demo(demo_config.model_copy(update={"out": work / f"value{value:g}", "ablation": False, "seed": seed}))
        bench.check_inputs()
        model = bench.merged(bench.train_experts(**{**held, args.setting: value}), f"{args.setting}{value:g}")
        results[value] = scored(bench, f"flexolmo_{args.setting}{value:g}", model,
                                work / f"value{value:g}{scoring}.json", args.router_bias)
    rows = sorted(results.items())
    held_text = "".join(f", {name}={value}" for name, value in held.items())
    biases = ", router biases applied" if args.router_bias else ""
    print_table(f"bits per byte on validation text, FlexOlmo (untuned) by {args.setting} (default {default:g}"
                f"{held_text}{biases})",
                [args.setting, *DOMAINS, "closed avg"],
                [[f"{value:g}", *[f"{entry['bits_per_byte'][d]:.4f}" for d in [*DOMAINS, "closed_average"]]]
                 for value, entry in rows])
    print_table("share of each domain's validation tokens routed to its own expert (mean over layers)",
                [args.setting, *DOMAINS],
                [[f"{value:g}", *[f"{entry['own_expert_share'][d]:.3f}" for d in DOMAINS]] for value, entry in rows])
    verdicts = {f"{value:g}": adopted(entry["bits_per_byte"], results[default]["bits_per_byte"])
                for value, entry in rows if value != default}
    print(f"passing the rule at seed {seed}: {[value for value, ok in verdicts.items() if ok] or 'none'}")
    write_results(out, {"command": command_line(), "setting": args.setting, "default": default, "seed": seed,
                        "also": held, "router_bias_applied": args.router_bias,
                        "validation": {f"{value:g}": entry for value, entry in rows},
                        "adopted": verdicts, "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
