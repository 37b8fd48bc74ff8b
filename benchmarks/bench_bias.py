"""What the negative router bias is worth at inference on the demo, and whether a flex_olmo checkpoint could carry it.

    .venv/bin/python benchmarks/bench_bias.py --work runs/router-tuning

Five experts trained with `--negative-bias` (otherwise train-expert's defaults at the demo's sizes) are merged at
top-2 and scored twice: as transformers and vLLM run the checkpoint (no bias: the format has none) and with
flexolmo's runtime applying the biases the merge keeps in `flexolmo_experts.json`. The same five experts
trained without the bias (shared with `bench_router_tuning.py` through --work) are the third row. Scores are
on validation text (hash-held-out part of each `<domain>.train.jsonl.gz`) and on the held-out evaluation files.

Then the question of a faithful carrier: OLMo-2 layers are post-norm, so the router's input is the raw residual
stream h. A bias b_e could ride in the router row only if some coordinate k of h were a constant c in every
layer at every token: r_e[k] += b_e / c. The script measures, per layer, the coordinate of h with the smallest
coefficient of variation (std / |mean|) over validation tokens; folding b into it would add logit noise of
std |b| * that ratio. Writes `benchmarks/results/bias.json` (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_router_tuning import merged, prepare_data, scored, train_experts

from flexolmo.data import load_token_stream
from flexolmo.demo import CLOSED_DOMAINS, PUBLIC, DemoConfig
from flexolmo.fileio import atomic_write_json
from flexolmo.moe import decoder_layers
from flexolmo.progress import print_table
from flexolmo.runtime import load_model

RESULTS = Path(__file__).parent / "results" / "bias.json"


@torch.no_grad()
def most_constant_coordinate(anchor_dir: Path, files: dict[str, list[Path]], seq_len: int, per_domain: int) -> list[dict]:
    """Per layer, the FFN-input coordinate with the smallest std / |mean| over tokens of every domain."""
    loaded = load_model(anchor_dir)
    layers = decoder_layers(loaded.model)
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        for paths in files.values():
            stream = load_token_stream(paths, loaded.tokenizer, "all")
            for index in range(min(per_domain, stream.num_sequences(seq_len))):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/router-tuning"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    demo = DemoConfig()
    began = time.perf_counter()
    data = prepare_data(demo, args.work)
    plain = merged(demo, train_experts(demo, args.work / "experts"), args.work / "models" / "untuned")
    biased = merged(demo, train_experts(demo, args.work / "experts-bias", negative_bias=True),
                    args.work / "models" / "bias")
    evals = args.work / "evals"
    results = {}
    for split in ("validation", "heldout"):
        results[split] = {
            "no bias trained": scored(plain, data[split], evals / f"untuned.{split}.json", demo),
            "bias trained, dropped (transformers/vLLM)": scored(biased, data[split], evals / f"bias.{split}.json", demo),
            "bias trained, applied (flexolmo runtime)": scored(biased, data[split], evals / f"bias-applied.{split}.json",
                                                               demo, router_bias=True),
        }
    metadata = json.loads((biased / "flexolmo_experts.json").read_text())
    biases = {entry["name"]: entry["router_bias"] for entry in metadata["experts"] if "router_bias" in entry}
    constant = most_constant_coordinate(demo.data_dir / "anchor", data["validation"], demo.seq_len, per_domain=8)
    domains = [PUBLIC, *CLOSED_DOMAINS, "closed_average"]
    for split, rows in results.items():
        print_table(f"bits per byte on {split} text", ["model", *domains],
                    [[name, *[scores[d] for d in domains]] for name, scores in rows.items()])
    print_table("learned router bias per layer", ["expert", *[f"layer {i}" for i in range(len(constant))]],
                [[name, *values] for name, values in biases.items()])
    print_table("most constant coordinate of the router's input", ["layer", "coordinate", "mean", "std",
                                                                   "std / |mean|"],
                [[c["layer"], c["coordinate"], c["mean"], c["std"], c["std_over_abs_mean"]] for c in constant])
    atomic_write_json(args.out, {"command": " ".join([".venv/bin/python", *sys.argv]), "results": results,
                                 "learned_bias": biases, "most_constant_coordinate": constant,
                                 "seconds": time.perf_counter() - began})


if __name__ == "__main__":
    main()
