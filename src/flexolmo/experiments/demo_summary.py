"""What a finished demo adds up to: each method's training cost, the summary of its numbers, and the table
printed at the end."""

from __future__ import annotations

from pathlib import Path

from flexolmo.core.progress import print_table
from flexolmo.experiments.compute import TrainingRun, method_cost
from flexolmo.experiments.demo_config import CLOSED_DOMAINS, MIXED, PUBLIC, DemoConfig, flexolmo_runs
from flexolmo.model.anchor import read_config


def method_costs(config: DemoConfig, anchor_dir: Path, flexolmo_lr: float | None) -> dict[str, dict]:
    """Per method: its members and what it costs (`flexolmo.experiments.compute`): training FLOPs and tokens over all
    its runs, the owners' tokens among them, and inference FLOPs per token (the anchor's pretraining, shared by all,
    is not counted). `flexolmo_lr`: the router-tuning lr validation chose for FlexOlmo (None: untuned won), which
    decides whether the random-init ablation was tuned."""

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
        closed_total = row["closed_average"] * len(CLOSED_DOMAINS)
        row["average_with_public"] = (closed_total + row[PUBLIC]) / (len(CLOSED_DOMAINS) + 1)
        methods[method] = row
    full = methods["flexolmo"]
    deltas = {}
    for removed, result in opt_out.items():
        change = {d: result["domains"][d]["bits_per_byte"] - full[d] for d in (PUBLIC, *CLOSED_DOMAINS, MIXED)}
        others = [change[d] for d in CLOSED_DOMAINS if d != removed]
        deltas[removed] = {"delta_bits_per_byte": change, "own_domain": change[removed],
                           "other_closed_mean": sum(others) / len(others)}
    routed = {domain: score["routing"] for domain, score in evaluations["flexolmo"]["domains"].items()
              if "routing" in score}
    routing = {domain: r["mean_share"] for domain, r in routed.items()}
    kept_mass = {domain: {key: r["kept_mass"][key] for key in ("mean", "lowest_layer_p5")}
                 for domain, r in routed.items()}
    return {
        "quick": config.quick,
        "note": "smoke run: a few steps, numbers are not meaningful" if config.quick else "full demo",
        "config": config.model_dump(mode="json"),
        "domains": [PUBLIC, *CLOSED_DOMAINS, MIXED],
        "methods": methods,
        "routing": routing,
        "kept_mass": kept_mass,
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
