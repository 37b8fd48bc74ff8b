"""The demo: the whole FlexOlmo story on the shipped anchor and corpora, with every baseline, under two protocols.

Five owners (code, math, legal, biomedical, literature) each train an expert alone (half of every batch is the
anchor's public sample, train-expert's default) and choose public proxy documents like their data; the coordinator
merges the experts and tunes the router rows on the proxies (the paper's full method). Every baseline merges the
same members (the public anchor and five owners' dense experts), whose training follows one of two protocols
(`demo_config.PROTOCOLS`): data-matched, the paper's (each dense expert sees a FlexOlmo expert's owner tokens), and
FLOP-matched, ours (five dense experts cost FlexOlmo's training FLOPs). FlexOlmo's own models are the same under
both. The default baselines' dense experts train their FFNs only; `--ablation` adds the paper's, which train every
weight (continued pretraining), and the paper's baselines built from them. Every choice (router tuning, for every
method that tunes) follows the rule written in docs/demo.md, on the `*.validation` text only; every reported number
is on the `*.heldout` text, which nothing trains on or is chosen by and which is read only for the tables. Each
expert is then withdrawn in turn. Every step writes its output under `out/` atomically and is skipped when that
output exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import torch

from flexolmo.core.fileio import atomic_write_json
from flexolmo.experiments.demo_baselines import ProtocolBaselines
from flexolmo.experiments.demo_config import PROTOCOLS, DemoConfig
from flexolmo.experiments.demo_steps import Demo
from flexolmo.experiments.demo_summary import method_costs, show, summarise
from flexolmo.experiments.report import write_report

__all__ = ["Demo", "run_demo"]


def run_demo(config: DemoConfig) -> dict:
    """Run every step (skipping finished ones) and write `report.md`, `results.json` and plots to `config.out`."""
    torch.manual_seed(config.seed)
    demo = Demo(config)
    demo.check_inputs()
    packages = demo.train_experts()
    proxies = demo.select_proxies()
    untuned = demo.merge_flexolmo(packages, proxies)
    selection = {}
    flexolmo, selection["flexolmo"] = demo.choose("flexolmo", untuned, proxies)
    shared = {"public": demo.evaluated("public", demo.model_builder(demo.anchor_dir)),
              **demo.evaluated_choice("flexolmo", untuned, flexolmo)}
    by_protocol = {}
    for protocol in PROTOCOLS:
        by_protocol[protocol], selection[f"{protocol}/btx_ffn"] = \
            ProtocolBaselines(demo, protocol).evaluate(proxies, config.ablation)
    opt_out = demo.opt_out(flexolmo)
    if config.ablation:
        shared.update(demo.ablation(proxies, selection))
        for protocol in PROTOCOLS:  # the paper's baselines, from full-model dense experts
            paper, selection[f"{protocol}/btx"] = \
                ProtocolBaselines(demo, protocol, full_model=True).evaluate(proxies, ablation=False)
            by_protocol[protocol].update(paper)
    costs = method_costs(config, demo.anchor_config(), selection)
    results = summarise(config, shared, by_protocol, opt_out, costs)
    results["router_tuning"] = selection
    atomic_write_json(config.out / "results.json", results)
    write_report(config.out, results)
    show(results)
    return results
