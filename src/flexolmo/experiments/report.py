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


MERGING_BASELINES = ("model_soup", "btm", "btx", "prompt_routing")


def expectation_checks(results: dict) -> list[tuple[str, bool, str]]:
    """The goals of the paper's method on this demo, each with whether it holds here and the numbers behind it."""
    methods = results["methods"]
    flex, public = methods["flexolmo"], methods["public"]

    def change(method: str, domain: str) -> float:
        return 100 * (methods[method][domain] / public[domain] - 1)

    checks = []
    for rival in MERGING_BASELINES:
        checks.append((f"FlexOlmo beats {rival} on the closed-domain average (at no more training compute)",
                       flex["closed_average"] < methods[rival]["closed_average"],
                       f"{flex['closed_average']:.4f} vs {methods[rival]['closed_average']:.4f}"))
    checks.append(("FlexOlmo stays within 1% of the anchor on public text", change("flexolmo", "public") <= 1.0,
                   f"{change('flexolmo', 'public'):+.2f}%"))
    worse = [d for d in (*CLOSED, "mixed") if flex[d] >= public[d]]
    checks.append(("FlexOlmo leaves no closed or mixed domain worse than the anchor", not worse,
                   "worse on: " + ", ".join(worse) if worse else
                   ", ".join(f"{d} {change('flexolmo', d):+.1f}%" for d in (*CLOSED, "mixed"))))
    checks.append(("Router tuning improves the closed-domain average",
                   flex["closed_average"] < methods["flexolmo_untuned"]["closed_average"],
                   f"{flex['closed_average']:.4f} tuned vs {methods['flexolmo_untuned']['closed_average']:.4f}"))
    if "unrestricted" in methods:  # the upper bound is trained with --ablation only
        checks.append(("FlexOlmo vs unrestricted pooled training (closed average; informative: pooling is what "
                       "the owners cannot do)", flex["closed_average"] < methods["unrestricted"]["closed_average"],
                       f"{flex['closed_average']:.4f} vs {methods['unrestricted']['closed_average']:.4f}"))
    own_costs = [d for d, v in results["opt_out"].items() if v["own_domain"] > v["other_closed_mean"]]
    checks.append(("Removing an expert costs mostly its own domain", len(own_costs) == len(results["opt_out"]),
                   f"{len(own_costs)} of {len(results['opt_out'])} experts"))
    return checks


ABLATION = (("flexolmo", "FlexOlmo, full method (coordinated experts, domain-informed router rows, tuned router)"),
            ("flexolmo_untuned", "without router tuning"),
            ("btx", "without coordinated training (BTX: dense experts, tuned router)"),
            ("btx_untuned", "without coordinated training and without router tuning"),
            ("flexolmo_random_init", "without the domain-informed router initialisation "
                                     "(random rows; tuning as FlexOlmo's)"),
            ("flexolmo_bias_dropped_untuned", "owners trained with the negative bias, bias dropped as in the "
                                              "standard checkpoint (no tuning)"),
            ("flexolmo_bias_untuned", "the same experts with the bias applied (flexolmo's runtime; no tuning)"))


def _intro(results: dict) -> list[str]:
    """The report's opening: what was run and how every model is scored."""
    lines = ["# FlexOlmo demo report", ""]
    if results["quick"]:
        lines += ["> **Quick smoke run: a few training steps and sequences. These numbers are not meaningful.**", ""]
    return lines + [
        "Produced by `flexolmo demo" + (" --quick" if results["quick"] else "") + "` on the shipped anchor and "
        "corpora. Every model is scored by the same evaluation (`flexolmo.evaluation.scoring.evaluate`) on "
        f"held-out documents: at most {results['config']['eval_max_sequences']} windows of "
        f"{results['config']['seq_len']} tokens per domain, the first {results['config']['context_tokens']} tokens "
        "of each window context only (never scored, for every method). Bits per byte = summed loss in bits / the "
        "UTF-8 bytes that exactly the scored tokens encode; lower is better.",
        "",
    ]


def _quality_tables(results: dict) -> list[str]:
    """Costs, bits per byte, change against the anchor, and the ablation."""
    domains, methods = results["domains"], results["methods"]
    return [
        "## What each method is and what it costs",
        "",
        "Training FLOPs are matmul FLOPs over all of a method's training runs (`flexolmo.experiments.compute`; the "
        "anchor's pretraining, shared by all, is not counted). Owner tokens: tokens of the owners' private text "
        "among them.",
        "",
        markdown_table(["method", "members", "training PFLOPs", "training tokens", "owner tokens",
                        "inference GFLOPs/token", "forward passes/token"],
                       [[m, c["members"], f"{c['training_flops'] / 1e15:.3f}", f"{c['training_tokens']:,}",
                         f"{c['owner_tokens']:,}", f"{c['inference_flops_per_token'] / 1e9:.4f}",
                         c["forward_passes_per_token"]] for m, c in results["costs"].items()]),
        "",
        "## Bits per byte by method and domain",
        "",
        markdown_table(["method", *domains, "closed avg", "avg (+public)"],
                       [[m, *[r[d] for d in domains], r["closed_average"], r["average_with_public"]]
                        for m, r in methods.items()]),
        "",
        "## Change against the public anchor (%)",
        "",
        markdown_table(["method", *domains, "closed avg"],
                       [[m, *[f"{100 * (r[d] / methods['public'][d] - 1):+.1f}" for d in domains],
                         f"{100 * (r['closed_average'] / methods['public']['closed_average'] - 1):+.1f}"]
                        for m, r in methods.items()]),
        "",
        "## Ablation (the paper's Table 1, on this demo)",
        "",
        "Rows present in this run (`flexolmo demo --ablation` adds the router initialisation and the negative "
        "bias, each of which needs five more experts, and the unrestricted upper bound to the tables above). "
        "Compare the bias rows with flexolmo_untuned.",
        "",
        markdown_table(["variant", *domains, "closed avg"],
                       [[label, *[methods[m][d] for d in domains], methods[m]["closed_average"]]
                        for m, label in ABLATION if m in methods]),
        "",
    ]


def _tuning_opt_out_and_routing(results: dict) -> list[str]:
    """Router tuning's choice on validation, the opt-out deltas and the routing shares."""
    domains = results["domains"]
    candidates = next(iter(results["router_tuning"].values()))["validation"]
    experts = list(next(iter(results["routing"].values())))
    return [
        "## Router tuning: kept only where it helps on validation text (closed-domain average, bits per byte)",
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

    domains, methods = results["domains"], results["methods"]
    figure, axis = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    palette = plt.get_cmap("tab20").colors
    others = [method for method in methods if method != "flexolmo"]
    for index, (method, row) in enumerate(methods.items()):
        # Every method its own colour; FlexOlmo in black with a thick edge so it stands out among the rest.
        style = ({"color": "black", "edgecolor": "crimson", "linewidth": 1.5} if method == "flexolmo"
                 else {"color": palette[others.index(method) % len(palette)]})
        axis.bar(np.arange(len(domains)) + index * width, [row[d] for d in domains], width, label=method, **style)
    axis.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    axis.set_ylabel("bits per byte (lower is better)")
    axis.set_title("Held-out bits per byte by method and domain" + (" (quick run)" if results["quick"] else ""))
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
