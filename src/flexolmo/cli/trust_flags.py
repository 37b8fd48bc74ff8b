"""The coordinator's trust flags, shared by `merge`, `add`, `remove` and `tune-router`."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_trusted_keys_flag


def add_coordinator_flags(parser: argparse.ArgumentParser, joining: bool) -> None:
    """`--sign-key` and `--trusted-keys` always; with `joining` (merge, add) also the admission checks."""
    from flexolmo.coordinator.admission import AdmissionPolicy

    group = parser.add_argument_group("trust")
    group.add_argument("--sign-key", type=Path, default=None,
                       help="the coordinator's private key (NAME.key): sign every file of the model written")
    add_trusted_keys_flag(group)
    if not joining:
        return
    fields = AdmissionPolicy.model_fields
    admission = parser.add_argument_group("admission checks of joining experts")
    admission.add_argument("--probe-data", nargs="+", type=Path, default=None,
                           help="public held-out text to probe the merged model with (merge defaults to the "
                                "anchor's recorded public held-out file when it is present)")
    admission.add_argument("--probe-sequences", type=int, default=fields["probe_sequences"].default,
                           help=fields["probe_sequences"].description)
    admission.add_argument("--max-row-norm-ratio", type=float, default=fields["max_row_norm_ratio"].default,
                           help=fields["max_row_norm_ratio"].description)
    admission.add_argument("--max-public-top-share", type=float, default=fields["max_public_top_share"].default,
                           help=fields["max_public_top_share"].description)
    admission.add_argument("--max-public-bpb-increase", type=float,
                           default=fields["max_public_bpb_increase"].default,
                           help=fields["max_public_bpb_increase"].description)
    admission.add_argument("--device", default="cpu", help="torch device of the probe (cpu, cuda, cuda:1, ...)")
    add_member_probe_flags(admission)


def add_member_probe_flags(admission) -> None:
    """The probe of members' domains on their proxies (issue 25, finding 4)."""
    from flexolmo.coordinator.admission import AdmissionPolicy

    fields = AdmissionPolicy.model_fields
    admission.add_argument("--proxies", nargs="+", type=Path, default=[], metavar="FILE",
                           help=fields["proxies"].description + "; without them members' domains are not probed")
    admission.add_argument("--public-data", nargs="+", type=Path, default=None, metavar="FILE",
                           help=fields["public"].description + " (merge defaults to the anchor's public sample)")
    admission.add_argument("--max-member-top-drop", type=float, default=fields["max_member_top_drop"].default,
                           help=fields["max_member_top_drop"].description)
    admission.add_argument("--max-member-bpb-increase", type=float,
                           default=fields["max_member_bpb_increase"].default,
                           help=fields["max_member_bpb_increase"].description)


def member_probe_settings(args: argparse.Namespace, anchor_dir: Path | None) -> dict:
    """AdmissionPolicy fields of the members' probe; merge resolves proxies in the anchor's public sample unless
    --public-data is given."""
    from flexolmo.data.public_sample import anchor_public_sample

    public = list(args.public_data or [])
    if args.proxies and not public and anchor_dir is not None and anchor_public_sample(anchor_dir) is not None:
        public = [anchor_public_sample(anchor_dir)]
    return {"proxies": list(args.proxies), "public": public, "max_member_top_drop": args.max_member_top_drop,
            "max_member_bpb_increase": args.max_member_bpb_increase}


def coordinator_trust(args: argparse.Namespace, anchor_dir: Path | None = None):
    """The CoordinatorTrust the flags describe; warns once when packages will not be authenticated."""
    from flexolmo.coordinator.admission import AdmissionPolicy, print_report, recorded_public_heldout
    from flexolmo.coordinator.publish import CoordinatorTrust
    from flexolmo.core.progress import console
    from flexolmo.trust.signing import TrustedKeys, key_signer

    if args.sign_key is not None:
        key_signer(args.sign_key)  # a bad key fails now, not after the merge
    trusted = TrustedKeys(args.trusted_keys) if args.trusted_keys is not None else None
    if not hasattr(args, "probe_data"):  # remove, tune-router: nobody joins, so no admission checks
        return CoordinatorTrust(trusted_keys=trusted, sign_key=args.sign_key)
    if trusted is None:
        console.print("[yellow]warning:[/] packages are not authenticated (no --trusted-keys): their names and "
                      "contents are whatever whoever handed them over wrote", soft_wrap=True)
    policy = AdmissionPolicy(
        max_row_norm_ratio=args.max_row_norm_ratio, max_public_top_share=args.max_public_top_share,
        max_public_bpb_increase=args.max_public_bpb_increase, probe_sequences=args.probe_sequences,
        device=args.device, **member_probe_settings(args, anchor_dir))
    if args.probe_data:
        probe, reason = (list(args.probe_data), "all"), ""
    elif anchor_dir is not None:
        probe = recorded_public_heldout(anchor_dir)
        reason = f"{anchor_dir} records no public held-out file that is present and unchanged; pass --probe-data"
    else:
        probe, reason = None, "a merged model does not say where its anchor's public text is; pass --probe-data"
    return CoordinatorTrust(trusted_keys=trusted, admission=policy, probe=probe, no_probe_reason=reason,
                            sign_key=args.sign_key, on_admission=print_report)


def shard_bytes(gigabytes: float) -> int:
    """`--shard-gb` as bytes; a positive finite size only."""
    import math

    from flexolmo.core.errors import MergeError

    if not math.isfinite(gigabytes) or gigabytes <= 0:
        raise MergeError(f"--shard-gb must be a positive number of gigabytes, got {gigabytes}")
    return max(1, int(gigabytes * 1024**3))
