"""The demo's report: `report.md` with its tables, the checks of what the paper leads us to expect, and plots."""

from __future__ import annotations

from pathlib import Path

from flexolmo.core.fileio import atomic_write_bytes

CLOSED = ("code", "math", "legal", "biomedical", "literature")


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = ["| " + " | ".join(columns) + " |", rule]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# The paper's merging baselines, as the default demo builds them: from FFN-only dense experts (its BTX is the paper's
# "no coordinated training" ablation). `--ablation` adds them from full-model dense experts, as the paper trains them.
MERGING_BASELINES = ("model_soup", "btm", "btx_ffn", "prompt_routing")
PAPER_BASELINES = ("model_soup_full", "btm_full", "btx", "prompt_routing_full")


def expectation_checks(results: dict) -> list[tuple[str, bool, str]]:
    """The goals of the paper's method on this demo, each with whether it holds here and the numbers behind it:
    FlexOlmo against each merging baseline under each protocol, then the checks of FlexOlmo itself."""
    checks = []
    for protocol, entry in results["protocols"].items():
        methods = entry["methods"]
        flex = methods["flexolmo"]["closed_average"]
        for rival in (*MERGING_BASELINES, *(m for m in PAPER_BASELINES if m in methods)):
            checks.append((f"FlexOlmo beats {rival} on the closed-domain average ({protocol.replace('_', '-')})",
                           flex < methods[rival]["closed_average"],
                           f"{flex:.4f} vs {methods[rival]['closed_average']:.4f}"))
        if "unrestricted" in methods:  # the upper bound is trained with --ablation only
            checks.append((f"FlexOlmo vs unrestricted pooled training ({protocol.replace('_', '-')}; closed average; "
                           "informative: pooling is what the owners cannot do)",
                           flex < methods["unrestricted"]["closed_average"],
                           f"{flex:.4f} vs {methods['unrestricted']['closed_average']:.4f}"))
    methods = results["protocols"]["flop_matched"]["methods"]  # FlexOlmo's own rows are the same in both
    flex, public = methods["flexolmo"], methods["public"]

    def change(method: str, domain: str) -> float:
        return 100 * (methods[method][domain] / public[domain] - 1)

    checks.append(("FlexOlmo stays within 1% of the anchor on public text", change("flexolmo", "public") <= 1.0,
                   f"{change('flexolmo', 'public'):+.2f}%"))
    worse = [d for d in (*CLOSED, "mixed") if flex[d] >= public[d]]
    checks.append(("FlexOlmo leaves no closed or mixed domain worse than the anchor", not worse,
                   "worse on: " + ", ".join(worse) if worse else
                   ", ".join(f"{d} {change('flexolmo', d):+.1f}%" for d in (*CLOSED, "mixed"))))
    checks.append(("Router tuning improves the closed-domain average",
                   flex["closed_average"] < methods["flexolmo_untuned"]["closed_average"],
                   f"{flex['closed_average']:.4f} tuned vs {methods['flexolmo_untuned']['closed_average']:.4f}"))
    own_costs = [d for d, v in results["opt_out"].items() if v["own_domain"] > v["other_closed_mean"]]
    checks.append(("Removing an expert costs mostly its own domain", len(own_costs) == len(results["opt_out"]),
                   f"{len(own_costs)} of {len(results['opt_out'])} experts"))
    return checks


ABLATION = (("flexolmo", "FlexOlmo, full method (coordinated experts, domain-informed router rows, tuned router)"),
            ("flexolmo_untuned", "without router tuning"),
            ("btx_ffn", "without coordinated training (BTX: FFN-only dense experts, tuned router)"),
            ("btx_ffn_untuned", "without coordinated training and without router tuning"),
            ("btx", "the paper's BTX (full-model dense experts, non-FFN weights averaged, tuned router)"),
            ("btx_untuned", "the paper's BTX without router tuning"),
            ("flexolmo_owner_only", "owners train on their text only (public share 0, the paper's owners)"),
            ("flexolmo_random_init", "without the domain-informed router initialisation "
                                     "(random rows; tuning as FlexOlmo's)"),
            ("flexolmo_bias_dropped_untuned", "owners trained with the negative bias, bias dropped as in the "
                                              "standard checkpoint (no tuning)"),
            ("flexolmo_bias_untuned", "the same experts with the bias applied (flexolmo's runtime; no tuning)"))

# The rule every setting chosen in a run follows, written before any run (docs/demo.md says the same).
RULE = ("Router tuning, for every method that tunes (FlexOlmo, each BTX, FlexOlmo owner-only): the candidates are "
        "the untuned model, then tuning at each learning rate of `tune_lrs`, smallest first; the kept one has the "
        "lowest closed-domain average bits per byte on the `*.validation` files; a tie keeps the earlier candidate. "
        "Every other setting (public share, steps, learning rates of experts and dense experts, top-k) is fixed "
        "before the run. Held-out text is read only to fill these tables.")


def _intro(results: dict) -> list[str]:
    """The report's opening: what was run, the two protocols, and how every model is scored."""
    config = results["config"]
    lines = ["# FlexOlmo demo report", ""]
    if results["quick"]:
        lines += ["> **Quick smoke run: a few training steps and sequences. These numbers are not meaningful.**", ""]
    lines += [
        "Produced by `flexolmo demo" + (" --quick" if results["quick"] else "") + "` on the shipped anchor and "
        "corpora. Every model is scored by the same evaluation (`flexolmo.evaluation.scoring.evaluate`) on "
        f"held-out documents: at most {config['eval_max_sequences']} windows of {config['seq_len']} tokens per "
        f"domain, the first {config['context_tokens']} tokens of each window context only (never scored, for every "
        "method). Bits per byte = summed loss in bits / the UTF-8 bytes that exactly the scored tokens encode; "
        "lower is better.",
        "",
        "Two protocols decide how much each dense expert (the members of every merging baseline) trains. FlexOlmo's "
        "own models are the same in both.",
        "",
    ]
    for protocol, entry in results["protocols"].items():
        soup = entry["costs"]["model_soup"]
        how = ("the same owner tokens as a FlexOlmo expert, in as many steps; compute is reported, not matched"
               if protocol == "data_matched" else "steps until five dense experts cost FlexOlmo's training FLOPs")
        lines.append(f"- **{entry['title']}**: {how}: {entry['owner_tokens_per_owner']:,} owner tokens per owner "
                     f"({soup['training_flops'] / 1e15:.3f} PFLOPs for the five).")
    return lines + ["", f"Settings chosen in the run: {RULE}", ""]


def _both(results: dict, value) -> list[list]:
    """One row per method: `value(protocol entry, method)` under each protocol, side by side per key."""
    protocols = results["protocols"]
    return [[m, *value(protocols, m)] for m in protocols["flop_matched"]["methods"]]


def _quality_tables(results: dict) -> list[str]:
    """Costs, bits per byte and change against the anchor under both protocols, and the ablation."""
    protocols = results["protocols"]
    names = list(protocols)
    short = {p: p.replace("_", "-") for p in names}
    keys = [*results["domains"], "closed_average"]

    def header(key: str) -> list[str]:
        return [f"{key.replace('_average', ' avg')} ({short[p]})" for p in names]

    def cost(p: str, m: str, key: str) -> object:
        return protocols[p]["costs"][m][key]

    return [
        "## What each method is and what it costs",
        "",
        "Training PFLOPs: matmul FLOPs over all of a method's training runs (`flexolmo.experiments.compute`; the "
        "anchor's pretraining, shared by all, is not counted; every router tuning tried counts). Owner tokens: of "
        "the owners' private text, per owner; public tokens: the rest (public mix, proxies). Forward passes: "
        "full-model passes per token of a window (the paper's BTM: every member reads the context, the kept ones "
        "the window).",
        "",
        markdown_table(["method", "what it is", *[f"owner tokens/owner ({short[p]})" for p in names],
                        *[f"public tokens ({short[p]})" for p in names],
                        *[f"training PFLOPs ({short[p]})" for p in names], "forward passes/token",
                        "inference GFLOPs/token"],
                       _both(results, lambda _, m: [
                           results["labels"][m], *[f"{cost(p, m, 'owner_tokens_per_owner'):,}" for p in names],
                           *[f"{cost(p, m, 'public_tokens'):,}" for p in names],
                           *[f"{cost(p, m, 'training_flops') / 1e15:.3f}" for p in names],
                           f"{cost(names[0], m, 'forward_passes_per_token'):.3g}",
                           f"{cost(names[0], m, 'inference_flops_per_token') / 1e9:.4f}"])),
        "",
        "## Bits per byte by method and domain, both protocols",
        "",
        markdown_table(["method", *[h for k in keys for h in header(k)]],
                       _both(results, lambda ps, m: [ps[p]["methods"][m][k] for k in keys for p in names])),
        "",
        "## Change against the public anchor (%), both protocols",
        "",
        markdown_table(["method", *[h for k in keys for h in header(k)]],
                       _both(results, lambda ps, m: [
                           f"{100 * (ps[p]['methods'][m][k] / ps[p]['methods']['public'][k] - 1):+.1f}"
                           for k in keys for p in names])),
        "",
        "## Ablation (the paper's Table 1, on this demo)",
        "",
        "Rows present in this run (`flexolmo demo --ablation` adds owner-only experts, the router initialisation "
        "and the negative bias, each of which needs five more experts). Compare the bias rows with "
        "flexolmo_untuned.",
        "",
        markdown_table(["variant", *header("public"), *header("closed_average")],
                       [[label, *[protocols[p]["methods"][m]["public"] for p in names],
                         *[protocols[p]["methods"][m]["closed_average"] for p in names]]
                        for m, label in ABLATION if m in protocols[names[0]]["methods"]]),
        "",
    ]


def _tuning_opt_out_and_routing(results: dict) -> list[str]:
    """Router tuning's choice on validation, the opt-out deltas and the routing shares."""
    domains = results["domains"]
    candidates = next(iter(results["router_tuning"].values()))["validation"]
    experts = list(next(iter(results["routing"].values())))
    return [
        "## Router tuning: the rule's choice on validation text (closed-domain average, bits per byte)",
        "",
        markdown_table(["method", *[name if name == "untuned" else f"lr {name}" for name in candidates], "chosen"],
                       [[m, *[v["closed_average"] for v in sel["validation"].values()],
                         "untuned" if sel["chosen_lr"] is None else f"lr {sel['chosen_lr']:g}"]
                        for m, sel in results["router_tuning"].items()]),
        "",
        "## Opt-out: change in bits per byte when one expert is masked",
        "",
        markdown_table(["removed", *domains, "own domain", "other closed (mean)"],
                       [[name, *[v["delta_bits_per_byte"][d] for d in domains], v["own_domain"],
                         v["other_closed_mean"]] for name, v in results["opt_out"].items()]),
        "",
        "## Routing: share of tokens sent to each expert (FlexOlmo, mean over layers; shares sum to top-k)",
        "",
        "Kept mass: the softmax weight of the selected experts before any renormalisation (mean over tokens and "
        "layers; p5: the 5th percentile of the lowest layer). OLMo-2's post-FFN norm cancels it; a pre-norm "
        "merge renormalises it to 1.",
        "",
        markdown_table(["domain", *experts, "kept mass", "kept mass p5"],
                       [[d, *[share[e] for e in experts], results["kept_mass"][d]["mean"],
                         results["kept_mass"][d]["lowest_layer_p5"]] for d, share in results["routing"].items()]),
        "",
    ]


def write_report(out: Path, results: dict) -> None:
    """`report.md` and its plots for a finished demo's results."""
    lines = _intro(results) + _quality_tables(results) + _tuning_opt_out_and_routing(results)
    lines += ["## What the paper leads us to expect, and whether it holds here", ""]
    for claim, holds, detail in expectation_checks(results):
        lines.append(f"- {'holds' if holds else 'does NOT hold'}: {claim} ({detail})")
    lines += ["", "Plots: `bits_per_byte.png`, `routing.png`, `opt_out.png`.", ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    plot_all(out, results)


def plot_all(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, protocols = results["domains"], results["protocols"]
    figure, axes = plt.subplots(len(protocols), 1, figsize=(12, 4.5 * len(protocols)), squeeze=False)
    palette = plt.get_cmap("tab20").colors
    for axis, (protocol, entry) in zip(axes[:, 0], protocols.items()):
        methods = entry["methods"]
        width = 0.8 / len(methods)
        others = [method for method in methods if method != "flexolmo"]
        for index, (method, row) in enumerate(methods.items()):
            # Every method its own colour; FlexOlmo in black with a thick edge so it stands out among the rest.
            style = ({"color": "black", "edgecolor": "crimson", "linewidth": 1.5} if method == "flexolmo"
                     else {"color": palette[others.index(method) % len(palette)]})
            axis.bar(np.arange(len(domains)) + index * width, [row[d] for d in domains], width, label=method,
                     **style)
        axis.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
        axis.set_ylabel("bits per byte (lower is better)")
        axis.set_title(f"Held-out bits per byte, {entry['title']}" + (" (quick run)" if results["quick"] else ""))
        low = min(min(row[d] for d in domains) for row in methods.values())
        axis.set_ylim(bottom=low * 0.9)
        axis.legend(ncol=4, fontsize=8)
    _save(figure, out / "bits_per_byte.png")

    routing = results["routing"]
    experts = list(next(iter(routing.values())))
    grid = np.array([[routing[d][e] for e in experts] for d in routing])
    _heatmap(grid, list(routing), experts, "FlexOlmo routing: share of tokens per expert", "Blues",
             out / "routing.png")

    removed = list(results["opt_out"])
    deltas = np.array([[results["opt_out"][r]["delta_bits_per_byte"][d] for d in domains] for r in removed])
    _heatmap(deltas, [f"without {r}" for r in removed], domains, "Opt-out: change in bits per byte",
             "Reds", out / "opt_out.png")


def _heatmap(grid, rows: list[str], columns: list[str], title: str, cmap: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.6 * len(rows) + 1.5))
    image = axis.imshow(grid, cmap=cmap, aspect="auto")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), rows)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            axis.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8)
    axis.set_title(title)
    figure.colorbar(image)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
