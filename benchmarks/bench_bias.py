"""Whether a flex_olmo checkpoint could carry the negative router bias: how far from constant the router's input is.

    .venv/bin/python benchmarks/bench_bias.py --demo runs/demo

What the bias is worth is measured by `flexolmo demo --ablation` (benchmarks/docs/ablation.md): the same experts
scored with and without it. This script answers the other half of the question. OLMo-2 layers are post-norm, so
the router's input is the raw residual stream h. A bias b_e could ride in the router row only if some coordinate
k of h were a constant c at every token: r_e[k] += b_e / c. Per layer, the script finds the coordinate of h with
the smallest coefficient of variation (std / |mean|) over tokens of every shipped `*.validation` file; folding
b_e into it would add router-logit noise of standard deviation |b_e| * that ratio, token by token. With a
finished `--ablation` demo it also reads the biases the owners learned (`flexolmo_experts.json` of the merged
negative-bias model) and reports that noise per expert and layer.

With --prior, a third question: is a bias started below zero worth something because the owners train with it, or
only as a prior at inference? The demo's FlexOlmo merge (untuned; its owners trained without a bias) is scored on
the shipped `*.validation` files with a fixed bias on every owner's router row in every layer, applied by
flexolmo's runtime, at each value given (0 is the merge as it is). Writes `benchmarks/results/bias.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.progress import print_table
from flexolmo.data.tokens import load_token_stream
from flexolmo.experiments.demo import Demo
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, PUBLIC, DemoConfig, finished_demo_config, merged_model_dir
from flexolmo.model.merged_format import MERGED_METADATA_FILE, kept_router_biases, read_merged_info
from flexolmo.model.moe import decoder_layers, set_router_bias
from flexolmo.model.runtime import load_model

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("bias.json")


@torch.no_grad()
def most_constant_coordinate(anchor_dir: Path, files: list[Path], seq_len: int, windows: int) -> list[dict]:
    """Per layer, the FFN-input coordinate with the smallest std / |mean| over the first `windows` windows of
    every file."""
    loaded = load_model(anchor_dir)
    layers = decoder_layers(loaded.model)
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        for path in files:
            stream = load_token_stream([path], loaded.tokenizer, "all")
            for index in range(min(windows, stream.num_sequences(seq_len))):
                loaded.model(input_ids=torch.from_numpy(stream.sequence(index, seq_len)[:-1])[None])
    finally:
        for handle in handles:
            handle.remove()
    report = []
    for layer, chunks in enumerate(inputs):
        hidden = torch.cat(chunks)
        ratio = hidden.std(0) / hidden.mean(0).abs().clamp_min(1e-12)
        best = int(ratio.argmin())
        report.append({"layer": layer, "coordinate": best, "mean": float(hidden[:, best].mean()),
                       "std": float(hidden[:, best].std()), "std_over_abs_mean": float(ratio[best]),
                       "tokens": int(hidden.shape[0])})
    return report


def learned_biases(demo_out: Path) -> dict[str, list[float]]:
    """The per-layer biases the ablation's owners learned, as the merge kept them; empty without an ablation run."""
    merged = merged_model_dir(demo_out, "flexolmo_negative_bias", None)
    if not (merged / MERGED_METADATA_FILE).exists():
        return {}
    info = read_merged_info(merged)
    kept = kept_router_biases(info.metadata["experts"])
    return {info.expert_names[slot]: per_layer for slot, per_layer in kept.items()}


def scored_with_prior(demo_out: Path, values: list[float]) -> dict[str, dict[str, float]]:
    """Validation bits per byte of the demo's untuned FlexOlmo with each fixed owner-row bias (see --prior)."""
    demo = Demo(finished_demo_config(demo_out))
    loaded = demo.load(merged_model_dir(demo_out, "flexolmo", None))
    layers = len(decoder_layers(loaded.model))
    scores = {}
    for value in sorted(set(values) | {0.0}, reverse=True):
        for expert in range(1, len(loaded.expert_names)):  # slot 0 is the public expert; each value replaces the last
            set_router_bias(loaded.model, expert, [value] * layers)
        scores[f"{value:g}"] = demo.validation_scores(loaded, f"flexolmo_prior{value:g}")
    return scores


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"),
                        help="a demo run; with --ablation finished, its learned biases are reported")
    parser.add_argument("--windows", type=int, default=8, help="windows of each validation file read")
    parser.add_argument("--prior", type=float, nargs="+", default=[], metavar="BIAS",
                        help="also score the finished demo's FlexOlmo on validation text with this fixed bias (<= 0) "
                             "on every owner's router row at inference (flexolmo's runtime)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = parser.parse_args()
    if any(value > 0 for value in args.prior):
        raise SystemExit(f"error: --prior takes biases <= 0 (a negative bias), not {args.prior}")
    # The finished demo's own anchor and text when there is one (its biases are read from it), else the shipped ones.
    demo = finished_demo_config(args.demo) if (args.demo / "results.json").exists() else DemoConfig()
    began = time.perf_counter()
    files = [demo.data_dir / f"{domain}.validation.jsonl.gz" for domain in (PUBLIC, *CLOSED_DOMAINS)]
    constant = most_constant_coordinate(demo.data_dir / "anchor", files, demo.seq_len, args.windows)
    biases = learned_biases(args.demo)
    noise = {name: [abs(b) * c["std_over_abs_mean"] for b, c in zip(values, constant)]
             for name, values in biases.items()}
    print_table("most constant coordinate of the router's input (demo anchor, shipped validation text)",
                ["layer", "coordinate", "mean", "std", "std / |mean|", "tokens"],
                [[c["layer"], c["coordinate"], c["mean"], c["std"], c["std_over_abs_mean"], c["tokens"]]
                 for c in constant])
    if biases:
        layers = [f"layer {c['layer']}" for c in constant]
        print_table("learned bias per layer", ["expert", *layers], [[n, *v] for n, v in biases.items()])
        print_table("router-logit noise std if folded into that coordinate", ["expert", *layers],
                    [[n, *v] for n, v in noise.items()])
    prior = scored_with_prior(args.demo, args.prior) if args.prior else {}
    if prior:
        domains = [PUBLIC, *CLOSED_DOMAINS, "closed_average"]
        print_table("validation bits per byte, the demo's FlexOlmo with a fixed owner-row bias at inference",
                    ["bias", *domains], [[value, *[row[d] for d in domains]] for value, row in prior.items()])
    write_results(args.out, {"command": command_line(), "inference_prior_validation": prior,
                                 "validation_files": [str(f) for f in files], "windows_per_file": args.windows,
                                 "seq_len": demo.seq_len, "most_constant_coordinate": constant,
                                 "learned_bias": biases, "folded_logit_noise_std": noise,
                                 "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    try:
        main()
    except FlexOlmoError as error:
        raise SystemExit(f"error: {error}") from None
