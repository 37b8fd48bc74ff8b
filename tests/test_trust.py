"""Consortium trust: signed packages, complete verification, admission checks, the authenticated merged record
and the merge log. Every attack is played as a dishonest member would, with flexolmo's own functions
recomputing checksums, and must be refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_optim
from safetensors.torch import load_file, save_file

from flexolmo.cli import main
from flexolmo.coordinator.admission import AdmissionPolicy
from flexolmo.coordinator.artefacts import verify_merged_model
from flexolmo.coordinator.merge import add_experts, merge, remove_experts
from flexolmo.coordinator.publish import CoordinatorTrust
from flexolmo.core.errors import FlexOlmoError, PackageError, TrustError
from flexolmo.model.anchor import compute_fingerprint, read_config
from flexolmo.model.merged_format import MERGED_METADATA_FILE
from flexolmo.model.router_init import load_public_rows
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.manifest import owner_report_path
from flexolmo.owner.package import MANIFEST_FILE, TENSOR_FILE, check_name, load_package, tensors_checksum
from flexolmo.trust.history import HISTORY_FILE, append_record, read_history, record_digest, verify_history
from flexolmo.trust.signing import (
    SIGNATURE_FILE,
    TrustedKeys,
    generate_key_pair,
    sign_directory,
    verify_directory,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    for name in ("code", "math", "coordinator"):
        generate_key_pair(name, directory / "private")
        shutil.copy(directory / "private" / f"{name}.pub", directory / f"{name}.pub")
    return directory


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_anchor, corpora, keys) -> dict[str, Path]:
    """Two honest experts, trained with public text in their batches, each signed by its owner."""
    root = tmp_path_factory.mktemp("signed")
    packages = {}
    for domain in ("code", "math"):
        packages[domain] = root / domain
        train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora[domain]], name=domain, out=packages[domain],
                                  public_data=[corpora["public"]], public_share=0.5, eval_max_sequences=8,
                                  optim=tiny_optim(steps=10, lr=5e-3)),
                     sign_key=keys / "private" / f"{domain}.key")
    return packages


def anchor_args(anchor: Path) -> tuple[str, dict]:
    return compute_fingerprint(anchor), read_config(anchor)


def copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite(package: Path, tensors: dict[str, torch.Tensor] | None = None, sign_key: Path | None = None,
            header_name: str | None = None, **manifest_changes) -> Path:
    """What a dishonest member does: change tensors or manifest fields and recompute every checksum with
    flexolmo's own functions (and, given its key, sign again)."""
    manifest = json.loads((package / MANIFEST_FILE).read_text())
    tensors = tensors if tensors is not None else load_file(package / TENSOR_FILE)
    save_file(tensors, package / TENSOR_FILE,
              metadata={"format": "flexolmo-expert", "name": header_name or manifest["name"]})
    from flexolmo.core.fileio import sha256_file

    manifest.update(manifest_changes)
    manifest["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                           for k, v in sorted(tensors.items())}
    manifest["tensors_sha256"] = tensors_checksum(tensors)
    manifest["file_sha256"] = sha256_file(package / TENSOR_FILE)
    (package / MANIFEST_FILE).write_text(json.dumps(manifest))
    if sign_key is not None:
        sign_directory(package, sign_key)
    return package


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


# -- keys and signatures -----------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", "--name", "legal", "--out", str(tmp_path)]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "legal.key").st_mode) == 0o600
    assert b"PUBLIC KEY" in (tmp_path / "legal.pub").read_bytes()
    assert main(["keygen", "--name", "legal", "--out", str(tmp_path)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp-*"))


def test_signed_packages_verify_and_every_forgery_is_refused(signed, keys, tiny_anchor, tmp_path):
    trusted = TrustedKeys(keys)
    fingerprint, config = anchor_args(tiny_anchor)
    package = load_package(signed["code"], fingerprint, config, with_tensors=False, trusted_keys=trusted)
    assert package.signer.name == "code" and len(package.digest) == 64

    renamed = copy(signed["code"], tmp_path / "renamed")  # forged name: code's package relabelled "math"
    rewrite(renamed, name="math", header_name="math")
    with pytest.raises(TrustError, match="signature by 'code' does not match the files .*manifest.json"):
        load_package(renamed, fingerprint, config, trusted_keys=trusted)
    rewrite(renamed, sign_key=keys / "private" / "code.key")  # and signed again by its real author
    with pytest.raises(TrustError, match="package 'math' is signed by 'code'"):
        load_package(renamed, fingerprint, config, trusted_keys=trusted)

    swapped = copy(signed["code"], tmp_path / "swapped")  # math's weights under code's manifest
    rewrite(swapped, tensors=load_file(signed["math"] / TENSOR_FILE), header_name="code")
    with pytest.raises(TrustError, match="does not match the files .*expert.safetensors"):
        load_package(swapped, fingerprint, config, trusted_keys=trusted)
    shutil.copy(signed["math"] / TENSOR_FILE, swapped / TENSOR_FILE)
    rewrite(swapped, tensors=load_file(signed["math"] / TENSOR_FILE), header_name="math")
    with pytest.raises(PackageError, match="header names expert 'math', the manifest 'code'"):
        load_package(swapped)  # even unsigned, the weights carry their own name

    forged = copy(signed["code"], tmp_path / "fingerprint")
    manifest = json.loads((forged / MANIFEST_FILE).read_text())
    rewrite(forged, anchor={**manifest["anchor"], "fingerprint": "0" * 64})
    with pytest.raises(TrustError, match="does not match the files"):
        load_package(forged, trusted_keys=trusted)

    unsigned = copy(signed["code"], tmp_path / "unsigned")
    (unsigned / SIGNATURE_FILE).unlink()
    with pytest.raises(TrustError, match="not signed"):
        load_package(unsigned, trusted_keys=trusted)
    stranger = tmp_path / "stranger-keys"
    generate_key_pair("code", stranger)  # a key of the right name that nobody trusts
    rewrite(unsigned, sign_key=stranger / "code.key")
    with pytest.raises(TrustError, match="signed by a key that is not in"):
        load_package(unsigned, trusted_keys=trusted)


def test_a_false_dp_claim_is_refused(signed, keys, tmp_path):
    dp = {"mechanism": "DP-SGD", "epsilon": 1.0, "epsilon_target": 1.0, "delta": 1e-5, "noise_multiplier": 0.1,
          "max_grad_norm": 1.0, "sample_rate": 0.5, "steps": 10, "prior_releases": [], "accountant": "rdp",
          "opacus": "1"}
    manifest = json.loads((signed["code"] / MANIFEST_FILE).read_text())
    private_fields = {key: None for key in ("train_documents", "final_train_loss", "losses", "heldout_loss_before",
                                            "heldout_loss_after", "heldout_bits_per_byte_before",
                                            "heldout_bits_per_byte_after", "token_stream_commitment", "seconds")}
    claim = copy(signed["code"], tmp_path / "claim")
    rewrite(claim, privacy={**manifest["privacy"], "dp": dp, "router_row_from_private_data": False},
            training={**manifest["training"], **private_fields})
    with pytest.raises(PackageError, match="claims epsilon 1, but its noise multiplier, sample rate and steps spend"):
        load_package(claim)
    with pytest.raises(TrustError, match="does not match the files"):
        load_package(claim, trusted_keys=TrustedKeys(keys))
    leaky = copy(signed["code"], tmp_path / "leaky")  # a DP package that also releases its training losses
    rewrite(leaky, privacy={**manifest["privacy"], "dp": dp, "router_row_from_private_data": False})
    with pytest.raises(PackageError, match="a DP package must not release train_documents"):
        load_package(leaky)


# -- complete verification ---------------------------------------------------------------------------------

def test_a_package_shaped_for_another_anchor_is_refused(signed, tiny_anchor, tmp_path, capsys):
    """A consistent forgery: tensors cut to hidden size 16 and a manifest whose anchor record says 16, with
    this anchor's fingerprint. Every check inside the package passes; only the shape check against the anchor
    it joins (hidden size 32) refuses it."""
    tensors = load_file(signed["code"] / TENSOR_FILE)
    narrow = {name: (tensor[:, :16] if name.endswith(("gate_proj.weight", "up_proj.weight", "router.weight"))
                     else tensor[:16]).contiguous() for name, tensor in tensors.items()}
    forged = copy(signed["code"], tmp_path / "narrow")
    (forged / SIGNATURE_FILE).unlink()
    manifest = json.loads((forged / MANIFEST_FILE).read_text())
    rewrite(forged, tensors=narrow, anchor={**manifest["anchor"], "hidden_size": 16})
    load_package(forged)  # consistent in itself
    fingerprint, config = anchor_args(tiny_anchor)
    assert config["hidden_size"] == 32
    with pytest.raises(PackageError, match="the manifest's anchor has hidden_size 16, this anchor 32"):
        load_package(forged, fingerprint, config)
    assert main(["verify", str(forged), "--anchor", str(tiny_anchor)]) == 1
    assert "shapes do not fit the anchor" in capsys.readouterr().err
    with pytest.raises(PackageError, match="shapes do not fit the anchor"):
        merge(tiny_anchor, [forged], tmp_path / "merged", top_k=2)
    assert nothing_written(tmp_path / "merged")



def malformed_cases(source: Path, root: Path, hidden: int) -> dict[str, tuple[Path, str]]:
    tensors = load_file(source / TENSOR_FILE)
    cases = {}

    def case(label: str, reason: str, **kwargs) -> None:
        cases[label] = (rewrite(copy(source, root / label), **kwargs), reason)

    case("missing tensor", "missing layers.1.up_proj.weight",
         tensors={k: v for k, v in tensors.items() if k != "layers.1.up_proj.weight"})
    case("wrong shape", "layers.0.down_proj.weight has shape",
         tensors={**tensors, "layers.0.down_proj.weight": tensors["layers.0.down_proj.weight"][:, :-1].contiguous()})
    case("int64 tensor", "dtype: input should be 'float32', 'bfloat16' or 'float16'",
         tensors={**tensors, "layers.0.gate_proj.weight": tensors["layers.0.gate_proj.weight"].long()})
    hidden_int = copy(cases["int64 tensor"][0], root / "int64 tensor, manifest says float32")
    manifest = json.loads((hidden_int / MANIFEST_FILE).read_text())
    manifest["tensors"]["layers.0.gate_proj.weight"]["dtype"] = "float32"
    (hidden_int / MANIFEST_FILE).write_text(json.dumps(manifest))
    cases[hidden_int.name] = (hidden_int, "has dtype I64")
    case("two-row router", "layers.1.router.weight has shape [2,",
         tensors={**tensors, "layers.1.router.weight": torch.zeros(2, hidden)})
    case("extra tensor", "unexpected layers.9.up_proj.weight",
         tensors={**tensors, "layers.9.up_proj.weight": torch.zeros(2, 2)})
    case("NaN router row", "layers.0.router.weight holds NaN",
         tensors={**tensors, "layers.0.router.weight": torch.full((1, hidden), float("nan"))})
    wrong_sum = copy(source, root / "wrong tensors_sha256")
    manifest = json.loads((wrong_sum / MANIFEST_FILE).read_text())
    (wrong_sum / MANIFEST_FILE).write_text(json.dumps({**manifest, "tensors_sha256": "0" * 64}))
    cases["wrong tensors_sha256"] = (wrong_sum, "do not match the manifest checksum")
    pickled = copy(source, root / "pickle")  # a pickle under the safetensors name, its checksum recomputed
    (pickled / TENSOR_FILE).write_bytes(pickle.dumps(dict(tensors)))
    from flexolmo.core.fileio import sha256_file

    (pickled / MANIFEST_FILE).write_text(json.dumps({**manifest, "file_sha256": sha256_file(pickled / TENSOR_FILE)}))
    cases["pickle"] = (pickled, "not a safetensors file")
    for label, change, reason in [
        ("manifest not JSON", "{not json", "corrupt manifest"),
        ("manifest without tensors", json.dumps({k: v for k, v in manifest.items() if k != "tensors"}),
         "malformed manifest (tensors: field required)"),
        ("manifest with a string for tokens", json.dumps({**manifest, "training": {**manifest["training"],
                                                                                   "tokens": "many"}}),
         "malformed manifest (training.tokens: input should be a valid integer"),
        ("manifest with an unknown field", json.dumps({**manifest, "note": "hi"}),
         "malformed manifest (note: extra inputs are not permitted)"),
    ]:
        target = copy(source, root / label)
        (target / MANIFEST_FILE).write_text(change)
        cases[label] = (target, reason)
    extra_file = copy(source, root / "extra file")
    (extra_file / "notes.txt").write_text("hello")
    cases["extra file"] = (extra_file, "unexpected notes.txt")
    return cases


def test_every_malformed_package_is_refused_in_one_line_and_merges_nothing(signed, tiny_anchor, tmp_path, capsys):
    unsigned = copy(signed["code"], tmp_path / "source")
    (unsigned / SIGNATURE_FILE).unlink()
    hidden = read_config(tiny_anchor)["hidden_size"]
    out = tmp_path / "merged"
    for label, (path, reason) in malformed_cases(unsigned, tmp_path / "cases", hidden).items():
        assert main(["verify", str(path), "--anchor", str(tiny_anchor)]) == 1, label
        error = capsys.readouterr().err
        assert reason in error and len(error.strip().splitlines()) == 1, (label, error)
        with pytest.raises(FlexOlmoError):
            merge(tiny_anchor, [signed["math"], path], out, top_k=2)
        assert nothing_written(out), label


# -- admission ---------------------------------------------------------------------------------------------

def attacked(source: Path, target: Path, anchor: Path, attack: str) -> Path:
    tensors = load_file(source / TENSOR_FILE)
    routers = [k for k in tensors if k.endswith("router.weight")]
    if attack.startswith("x"):
        changed = {k: tensors[k] * float(attack[1:]) for k in routers}
    else:  # the public row's direction at 1.5x its norm: under the norm limit, ahead of public everywhere
        public = load_public_rows(anchor, len(routers))
        changed = {k: public[int(k.split(".")[1])][None] * 1.5 for k in routers}
    return rewrite(copy(source, target), tensors={**tensors, **changed})


def test_admission_admits_honest_experts_and_refuses_router_hijackers(signed, tiny_anchor, corpora, tmp_path,
                                                                       capsys):
    probe = ([corpora["public"]], "heldout")
    reports = []
    trust = CoordinatorTrust(admission=AdmissionPolicy(), probe=probe, on_admission=reports.append)
    merge(tiny_anchor, [signed["code"], signed["math"]], tmp_path / "honest", top_k=2, trust=trust)
    assert all(verdict.admitted for verdict in reports[0].verdicts)
    honest = reports[0].verdicts[1]
    for attack, refusal in [("x5", "router rows are"), ("x20", "router rows are"), ("x50", "router rows are"),
                            ("aligned", "top router logit on")]:
        package = attacked(signed["math"], tmp_path / attack, tiny_anchor, attack)
        out = tmp_path / f"merged-{attack}"
        with pytest.raises(TrustError, match=f"expert 'math' refused at admission: .*{refusal}"):
            merge(tiny_anchor, [signed["code"], package], out, top_k=2, trust=trust)
        assert nothing_written(out)
        hijacker = reports[-1].verdicts[1]
        assert hijacker.public_top_share > honest.public_top_share + 0.4, attack
    # The CLI prints the per-expert table, then refuses in one line naming the number and the limit.
    out = tmp_path / "cli"
    assert main(["merge", "--anchor", str(tiny_anchor), "--packages", str(signed["code"]), str(tmp_path / "x20"),
                 "--top-k", "2", "--out", str(out), "--probe-data", str(corpora["public"])]) == 1
    captured = capsys.readouterr()
    assert "admission checks" in captured.out and "REFUSED" in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert "router rows are" in error and "above the limit 3.00 (change it with --max-row-norm-ratio)" in error
    assert nothing_written(out)


# -- the merged model's record and its log -----------------------------------------------------------------

def test_swapped_names_in_the_merged_record_are_detected(signed, tiny_anchor, tmp_path):
    model = tmp_path / "merged"
    merge(tiny_anchor, [signed["code"], signed["math"]], model, top_k=2)
    record = json.loads((model / MERGED_METADATA_FILE).read_text())
    code, math = record["experts"][1], record["experts"][2]
    swapped = copy(model, tmp_path / "swapped")
    code["name"], math["name"] = "math", "code"  # names swapped, manifests left where they were
    code["manifest"]["name"], math["manifest"]["name"] = "math", "code"
    (swapped / MERGED_METADATA_FILE).write_text(json.dumps(record))
    with pytest.raises(TrustError, match="slot 2, recorded as expert 'code', does not hold that expert's weights"):
        load_model(swapped, exclude=["code"])
    with pytest.raises(TrustError, match="edited outside flexolmo"):
        remove_experts(swapped, ["code"], tmp_path / "removed")
    with pytest.raises(TrustError):
        verify_merged_model(swapped)
    assert nothing_written(tmp_path / "removed")
    assert load_model(model, exclude=["code"]).expert_names == ["public", "code", "math"]  # the honest record


def test_merge_log_and_coordinator_signature_follow_every_version(signed, keys, tiny_anchor, tmp_path, capsys):
    trusted = TrustedKeys(keys)
    coordinator = keys / "private" / "coordinator.key"
    trust = CoordinatorTrust(trusted_keys=trusted, sign_key=coordinator)
    merge(tiny_anchor, [signed["code"]], tmp_path / "v1", top_k=2, trust=trust)
    add_experts(tmp_path / "v1", [signed["math"]], tmp_path / "v2", trust=trust)
    remove_experts(tmp_path / "v2", ["code"], tmp_path / "v3", trust=CoordinatorTrust(sign_key=coordinator))
    log = read_history(tmp_path / "v3")
    assert [entry["operation"] for entry in log] == ["merge", "add", "remove"]
    assert log[0]["added"][0]["signer"]["name"] == "code" and log[1]["by"]["name"] == "coordinator"
    assert log[1]["from_model_sha256"] == log[0]["model_sha256"]
    assert log[2]["removed"] == [{"name": "code", "package_sha256": log[0]["added"][0]["package_sha256"]}]
    v3 = (tmp_path / "v3" / MERGED_METADATA_FILE).read_text() + (tmp_path / "v3" / HISTORY_FILE).read_text()
    assert '"manifest"' not in (tmp_path / "v3" / HISTORY_FILE).read_text()
    assert json.loads((tmp_path / "v3" / MERGED_METADATA_FILE).read_text())["experts"][1]["name"] == "math"
    assert "token_stream_commitment" in v3  # math's manifest stays; code's left with its expert
    assert verify_merged_model(tmp_path / "v3", trusted)["signer"].name == "coordinator"
    assert main(["verify", str(tmp_path / "v3"), "--trusted-keys", str(keys)]) == 0
    assert main(["history", "--model", str(tmp_path / "v3")]) == 0
    shown = capsys.readouterr().out
    assert "remove" in shown and "coordinator" in shown
    remove_experts(tmp_path / "v3", ["math"], tmp_path / "public-only")  # one number for top-k, everywhere
    config = read_config(tmp_path / "public-only")
    record = json.loads((tmp_path / "public-only" / MERGED_METADATA_FILE).read_text())
    assert config["num_experts_per_tok"] == record["top_k"] == read_history(tmp_path / "public-only")[-1]["top_k"] == 1
    tampered = copy(tmp_path / "v3", tmp_path / "tampered")
    (tampered / "generation_config.json").write_text("{}")
    assert main(["verify", str(tampered), "--trusted-keys", str(keys)]) == 1
    assert "edited outside flexolmo" in capsys.readouterr().err
    assert main(["add", "--model", str(tampered), "--packages", str(signed["code"]), "--out",
                 str(tmp_path / "v4")]) == 1
    assert nothing_written(tmp_path / "v4")



def write_log(model: Path, records: list[dict]) -> None:
    (model / HISTORY_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))


def test_the_whole_history_is_authenticated_not_only_the_last_state(signed, keys, tiny_anchor, tmp_path, capsys):
    """An earlier operation cannot be rewritten, even when a later operation (run without --trusted-keys) built
    on the edited copy and the coordinator signed the result: every record links to the one before it and
    carries the coordinator's signature over itself."""
    trusted, coordinator = TrustedKeys(keys), keys / "private" / "coordinator.key"
    merge(tiny_anchor, [signed["code"], signed["math"]], tmp_path / "v1", top_k=2,
          trust=CoordinatorTrust(sign_key=coordinator))
    remove_experts(tmp_path / "v1", ["code"], tmp_path / "v2", trust=CoordinatorTrust(trusted, sign_key=coordinator))
    log = read_history(tmp_path / "v2")
    assert log[0]["previous_sha256"] is None and log[1]["previous_sha256"] == record_digest(log[0])
    check = verify_history(tmp_path / "v2", trusted)
    assert (check.operations, check.signed, check.unsigned, check.before_chain) == (2, 2, 0, 0)
    assert main(["verify", str(tmp_path / "v2"), "--trusted-keys", str(keys)]) == 0
    assert "2 logged operations (2 signed by the coordinator), chain intact" in capsys.readouterr().out

    def careless_add_on(forged_log: list[dict], name: str) -> Path:
        forged = copy(tmp_path / "v2", tmp_path / f"{name}-input")
        write_log(forged, forged_log)
        # the coordinator signs what it built without authenticating its input first (no trusted keys)
        remove_experts(forged, ["math"], tmp_path / name, trust=CoordinatorTrust(sign_key=coordinator))
        assert verify_directory(tmp_path / name, trusted).name == "coordinator"  # the last state is vouched for
        return tmp_path / name

    # The opt-out's record rewritten (code never left), its link recomputed: its signature no longer matches.
    rewritten = {**log[1], "operation": "merge", "removed": []}
    forged = careless_add_on([log[0], rewritten], "rewritten")
    with pytest.raises(TrustError, match=r":2: the coordinator's signature does not match this record"):
        verify_merged_model(forged, trusted)
    # The first record's signer rewritten, everything after it left as it was: the chain breaks at record 2.
    first = {**log[0], "added": [{**log[0]["added"][0], "signer": None}]}
    forged = careless_add_on([first, log[1]], "relinked")
    with pytest.raises(TrustError, match=r":1: the coordinator's signature|:2: does not follow the record"):
        verify_merged_model(forged, trusted)
    # A record re-signed by a member's key (any member can sign) is not the coordinator's.
    member = keys / "private" / "math.key"
    resigned = copy(tmp_path / "v2", tmp_path / "resigned")
    write_log(resigned, [log[0]])
    append_record(resigned, resigned, {key: log[1][key] for key in ("operation", "top_k", "experts", "added",
                                                                     "removed")}, sign_key=member)
    sign_directory(resigned, coordinator)
    with pytest.raises(TrustError, match=r":2: .*signed by a key that is not coordinator.pub"):
        verify_merged_model(resigned, trusted)
    # Logs from before the chain: reported, not refused; an unlinked record after linked ones is refused.
    legacy = copy(tmp_path / "v2", tmp_path / "legacy")
    old = [{key: value for key, value in record.items() if key not in ("previous_sha256", "signature")}
           | {"by": None} for record in log]
    write_log(legacy, old)
    assert verify_history(legacy, trusted).before_chain == 2
    write_log(legacy, [log[0], old[1]])
    with pytest.raises(TrustError, match=":2: a record without a link follows linked ones"):
        verify_history(legacy, trusted)


# -- what a package releases -------------------------------------------------------------------------------

def all_strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [str(key), *all_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in all_strings(item)]
    return [str(value)]


def test_under_dp_a_package_releases_only_what_dp_covers(tiny_anchor, corpora, tmp_path, capsys,
                                                         monkeypatch):
    from flexolmo.owner.privacy import DPConfig

    canary = tmp_path / "owner-data"
    canary.mkdir()
    data = shutil.copy(corpora["code"], canary / "secret-code.jsonl")
    out = tmp_path / "dp-expert"
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[data], name="code", out=out, eval_max_sequences=4,
                              public_data=[corpora["public"]], public_share=0.5,
                              dp=DPConfig(epsilon=8, delta=1e-4), optim=tiny_optim(steps=3, batch_size=8)))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    report = json.loads(owner_report_path(out).read_text())
    training = manifest["training"]
    released = {key for key, value in training.items() if value is not None}
    assert released == {"config", "tokens", "public_share", "public_data", "heldout_dtype"}
    assert manifest["privacy"]["dp"]["epsilon"] <= 8 and not manifest["privacy"]["router_row_from_private_data"]
    # Canary: no number computed from the owner's data outside DP appears anywhere in the package.
    text = (out / MANIFEST_FILE).read_text()
    secrets = [report["token_stream_sha256"], report["training"]["token_stream_commitment"],
               repr(report["training"]["final_train_loss"]), repr(report["training"]["heldout_loss_after"])]
    assert not [secret for secret in secrets if secret in text]
    assert report["training"]["train_documents"] > 0 and len(report["training"]["losses"]) == 3
    assert not any(str(tmp_path) in s or s.startswith("/") for s in all_strings(manifest))
    assert not owner_report_path(out).is_relative_to(out)
    monkeypatch.setenv("COLUMNS", "300")  # one table row per line
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "withheld" in shown and "training.losses" not in shown and "covered by DP" in shown


def test_no_owner_path_reaches_a_package_or_the_merged_record(signed, tiny_anchor, tmp_path):
    model = tmp_path / "merged"
    merge(tiny_anchor, [signed["code"]], model, top_k=2)
    for document in [json.loads((signed["code"] / MANIFEST_FILE).read_text()),
                     json.loads((model / MERGED_METADATA_FILE).read_text()),
                     *read_history(model)]:
        leaked = [s for s in all_strings(document) if s.startswith("/") or str(tmp_path.parent) in s]
        assert not leaked, leaked
    report = json.loads(owner_report_path(signed["code"]).read_text())
    assert len(report["token_stream_sha256"]) == 64 and len(report["commitment_salt"]) == 64


# -- one-line errors, nothing half-written -----------------------------------------------------------------

def one_line_error(capsys, argv: list[str], reason: str, status: int = 1) -> None:
    assert main(argv) == status, argv
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if ": error: " in line]  # progress bars share stderr
    assert len(errors) == 1 and reason in errors[0] and "Traceback" not in stderr, stderr


def test_bad_arguments_and_inputs_end_in_one_line(signed, tiny_anchor, corpora, tmp_path, capsys, monkeypatch):
    anchor, code, math = str(tiny_anchor), str(signed["code"]), str(signed["math"])
    model = tmp_path / "model"
    merge(tiny_anchor, [signed["code"]], model, top_k=2)
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "half a pair \\ud800 here"}\n')
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "one document only"}\n')
    one_line_error(capsys, ["train-expert", "--anchor", anchor, "--data", str(surrogate), "--name", "x", "--out",
                            str(tmp_path / "x"), "--seq-len", "32"], "lone surrogate escape")
    one_line_error(capsys, ["eval", "--model", anchor, "--data", f"x={lone}", "--split", "heldout", "--seq-len", "32"],
                   "none of its 1 document(s) falls in its heldout split")
    one_line_error(capsys, ["train-expert", "--anchor", anchor, "--data", str(corpora["code"]), "--name", "public",
                            "--out", str(tmp_path / "x")], "the name 'public' is reserved")
    one_line_error(capsys, ["eval", "--model", anchor, "--data", f"x={corpora['code']}", "--seq-len", "4096"],
                   "--seq-len 4096 is longer than the 128 positions")
    one_line_error(capsys, ["generate", "--model", anchor, "--prompt", "the", "--temperature", "-1"],
                   "--temperature must be 0 (greedy) or a positive number")
    one_line_error(capsys, ["eval", "--model", str(model), "--data", f"x={corpora['code']}", "--exclude", "public"],
                   "cannot exclude 'public'")
    one_line_error(capsys, ["merge", "--anchor", anchor, "--packages", code, math, "--top-k", "10", "--out",
                            str(tmp_path / "o")], "--top-k 10 does not fit a model of 3 experts")
    one_line_error(capsys, ["add", "--model", str(model), "--packages", math, "--top-k", "-1", "--out",
                            str(tmp_path / "o")], "--top-k -1 does not fit")
    one_line_error(capsys, ["remove", "--model", str(model), "--exclude", "code", "--shard-gb", "nan", "--out",
                            str(tmp_path / "o")], "--shard-gb must be a positive number")
    with pytest.raises(SystemExit) as exit_:  # merge with no experts: argparse names the missing flag
        main(["merge", "--anchor", anchor, "--top-k", "1", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "required: --packages" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    one_line_error(capsys, ["remove", "--model", str(model), "--exclude", "code", "--out", str(blocker / "o")],
                   "is a file, not a directory")
    truncated = copy(tiny_anchor, tmp_path / "truncated-anchor")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    one_line_error(capsys, ["eval", "--model", str(truncated), "--data", f"x={corpora['code']}"],
                   "cannot load the model")
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    one_line_error(capsys, ["remove", "--model", str(model), "--exclude", "code", "--out", str(tmp_path / "full")],
                   "disk full while writing")
    assert nothing_written(tmp_path / "full") and nothing_written(tmp_path / "o")


def test_a_damaged_token_cache_entry_is_rebuilt(tiny_anchor, corpora, tmp_path):
    from flexolmo.data.tokens import tokenize_file
    from flexolmo.model.anchor import load_tokenizer

    tokenizer = load_tokenizer(tiny_anchor)
    first = tokenize_file(corpora["math"], tokenizer, cache_dir=tmp_path)
    expected = (first.tokens.tolist(), first.num_documents)
    del first  # its tokens are a map of the file damaged below
    (entry,) = (tmp_path / "tokens").iterdir()
    (entry / "tokens.npy").unlink()
    (entry / "tokens.npy").write_bytes(b"not an array")
    again = tokenize_file(corpora["math"], tokenizer, cache_dir=tmp_path)
    assert (again.tokens.tolist(), again.num_documents) == expected


def test_a_rerun_removes_the_staging_directories_of_killed_runs_only(signed, tiny_anchor, tmp_path):
    import fcntl

    out = tmp_path / "merged"
    killed = tmp_path / ".merged.tmp-killed"  # left by a run killed mid-write: its lock is free
    (killed / "merged").mkdir(parents=True)
    (killed / ".lock").write_text("")
    running = tmp_path / ".merged.tmp-running"  # a run still writing holds its lock
    (running / "merged").mkdir(parents=True)
    handle = open(running / ".lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        merge(tiny_anchor, [signed["code"]], out, top_k=2)
        assert out.exists() and not killed.exists() and running.exists()
    finally:
        handle.close()


# -- separate roots of trust (issue 25, findings 1, 2, 6 and 7) -------------------------------------------------

def test_only_the_coordinator_vouches_for_a_merged_model(signed, keys, tiny_anchor, tmp_path, capsys):
    """A member re-signs a tampered merged model with its own (trusted) key: verify must refuse it, and the
    member's key cannot sign a merged model at all."""
    trusted = TrustedKeys(keys)
    model = tmp_path / "v1"
    merge(tiny_anchor, [signed["code"]], model, top_k=2,
          trust=CoordinatorTrust(trusted_keys=trusted, sign_key=keys / "private" / "coordinator.key"))
    sign_directory(model, keys / "private" / "math.key")  # what a dishonest member can always do
    with pytest.raises(TrustError, match="not by the coordinator"):
        verify_merged_model(model, trusted)
    assert main(["verify", str(model), "--trusted-keys", str(keys)]) == 1
    assert "only the coordinator's key vouches" in capsys.readouterr().err
    assert main(["sign", str(model), "--sign-key", str(keys / "private" / "math.key")]) == 1
    assert "only the coordinator signs merged models" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["code\n", "code\nx", "public", "coordinator", ""])
def test_expert_names_match_whole_and_reserved_names_are_refused(name):
    with pytest.raises(PackageError):
        check_name(name)


@pytest.mark.parametrize("name", ["legal\n", "public"])
def test_keygen_refuses_reserved_and_newline_names(name, tmp_path):
    with pytest.raises(TrustError):
        generate_key_pair(name, tmp_path)
    assert not list(tmp_path.iterdir())


# -- every command that acts on a merged model authenticates it first (issue 25, finding 3) ------------------

def swap_names_recomputing_digests(model: Path, out: Path) -> Path:
    """What whoever hosts the files can do without any key: swap the record's entries for slots 1 and 2 (names,
    manifests, signers), recompute the unkeyed slot digests under the new names and the log's model digest.
    Only the coordinator's signature still tells."""
    from flexolmo.core.tensor_io import LazyReader
    from flexolmo.trust.history import model_digest
    from flexolmo.trust.record import read_slot_digest

    swapped = copy(model, out)
    record = json.loads((swapped / MERGED_METADATA_FILE).read_text())
    experts = record["experts"]
    experts[1], experts[2] = experts[2], experts[1]
    reader, layers = LazyReader(swapped), record["anchor"]["config"]["num_hidden_layers"]
    for index, entry in enumerate(experts):
        entry["slot_sha256"] = read_slot_digest(reader, index, entry["name"], layers,
                                                ("gate_proj", "up_proj", "down_proj"))
    (swapped / MERGED_METADATA_FILE).write_text(json.dumps(record))
    log = read_history(swapped)
    log[-1]["model_sha256"] = model_digest(swapped)
    (swapped / HISTORY_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    return swapped


def test_a_name_swap_is_refused_by_every_command_given_keys_and_named_without(signed, keys, tiny_anchor, corpora,
                                                                             tmp_path, capsys):
    trusted = TrustedKeys(keys)
    coordinator = keys / "private" / "coordinator.key"
    model = tmp_path / "v1"
    merge(tiny_anchor, [signed["code"], signed["math"]], model, top_k=2,
          trust=CoordinatorTrust(trusted_keys=trusted, sign_key=coordinator))
    swapped = swap_names_recomputing_digests(model, tmp_path / "swapped")
    assert verify_merged_model(swapped)["experts"][1]["name"] == "math"  # unauthenticated, the swap passes
    capsys.readouterr()

    with pytest.raises(TrustError, match="does not match the files"):
        remove_experts(swapped, ["code"], tmp_path / "r1", trust=CoordinatorTrust(trusted_keys=trusted))
    with pytest.raises(TrustError, match="does not match the files"):
        load_model(swapped, exclude=["code"], trusted_keys=trusted)
    out = tmp_path / "refused"
    key_flag = ["--trusted-keys", str(keys)]
    refusals = {
        "remove": ["remove", "--model", str(swapped), "--exclude", "code", "--out", str(out), *key_flag],
        "add": ["add", "--model", str(swapped), "--packages", str(signed["code"]), "--out", str(out), *key_flag],
        "tune-router": ["tune-router", "--model", str(swapped), "--public-data", str(corpora["public"]),
                        "--proxies", str(corpora["code"]), "--out", str(out), *key_flag],
        "sign": ["sign", str(swapped), "--sign-key", str(coordinator), *key_flag],
        "eval": ["eval", "--model", str(swapped), "--data", str(corpora["code"]), "--exclude", "code", *key_flag],
        "generate": ["generate", "--model", str(swapped), "--prompt", "def", "--exclude", "code", *key_flag],
    }
    for command, argv in refusals.items():
        assert main(argv) == 1, command
        error = capsys.readouterr().err
        assert "does not match the files" in error and len(error.strip().splitlines()) == 1, (command, error)
        assert nothing_written(out), command

    # Without keys every one of them runs, and says loudly that it trusts whoever wrote the files.
    assert main(["generate", "--model", str(swapped), "--prompt", "def", "--exclude", "code",
                 "--max-new-tokens", "1"]) == 0
    assert "warning: --exclude acts on" in capsys.readouterr().err
    assert main(["remove", "--model", str(swapped), "--exclude", "code", "--out", str(tmp_path / "r2")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "unauthenticated" in line]
    assert len(warning) == 1 and "remove acts on" in warning[0] and "no --trusted-keys" in warning[0]

    # The honest model passes every authentication, and the opt-out removes the expert it names.
    remove_experts(model, ["code"], tmp_path / "r3", trust=CoordinatorTrust(trusted_keys=trusted,
                                                                           sign_key=coordinator))
    assert load_model(tmp_path / "r3", trusted_keys=trusted).expert_names == ["public", "math"]
    assert main(["generate", "--model", str(model), "--prompt", "def", "--exclude", "code", "--max-new-tokens",
                 "1", *key_flag]) == 0
    assert "unauthenticated" not in capsys.readouterr().err
    with pytest.raises(TrustError, match="dense model"):
        load_model(tiny_anchor, trusted_keys=trusted)
    assert main(["sign", str(swapped), "--sign-key", str(coordinator)]) == 0  # the coordinator's own risk
    assert "warning: sign acts on" in capsys.readouterr().err


# -- staging directories, result files and outputs inside inputs (issue 25, finding 6) -----------------------

def test_a_staging_directory_is_never_loaded_and_the_next_writer_in_its_folder_removes_it(signed, tiny_anchor,
                                                                                         corpora, tmp_path, capsys):
    import fcntl

    from flexolmo.model.merged_format import read_merged_info

    model = tmp_path / "merged"
    merge(tiny_anchor, [signed["code"]], model, top_k=2)
    killed = tmp_path / ".v2.tmp-killed"  # what kill -9 of `add --out v2` leaves: complete-looking, never sealed
    shutil.copytree(model, killed / "v2")
    (killed / ".lock").write_text("")
    package = tmp_path / ".code.tmp-killed" / "code"
    shutil.copytree(signed["code"], package)
    (package.parent / ".lock").write_text("")
    capsys.readouterr()
    for load in (read_merged_info, load_model, verify_merged_model, lambda path: load_package(package)):
        with pytest.raises(FlexOlmoError, match="staging directory of a run that did not finish"):
            load(killed / "v2")
    for argv in (["eval", "--model", str(killed / "v2"), "--data", str(corpora["code"])],
                 ["verify", str(killed / "v2")],
                 ["merge", "--anchor", str(tiny_anchor), "--packages", str(package), "--top-k", "2", "--out",
                  str(tmp_path / "x")]):
        assert main(argv) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "staging directory" in errors[0], errors
    running = tmp_path / ".v3.tmp-running"  # a run still writing holds its lock: left alone
    (running / "v3").mkdir(parents=True)
    with open(running / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        remove_experts(model, ["code"], tmp_path / "other-name")  # another --out of the same folder
        assert not killed.exists() and not (tmp_path / ".code.tmp-killed").exists() and running.exists()


def test_json_results_are_never_overwritten_without_force(corpora, tmp_path, capsys):
    result = tmp_path / "overlap.json"
    result.write_text("earlier results")
    overlap = ["data", "overlap", "--train", str(corpora["code"]), "--heldout", str(corpora["math"]), "--json",
               str(result)]
    assert main(overlap) == 1
    assert "already exists; choose another path or pass --force" in capsys.readouterr().err
    assert result.read_text() == "earlier results"
    assert main(["eval", "--model", "nowhere", "--data", str(corpora["code"]), "--json", str(result)]) == 1
    assert "already exists" in capsys.readouterr().err  # refused before anything is loaded
    assert main([*overlap, "--force"]) == 0
    assert json.loads(result.read_text())["chars"] == 50
    assert main(["data", "overlap", "--train", str(corpora["code"]), "--heldout", str(corpora["math"]), "--json",
                 str(tmp_path), "--force"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_an_output_inside_an_input_is_refused(signed, tiny_anchor, corpora, tmp_path, capsys):
    from flexolmo.core.fileio import sha256_file

    def digests(path: Path) -> dict:
        return {item.name: sha256_file(item) for item in path.rglob("*") if item.is_file()}

    model = tmp_path / "merged"
    merge(tiny_anchor, [signed["code"]], model, top_k=2)
    before = {path: digests(path) for path in (tiny_anchor, signed["code"], model)}
    capsys.readouterr()
    attempts = [
        ["merge", "--anchor", str(tiny_anchor), "--packages", str(signed["code"]), "--top-k", "2", "--out",
         str(tiny_anchor / "merged")],
        ["merge", "--anchor", str(tiny_anchor), "--packages", str(signed["code"]), "--top-k", "2", "--out",
         str(signed["code"] / "merged")],
        ["add", "--model", str(model), "--packages", str(signed["math"]), "--out", str(model / "v2")],
        ["remove", "--model", str(model), "--exclude", "code", "--out", str(model / "sub" / "v2")],
        ["tune-router", "--model", str(model), "--public-data", str(corpora["public"]), "--proxies",
         str(corpora["code"]), "--out", str(model / "tuned")],
        ["train-expert", "--anchor", str(tiny_anchor), "--data", str(corpora["code"]), "--name", "code", "--out",
         str(tiny_anchor / "code")],
    ]
    for argv in attempts:
        assert main(argv) == 1, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "lies inside the" in errors[0], errors
    assert before == {path: digests(path) for path in (tiny_anchor, signed["code"], model)}


# -- the tokenizer in the fingerprint, and readmission after an opt-out (issue 25, finding 7) ----------------

def test_the_fingerprint_covers_the_tokenizer_and_older_fingerprints_are_refused_with_the_reason(
        signed, keys, tiny_anchor, tmp_path, capsys):
    from flexolmo.trust.history import model_digest

    emptied = copy(tiny_anchor, tmp_path / "emptied-tokenizer")
    (emptied / "tokenizer.json").write_text("{}")  # the same weights, another (broken) tokenizer
    assert compute_fingerprint(emptied) != compute_fingerprint(tiny_anchor)
    with pytest.raises(PackageError, match="trained on another anchor"):
        merge(emptied, [signed["code"]], tmp_path / "m1", top_k=2)
    assert nothing_written(tmp_path / "m1")

    # A package from before the tokenizer was covered: its manifest records no fingerprint scheme (1).
    manifest = json.loads((signed["code"] / MANIFEST_FILE).read_text())
    older = {key: value for key, value in manifest["anchor"].items() if key != "fingerprint_scheme"}
    legacy = rewrite(copy(signed["code"], tmp_path / "legacy"), sign_key=keys / "private" / "code.key", anchor=older)
    with pytest.raises(PackageError, match="scheme 1, which did not cover the tokenizer.*train and package it again"):
        merge(tiny_anchor, [legacy], tmp_path / "m2", top_k=2)
    assert main(["verify", str(legacy), "--anchor", str(tiny_anchor)]) == 1
    error = capsys.readouterr().err
    assert "did not cover the tokenizer" in error and len(error.strip().splitlines()) == 1

    # A merged model whose record predates it cannot take new packages: it is merged again from the anchor.
    model = tmp_path / "model"
    merge(tiny_anchor, [signed["code"]], model, top_k=2)
    record = json.loads((model / MERGED_METADATA_FILE).read_text())
    assert record["anchor"]["fingerprint_scheme"] == 2
    del record["anchor"]["fingerprint_scheme"]
    (model / MERGED_METADATA_FILE).write_text(json.dumps(record))
    log = read_history(model)
    log[-1]["model_sha256"] = model_digest(model)
    (model / HISTORY_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log))
    with pytest.raises(FlexOlmoError, match="merge again from the anchor"):
        add_experts(model, [signed["math"]], tmp_path / "m3")
    remove_experts(model, ["code"], tmp_path / "m4")  # what is kept keeps the scheme it was recorded with
    assert json.loads((tmp_path / "m4" / MERGED_METADATA_FILE).read_text())["anchor"]["fingerprint_scheme"] == 1


def test_an_expert_whose_owner_opted_out_joins_again_only_with_readmit_and_the_log_says_so(
        signed, tiny_anchor, tmp_path, capsys):
    merge(tiny_anchor, [signed["code"], signed["math"]], tmp_path / "v1", top_k=2)
    remove_experts(tmp_path / "v1", ["code"], tmp_path / "v2")
    with pytest.raises(FlexOlmoError, match="'code' opted out of .* pass --readmit code"):
        add_experts(tmp_path / "v2", [signed["code"]], tmp_path / "v3")
    assert nothing_written(tmp_path / "v3")
    add = ["add", "--model", str(tmp_path / "v2"), "--packages", str(signed["code"]), "--max-public-top-share", "1",
           "--max-public-bpb-increase", "10", "--out", str(tmp_path / "v3")]
    capsys.readouterr()
    assert main(add) == 1 and "needs its owner's consent" in capsys.readouterr().err
    assert main([*add, "--readmit", "math"]) == 1 and "which no package given adds" in capsys.readouterr().err
    assert main([*add, "--readmit", "code"]) == 0
    log = read_history(tmp_path / "v3")
    assert [entry["operation"] for entry in log] == ["merge", "remove", "add"]
    assert log[-1]["added"] == [{**log[0]["added"][0], "readmitted": True}]
    capsys.readouterr()
    assert main(["history", "--model", str(tmp_path / "v3")]) == 0
    assert "(readmit" in capsys.readouterr().out  # "(readmitted after opting out)", wrapped in its cell
    remove_experts(tmp_path / "v3", ["math"], tmp_path / "v4")  # an opt-out of another owner: code stays in
    add_experts(tmp_path / "v4", [signed["math"]], tmp_path / "v5", readmit=["math"])


def test_the_next_writer_leaves_directories_that_only_look_like_staging(tiny_anchor, signed, tmp_path):
    foreign = tmp_path / ".notes.tmp-old"  # another program's: it holds more than a lock and one output
    (foreign / "notes").mkdir(parents=True)
    (foreign / "draft.txt").write_text("keep me")
    (foreign / ".lock").write_text("")
    merge(tiny_anchor, [signed["code"]], tmp_path / "merged", top_k=2)
    assert (foreign / "draft.txt").read_text() == "keep me"
