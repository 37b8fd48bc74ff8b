"""How much public text owners should mix into their batches: the demo's experts at other shares, on validation.

    .venv/bin/python benchmarks/bench_public_share.py --demo runs/demo

The demo's owners mix the anchor's public sample into half of every batch (train-expert's default, 0.5). This
script trains the five experts again at each other share (the demo's settings and step count otherwise),
merges them the demo's way (top-k, untuned) and scores them on the shipped `*.validation` files through the
demo's evaluation, beside the demo's own merge at its share and the anchor. Validation only: this is a choice of
setting, so the held-out files are not read. Every step is cached under --work; writes
`benchmarks/results/public_share.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.progress import print_table
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, finished_demo_config, merged_model_dir

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("public_share.json")


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo run")
    parser.add_argument("--work", type=Path, default=Path("runs/public-share"), help="where every step is cached")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.75], help="public shares tried")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    began = time.perf_counter()
    demo_config = finished_demo_config(args.demo)
    scores = {demo_config.public_share: Demo(demo_config).validated("flexolmo_untuned",
                                                                    merged_model_dir(args.demo, "flexolmo", None))}
    reference = Demo(demo_config.model_copy(update={"out": args.work / "anchor", "ablation": False}))
    reference.check_inputs()
    anchor = reference.validated("public", demo_config.data_dir / "anchor")
    for share in args.shares:
        bench = Demo(demo_config.model_copy(update={"out": args.work / f"share{share:g}", "public_share": share,
                                                    "ablation": False}))
        bench.check_inputs()
        model = bench.merged(bench.train_experts(), f"public_share{share:g}")
        scores[share] = bench.validated(f"flexolmo_public_share{share:g}", model)
    domains = [PUBLIC, *CLOSED_DOMAINS, "closed_average"]
    rows = sorted(scores.items())
    print_table("bits per byte on validation text, FlexOlmo (untuned) by owners' public share",
                ["public share", *domains],
                [["anchor", *[anchor[d] for d in domains]], *[[share, *[s[d] for d in domains]] for share, s in rows]])
    write_results(args.out, {"command": command_line(),
                                 "demo_public_share": demo_config.public_share,
                                 "validation": {"anchor": anchor, **{f"{share:g}": s for share, s in rows}},
                                 "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
