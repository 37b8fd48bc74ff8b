"""What a finished demo adds up to: each method's training cost under each protocol, the summary of its numbers
(`results.json`), and the table printed at the end."""

from __future__ import annotations

from flexolmo.core.progress import print_table
from flexolmo.experiments.compute import TrainingRun, method_cost
from flexolmo.experiments.demo_config import (
    CLOSED_DOMAINS,
    MIXED,
    PROTOCOLS,
    PUBLIC,
    ROWS,
    DemoConfig,
    flexolmo_runs,
)

# A cost spec: (the method's training runs, how many owners' text they hold, inference keywords of method_cost).
Spec = tuple[list[TrainingRun], int, dict]


def shared_specs(config: DemoConfig, flexolmo_lr: float | None) -> dict[str, Spec]:
    """The methods that are the same under both protocols (nothing of them is a dense expert). `flexolmo_lr`: the
    router-tuning lr the rule chose for FlexOlmo (None: untuned), which decides whether the random-init ablation
    was tuned."""
    owners, moe = len(CLOSED_DOMAINS), {"experts_per_token": config.top_k}
    flexolmo = flexolmo_runs(config)
    coordinated, tunings = flexolmo[:owners], flexolmo[owners:]
    return {
        "public": ([], 0, {}),
        "flexolmo_untuned": (coordinated, owners, moe),
        "flexolmo": (flexolmo, owners, moe),  # every tuning tried counts, even when the untuned model won
        "flexolmo_owner_only": (flexolmo_runs(config, owner_only=True), owners, moe),
        "flexolmo_random_init": (coordinated + ([] if flexolmo_lr is None else tunings[:1]), owners, moe),
        "flexolmo_bias_dropped_untuned": (coordinated, owners, moe),
        "flexolmo_bias_untuned": (coordinated, owners, moe),
    }


def protocol_specs(config: DemoConfig, anchor_config: dict, protocol: str) -> dict[str, Spec]:
    """The methods built from the dense experts, each trained as `protocol` says."""
    owners, members = len(CLOSED_DOMAINS), len(CLOSED_DOMAINS) + 1
    dense = [config.dense_run(protocol, anchor_config)] * owners
    full = [config.dense_run(protocol, anchor_config, full_model=True)] * owners
    tunings = flexolmo_runs(config)[owners:]
    # The paper's BTM: every member reads the context (with at least two tokens there is something to score),
    # the k kept members read the whole window; in full-model passes per token of the window.
    context = config.context_tokens if config.context_tokens >= 2 else 0
    sequence_btm = (members * context + min(config.btm_top_k, members) * config.seq_len) / config.seq_len
    return {
        **{f"dense_{d}": (dense[:1], 1, {}) for d in CLOSED_DOMAINS},
        "model_soup": (dense, owners, {}),
        "btm": (dense, owners, {"forward_passes": sequence_btm}),
        "btm_per_position": (dense, owners, {"forward_passes": members}),
        "prompt_routing": (dense, owners, {}),
        "prompt_routing_private": (dense, owners, {}),
        "btx_ffn_untuned": (dense, owners, {"experts_per_token": config.top_k}),
        "btx_ffn": (dense + tunings, owners, {"experts_per_token": config.top_k}),
        "unrestricted": ([config.dense_run(protocol, anchor_config, owners)], owners, {}),
        "model_soup_full": (full, owners, {}),
        "btm_full": (full, owners, {"forward_passes": sequence_btm}),
        "prompt_routing_full": (full, owners, {}),
        "btx_untuned": (full, owners, {"experts_per_token": config.top_k}),
        "btx": (full + tunings, owners, {"experts_per_token": config.top_k}),
    }


def method_costs(config: DemoConfig, anchor_config: dict, selection: dict) -> dict[str, dict[str, dict]]:
    """Per protocol, per method: training FLOPs, tokens, owner tokens (in all and per owner) and public tokens over
    all its runs, and its inference FLOPs and forward passes per token (`flexolmo.experiments.compute`; the
    anchor's pretraining, shared by all, is not counted)."""
    costs = {}
    for protocol in PROTOCOLS:
        specs = {**shared_specs(config, selection["flexolmo"]["chosen_lr"]),
                 **protocol_specs(config, anchor_config, protocol)}
        costs[protocol] = {}
        for method, (runs, owners, inference) in specs.items():
            cost = method_cost(anchor_config, config.seq_len, runs, **inference)
            cost["owner_tokens_per_owner"] = cost["owner_tokens"] // owners if owners else 0
            costs[protocol][method] = cost
    return costs


def rows(evaluations: dict[str, dict]) -> dict[str, dict]:
    """Bits per byte per method and domain, the closed-domain average and the average with public text."""
    table = {}
    for method, result in evaluations.items():
        row = {domain: score["bits_per_byte"] for domain, score in result["domains"].items()}
        row["closed_average"] = sum(row[d] for d in CLOSED_DOMAINS) / len(CLOSED_DOMAINS)
        row["average_with_public"] = (row["closed_average"] * len(CLOSED_DOMAINS) + row[PUBLIC]) / \
            (len(CLOSED_DOMAINS) + 1)
        table[method] = row
    return table


def summarise(config: DemoConfig, shared: dict[str, dict], by_protocol: dict[str, dict[str, dict]],
              opt_out: dict[str, dict], costs: dict[str, dict[str, dict]]) -> dict:
    """`results.json`: per protocol, bits per byte and costs of every method run (the shared ones in both, with the
    same numbers), in the order of `ROWS`; routing, kept mass and opt-out deltas of FlexOlmo."""
    protocols = {}
    for protocol, title in PROTOCOLS.items():
        table = rows({**shared, **by_protocol[protocol]})
        order = [m for m in ROWS if m in table]
        dense = costs[protocol]["model_soup"]
        protocols[protocol] = {
            "title": title,
            "owner_tokens_per_owner": dense["owner_tokens_per_owner"],
            "methods": {m: table[m] for m in order},
            "costs": {m: costs[protocol][m] for m in order},
        }
    full = rows({"flexolmo": shared["flexolmo"]})["flexolmo"]
    deltas = {}
    for removed, result in opt_out.items():
        change = {d: result["domains"][d]["bits_per_byte"] - full[d] for d in (PUBLIC, *CLOSED_DOMAINS, MIXED)}
        others = [change[d] for d in CLOSED_DOMAINS if d != removed]
        deltas[removed] = {"delta_bits_per_byte": change, "own_domain": change[removed],
                           "other_closed_mean": sum(others) / len(others)}
    routed = {domain: score["routing"] for domain, score in shared["flexolmo"]["domains"].items()
              if "routing" in score}
    return {
        "quick": config.quick,
        "note": "smoke run: a few steps, numbers are not meaningful" if config.quick else "full demo",
        "config": config.model_dump(mode="json"),
        "domains": [PUBLIC, *CLOSED_DOMAINS, MIXED],
        "labels": {m: ROWS[m].label for m in protocols["flop_matched"]["methods"]},
        "shared": [m for m in protocols["flop_matched"]["methods"] if m in shared],
        "protocols": protocols,
        "routing": {domain: r["mean_share"] for domain, r in routed.items()},
        "kept_mass": {domain: {key: r["kept_mass"][key] for key in ("mean", "lowest_layer_p5")}
                      for domain, r in routed.items()},
        "opt_out": deltas,
        "details": {**shared, **{f"{p}/{m}": result for p, methods in by_protocol.items()
                                 for m, result in methods.items()}},
    }


def show(results: dict) -> None:
    """The summary in the terminal: public, mixed and closed-domain average under each protocol (report.md has
    every domain)."""
    protocols = results["protocols"]
    keys = [(d, p) for d in (PUBLIC, MIXED, "closed_average") for p in protocols]
    columns = ["method", *[f"{d.replace('_average', ' avg')} ({p.replace('_', '-')})" for d, p in keys]]
    table = [[m, *[protocols[p]["methods"][m][d] for d, p in keys]]
             for m in protocols["flop_matched"]["methods"]]
    title = "bits per byte on held-out text (lower is better), both protocols"
    if results["quick"]:
        title += " -- QUICK SMOKE RUN, NOT MEANINGFUL"
    print_table(title, columns, table)
    print_table("opt-out: change in bits per byte when an expert is removed",
                ["removed", "own domain", "other closed (mean)", "public"],
                [[name, d["own_domain"], d["other_closed_mean"], d["delta_bits_per_byte"][PUBLIC]]
                 for name, d in results["opt_out"].items()])
