"""The demo report's expectation checks: each says "holds" exactly when its numbers do, under each protocol."""

from __future__ import annotations

import copy

import pytest

from flexolmo.experiments.report import CLOSED, MERGING_BASELINES, expectation_checks

PROTOCOLS = ("data_matched", "flop_matched")


def row(public: float, closed: float) -> dict:
    return {"public": public, **{d: closed for d in CLOSED}, "mixed": closed, "closed_average": closed}

def results_where_everything_holds() -> dict:
    methods = {"public": row(1.0, 3.0), "flexolmo": row(1.005, 2.0), "flexolmo_untuned": row(1.005, 2.1),
               "unrestricted": row(1.2, 2.2), **{b: row(1.0, 2.5) for b in MERGING_BASELINES}}
    opt_out = {d: {"own_domain": 0.5, "other_closed_mean": 0.01} for d in CLOSED}
    return {"protocols": {p: {"methods": copy.deepcopy(methods)} for p in PROTOCOLS}, "opt_out": opt_out}

def set_value(results: dict, method: str, key: str, value: float, protocols=PROTOCOLS) -> None:
    for protocol in protocols:
        results["protocols"][protocol]["methods"][method][key] = value

# Each case breaks exactly one expectation; the others must keep holding.
BREAKS = {
    **{f"beats {b} ({p})": (lambda r, b=b, p=p: set_value(r, b, "closed_average", 1.9, [p]),
                            f"FlexOlmo beats {b} on the closed-domain average ({p.replace('_', '-')})")
       for b in MERGING_BASELINES for p in PROTOCOLS},
    "public beyond 1%": (lambda r: set_value(r, "flexolmo", "public", 1.011), "within 1% of the anchor"),
    "a domain no better": (lambda r: set_value(r, "flexolmo", "math", 3.0), "no closed or mixed domain worse"),
    "mixed worse": (lambda r: set_value(r, "flexolmo", "mixed", 3.1), "no closed or mixed domain worse"),
    "tuning no better": (lambda r: set_value(r, "flexolmo_untuned", "closed_average", 2.0), "Router tuning"),
    **{f"pooling better ({p})": (lambda r, p=p: set_value(r, "unrestricted", "closed_average", 1.9, [p]),
                                 f"unrestricted pooled training ({p.replace('_', '-')}") for p in PROTOCOLS},
    "opt-out costs others": (lambda r: r["opt_out"]["legal"].update(own_domain=0.005), "costs mostly its own"),
}

def test_every_expectation_holds_on_numbers_that_meet_it():
    checks = expectation_checks(results_where_everything_holds())
    assert len(checks) == len(PROTOCOLS) * (len(MERGING_BASELINES) + 1) + 4
    assert all(holds for _, holds, _ in checks), [claim for claim, holds, _ in checks if not holds]

@pytest.mark.parametrize("case", list(BREAKS))
def test_breaking_one_expectation_fails_that_check_only(case):
    results = copy.deepcopy(results_where_everything_holds())
    breaks, claim_part = BREAKS[case]
    breaks(results)
    failed = [claim for claim, holds, _ in expectation_checks(results) if not holds]
    assert len(failed) == 1 and claim_part in failed[0], failed
