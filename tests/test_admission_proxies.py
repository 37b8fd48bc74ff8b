"""Admission on every member's proxies (issue 25, finding 4): a candidate that takes a member's domain, with
router rows under every norm limit and public text unchanged, is refused by the probe of that member's proxy
text; an honest candidate is not; in `merge`/`add` and in the consortium service alike. The numbers are
checked against an independent measurement (the same text scored on a model merged without the candidate), so a
probe that never masks the candidate fails here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DOMAIN_WORDS, PUBLIC_WORDS, synthetic_documents, tiny_optim, write_jsonl
from safetensors.torch import load_file, save_file
from service_support import RunningService

from flexolmo.cli import main
from flexolmo.coordinator.admission import AdmissionPolicy, assess
from flexolmo.coordinator.merge import merge
from flexolmo.coordinator.proxies import check_proxies, resolve_member_proxies, write_proxy_text
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import ServiceError, TrustError
from flexolmo.core.fileio import sha256_file
from flexolmo.data.documents import iter_documents
from flexolmo.evaluation.scoring import EvalSettings, evaluate_path
from flexolmo.model.merged_format import read_merged_info
from flexolmo.model.router_init import load_public_rows
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.package import MANIFEST_FILE, TENSOR_FILE, tensors_checksum
from flexolmo.owner.proxy import ProxyConfig, select_proxies
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine
from flexolmo.service.registry import add_member, initialise
from flexolmo.trust.signing import sign_directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_anchor, corpora) -> dict:
    """Two honest experts (trained with public text in their batches), a public pool with code- and math-like
    documents the owners never trained on, and each owner's proxy file chosen from it. The router rows start
    from 64 sequences and learn at the FFN's rate, not at train-expert's defaults: on these synthetic domains
    (sharing 8 public words), 30 tiny steps from a row started on 1024 sequences, or learning at 0.3x (math then
    leads on 26% of code's proxies where code led on 53%), leave the honest math expert ahead on code's proxies,
    which the probe rightly calls taking code's tokens. On the demo's real domains, honest experts at the
    defaults drop a member's share by at most 0.089 (benchmarks/docs/demo.md)."""
    root = tmp_path_factory.mktemp("members")
    public = [document.text for document in iter_documents(corpora["public"])]
    planted = [*synthetic_documents(DOMAIN_WORDS["code"] + PUBLIC_WORDS[:8], 20, seed=98),
               *synthetic_documents(DOMAIN_WORDS["math"] + PUBLIC_WORDS[:8], 20, seed=97)]
    pool = write_jsonl(root / "public.jsonl", public + planted)
    packages, proxies = {}, {}
    for domain in ("code", "math"):
        packages[domain] = root / domain
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora[domain]], name=domain, out=packages[domain],
                                  public_data=[corpora["public"]], public_share=0.5, eval_max_sequences=8,
                                  router_init_sequences=64, router_lr_scale=1.0,
                                  optim=tiny_optim(steps=30, lr=2e-2)))
        proxies[domain] = root / f"{domain}.proxies.json"
        select_proxies(ProxyConfig(data=[corpora[domain]], public=[pool], name=domain, anchor=tiny_anchor,
                                   out=proxies[domain], max_documents=100, fraction=0.05))
    return {"root": root, "pool": pool, "packages": packages, "proxies": proxies}


def rewrite_tensors(package: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """What a dishonest member does: change its tensors and recompute every checksum with flexolmo's own
    functions."""
    shutil.copytree(package, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    save_file(tensors, target / TENSOR_FILE, metadata={"format": "flexolmo-expert", "name": manifest["name"]})
    manifest["tensors_sha256"] = tensors_checksum(tensors)
    manifest["file_sha256"] = sha256_file(target / TENSOR_FILE)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def stealer(setup, anchor: Path, target: Path) -> Path:
    """math's package with its router rows replaced by code's row pushed once more away from the public row,
    r_code + (r_code - r_public), and its FFN output doubled."""
    victim = load_file(setup["packages"]["code"] / TENSOR_FILE)
    tensors = load_file(setup["packages"]["math"] / TENSOR_FILE)
    routers = sorted(k for k in tensors if k.endswith("router.weight"))
    public = load_public_rows(anchor, len(routers))
    for key in routers:
        row = victim[key].float()
        tensors[key] = (2 * row - public[int(key.split(".")[1])][None].float()).to(tensors[key].dtype)
    for key in tensors:
        if key.endswith("down_proj.weight"):
            tensors[key] = tensors[key] * 2
    return rewrite_tensors(setup["packages"]["math"], target, tensors)


def policy(setup, **overrides) -> AdmissionPolicy:
    settings = dict(proxies=[setup["proxies"]["code"], setup["proxies"]["math"]], public=[setup["pool"]])
    return AdmissionPolicy(**{**settings, **overrides})


def public_probe(corpora) -> tuple[list[Path], str]:
    return [corpora["public"]], "heldout"


@pytest.fixture(scope="module")
def attack(setup, tiny_anchor) -> dict:
    """math turned dishonest: its router rows are code's rows pushed once more away from the public row (so it
    outranks code exactly where code outranks public), its FFN output doubled; norm under the limit. Merged at
    top-1 without admission, and the model without math (code alone) to measure against."""
    root = setup["root"]
    package = stealer(setup, tiny_anchor, root / "stealer")
    merge(tiny_anchor, [setup["packages"]["code"], package], root / "attacked", top_k=1)
    merge(tiny_anchor, [setup["packages"]["code"]], root / "code-only", top_k=1)
    return {"package": package, "merged": root / "attacked", "code_only": root / "code-only"}


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_honest_candidates_are_admitted_with_every_members_domain_probed(setup, tiny_anchor, corpora, tmp_path):
    reports = []
    trust = CoordinatorTrust(admission=policy(setup), probe=public_probe(corpora), on_admission=reports.append)
    merge(tiny_anchor, [setup["packages"]["code"], setup["packages"]["math"]], tmp_path / "honest", top_k=1,
          trust=trust)
    (report,) = reports
    assert report.members_probed and all(verdict.admitted for verdict in report.verdicts)
    # Each candidate is measured on the other member's proxies, and an honest one moves them a little.
    impacts = {verdict.name: verdict.members for verdict in report.verdicts}
    assert [impact.member for impact in impacts["code"]] == ["math"]
    assert [impact.member for impact in impacts["math"]] == ["code"]
    for impact in (*impacts["code"], *impacts["math"]):
        assert impact.tokens > 500 and 0 < impact.top_without <= 1
        assert impact.top_drop < AdmissionPolicy().max_member_top_drop
        assert impact.bpb_increase < AdmissionPolicy().max_member_bpb_increase
    logged = json.loads((tmp_path / "honest" / "flexolmo_history.jsonl").read_text().splitlines()[-1])
    assert logged["admission"]["verdicts"][1]["members"][0]["member"] == "code"


def test_a_domain_stealer_passes_the_public_checks_and_is_refused_on_the_victims_proxies(
        setup, attack, tiny_anchor, corpora, tmp_path):
    candidates = ["code", "math"]
    # The checks before members were probed admit it: its rows are under the norm limit and public text is
    # untouched (code's row loses to the public row there, and so does a row pushed away from it).
    old = assess(attack["merged"], candidates, AdmissionPolicy(), public_probe(corpora))
    assert all(verdict.admitted for verdict in old.verdicts) and not old.members_probed
    thief = old.verdicts[1]
    assert thief.row_norm_ratio < AdmissionPolicy().max_row_norm_ratio and thief.public_top_share < 0.05
    # On code's proxies it takes code's tokens: refused, naming the victim, the number and the limit.
    report = assess(attack["merged"], candidates, policy(setup), public_probe(corpora))
    verdicts = {verdict.name: verdict for verdict in report.verdicts}
    assert verdicts["code"].admitted and not verdicts["math"].admitted
    (problem,) = verdicts["math"].problems
    assert problem.startswith("it takes member 'code''s proxy tokens from its own expert")
    assert "above the limit 0.140 (change it with --max-member-top-drop)" in problem
    out = tmp_path / "merged"
    trust = CoordinatorTrust(admission=policy(setup), probe=public_probe(corpora))
    with pytest.raises(TrustError, match="expert 'math' refused at admission: it takes member 'code''s") as error:
        merge(tiny_anchor, [setup["packages"]["code"], attack["package"]], out, top_k=1, trust=trust)
    assert "\n" not in str(error.value) and nothing_written(out)


def test_with_and_without_numbers_are_those_of_the_model_with_and_without_the_candidate(setup, attack, tmp_path):
    """Measured independently: code's proxy text scored by `eval`'s path on the attacked model (with math) and on
    the model merged without math (opt-out: masking is removing). At top-1 the share of tokens routed to code
    is the share on which code has the top logit. A probe that never masks the candidate, or masks the wrong
    one, reads other numbers."""
    report = assess(attack["merged"], ["math"], policy(setup), None, "not needed here")
    (impact,) = report.verdicts[0].members
    records = check_proxies(read_merged_info(attack["merged"]), [setup["proxies"]["code"]])
    write_proxy_text(resolve_member_proxies(records, [setup["pool"]], "text")["code"], tmp_path / "code.jsonl.gz")
    settings = EvalSettings(seq_len=128, max_sequences=AdmissionPolicy().probe_sequences)  # the anchor's context
    domains = {"code": [tmp_path / "code.jsonl.gz"]}
    with_math = evaluate_path(attack["merged"], domains, settings).domains["code"]
    without_math = evaluate_path(attack["code_only"], domains, settings).domains["code"]
    assert impact.tokens == with_math.tokens == without_math.tokens
    for ours, theirs in ((impact.top_with, with_math), (impact.share_with, with_math),
                         (impact.top_without, without_math), (impact.share_without, without_math)):
        assert ours == pytest.approx(theirs.routing["mean_share"]["code"], abs=1e-6)
    assert impact.bpb_with == pytest.approx(with_math.bits_per_byte, abs=1e-4)
    assert impact.bpb_without == pytest.approx(without_math.bits_per_byte, abs=1e-4)
    # and they differ: the stealer took code's tokens from code's expert.
    assert impact.top_without > 0.2 and impact.top_with < 0.05


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "error:" in lines[-1] and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_cli_add_probes_the_members_domains_and_says_when_it_cannot(setup, attack, corpora, tmp_path, capsys):
    model = str(attack["code_only"])
    code_proxies, pool = str(setup["proxies"]["code"]), str(setup["pool"])
    probe = ["--probe-data", str(corpora["public"])]
    out = tmp_path / "honest"
    assert main(["add", "--model", model, "--packages", str(setup["packages"]["math"]), "--out", str(out), *probe,
                 "--proxies", code_proxies, "--public-data", pool]) == 0
    printed = capsys.readouterr().out
    assert "members' domains (proxies of code" in printed and "admitted" in printed
    # The stealer joining late: refused in one line naming the victim, the number and the limit.
    out = tmp_path / "stolen"
    error = one_line_error(capsys, ["add", "--model", model, "--packages", str(attack["package"]), "--out",
                                    str(out), *probe, "--proxies", code_proxies, "--public-data", pool])
    assert "expert 'math' refused at admission: it takes member 'code''s proxy tokens" in error
    assert "(change it with --max-member-top-drop)" in error and nothing_written(out)
    # Without proxy files it is admitted, and one warning line says members' domains were not probed.
    out = tmp_path / "unprobed"
    assert main(["add", "--model", model, "--packages", str(attack["package"]), "--out", str(out), *probe]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "members' domains" in line]
    assert warnings == ["warning: members' domains are not probed: no member proxy files were given (--proxies)"]


def test_bad_proxy_files_end_in_one_line_and_write_nothing(setup, attack, corpora, tmp_path, capsys):
    record = json.loads(setup["proxies"]["code"].read_text())
    foreign = tmp_path / "legal.proxies.json"
    foreign.write_text(json.dumps({**record, "name": "legal"}))
    unknown = tmp_path / "unknown.proxies.json"
    unknown.write_text(json.dumps({**record, "proxies": [*record["proxies"], "0" * 64]}))
    broken = tmp_path / "broken.proxies.json"
    broken.write_text("{not json")
    base = ["add", "--model", str(attack["code_only"]), "--packages", str(setup["packages"]["math"]),
            "--probe-data", str(corpora["public"])]
    pool = ["--public-data", str(setup["pool"])]
    cases = [
        ([str(foreign)], pool, "proxies of 'legal', which is not an expert of the merged model"),
        ([str(unknown)], pool, "1 of %d proxies of 'code' are not in the --public-data text" % (
            len(record["proxies"]) + 1)),
        ([str(broken)], pool, "not a proxy file"),
        ([str(setup["proxies"]["code"])] * 2, pool, "a second proxy file for 'code'"),
        ([str(setup["proxies"]["code"])], [], "pass it with --public-data"),
    ]
    for index, (proxies, public, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        error = one_line_error(capsys, [*base, "--out", str(out), "--proxies", *proxies, *public])
        assert message in error, error
        assert nothing_written(out)


def signed_copy(package: Path, target: Path, key: Path) -> Path:
    shutil.copytree(package, target)
    sign_directory(target, key)
    return target


def test_the_consortium_service_probes_each_admitted_members_domain_on_the_proxies_it_sent(
        setup, attack, tiny_anchor, corpora, service_keys, tmp_path):
    """Over HTTP: a member's proxy file is checked when it is sent (its own name, every document in the
    service's public text); a later candidate is merged with the experts admitted before it and judged on their
    proxies, so the domain stealer is refused naming its victim, and the honest expert is admitted."""
    engine = open_engine(f"sqlite:///{tmp_path / 'db'}")
    migrate(engine)
    in_transaction(engine, lambda s: initialise(s, tiny_anchor, tmp_path / "store", service_keys / "coordinator.key",
                                                probe_data=[corpora["public"]], public_data=[setup["pool"]]))
    for name in ("code", "math"):
        in_transaction(engine, lambda s, n=name: add_member(s, n, service_keys / f"{n}.pub"))
    packages = {name: signed_copy(setup["packages"][name], tmp_path / name, service_keys / f"{name}.key")
                for name in ("code", "math")}
    stolen = signed_copy(attack["package"], tmp_path / "stealer", service_keys / "math.key")
    service = RunningService(engine)
    try:
        code, math = (ConsortiumClient(service.url, service_keys / f"{n}.key") for n in ("code", "math"))
        with pytest.raises(ServiceError, match=r"\(403\): member 'math' cannot send the proxies of 'code'"):
            math.send_proxies(setup["proxies"]["code"])
        forged = json.loads(setup["proxies"]["code"].read_text())
        forged["proxies"][0] = "0" * 64
        (tmp_path / "forged.json").write_text(json.dumps(forged))
        with pytest.raises(ServiceError, match=r"\(422\): the proxy file sent: 1 of \d+ proxies of 'code' are not"):
            code.send_proxies(tmp_path / "forged.json")
        (tmp_path / "junk.json").write_text("{not json")
        with pytest.raises(ServiceError, match=r"\(422\): .*not a proxy file"):
            code.send_proxies(tmp_path / "junk.json")
        sent = code.send_proxies(setup["proxies"]["code"])
        assert sent["documents"] == len(json.loads(setup["proxies"]["code"].read_text())["proxies"])

        first = code.submit(packages["code"])
        assert first["status"] == "admitted"
        assert first["report"]["members_probe"] == "not probed: no other member is admitted yet"
        refused = math.submit(stolen)
        assert refused["status"] == "refused", refused
        assert refused["report"]["refused"].startswith(
            "expert 'math' refused at admission: it takes member 'code''s proxy tokens")
        (verdict,) = refused["report"]["verdicts"]
        assert verdict["name"] == "math" and verdict["members"][0]["member"] == "code"
        assert verdict["members"][0]["top_drop"] > AdmissionPolicy().max_member_top_drop
        admitted = math.submit(packages["math"])
        assert admitted["status"] == "admitted", admitted
        (verdict,) = admitted["report"]["verdicts"]
        assert admitted["report"]["members_probed"] and [m["member"] for m in verdict["members"]] == ["code"]
        assert verdict["members"][0]["top_drop"] < AdmissionPolicy().max_member_top_drop
        members = {m["name"]: m["proxies"] for m in code.status()["members"]}
        assert members["code"]["documents"] == sent["documents"] and members["math"] is None
    finally:
        service.close()
