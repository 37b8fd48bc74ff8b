"""The coordinator's trust flags, shared by `merge`, `add`, `remove` and `tune-router`: signing, trusted keys
and the admission checks (`AdmissionPolicy`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import add_trusted_keys_flag
from flexolmo.cli.config_flags import add_config_flags, config_values

# The admission settings whose flags come from `AdmissionPolicy`, in `--help` order: a new field is one line.
ADMISSION_FIELDS = (
    "probe_sequences",
    "max_row_norm_ratio",
    "max_public_top_share",
    "max_public_bpb_increase",
    "max_member_top_drop",
    "max_member_bpb_increase",
    "device",
)


def add_coordinator_flags(parser: argparse.ArgumentParser, joining: bool) -> None:
    """`--sign-key` and `--trusted-keys` always; with `joining` (merge, add) also the admission checks, whose
    flags are `AdmissionPolicy`'s fields."""
    from flexolmo.coordinator.admission import AdmissionPolicy

    group = parser.add_argument_group("trust")
    group.add_argument("--sign-key", type=Path, default=None,
                       help="the coordinator's private key (NAME.key): sign every file of the model written")
    add_trusted_keys_flag(group)
    if not joining:
        return
    admission = parser.add_argument_group("admission checks of joining experts")
    # Which text the probe reads is the command's to say (merge falls back on the anchor's record), so this
    # path flag is not the policy's field.
    admission.add_argument("--probe-data", nargs="+", type=Path, default=None,
                           help="public held-out text to probe the merged model with (merge defaults to the "
                                "anchor's recorded public held-out file when it is present)")
    add_config_flags(admission, AdmissionPolicy, ADMISSION_FIELDS)
    add_member_probe_paths(admission)


def add_member_probe_paths(admission) -> None:
    """Which proxies probe the members' domains (issue 25, finding 4), and the public text they resolve in:
    paths whose fallback is the command's to say, so not generated from the policy's fields."""
    from flexolmo.coordinator.admission import AdmissionPolicy

    fields = AdmissionPolicy.model_fields
    admission.add_argument("--proxies", nargs="+", type=Path, default=[], metavar="FILE",
                           help=fields["proxies"].description + "; without them members' domains are not probed")
    admission.add_argument("--public-data", nargs="+", type=Path, default=None, metavar="FILE",
                           help=fields["public"].description + " (merge defaults to the anchor's public sample)")


def admission_policy(args: argparse.Namespace, anchor_dir: Path | None = None):
    """The `AdmissionPolicy` the parsed admission flags describe; merge resolves proxies in the anchor's public
    sample unless --public-data is given."""
    from flexolmo.coordinator.admission import AdmissionPolicy
    from flexolmo.data.public_sample import anchor_public_sample

    public = list(args.public_data or [])
    if args.proxies and not public and anchor_dir is not None and anchor_public_sample(anchor_dir) is not None:
        public = [anchor_public_sample(anchor_dir)]
    return AdmissionPolicy(**config_values(args, ADMISSION_FIELDS), proxies=list(args.proxies), public=public)


def coordinator_trust(args: argparse.Namespace, anchor_dir: Path | None = None):
    """The CoordinatorTrust the flags describe; warns once when packages will not be authenticated."""
    from flexolmo.coordinator.admission import print_report, recorded_public_heldout
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
    policy = admission_policy(args, anchor_dir)
    if args.probe_data:
        probe, reason = (list(args.probe_data), "all"), ""
    elif anchor_dir is not None:
        probe = recorded_public_heldout(anchor_dir)
        reason = f"{anchor_dir} records no public held-out file that is present and unchanged; pass --probe-data"
    else:
        probe, reason = None, "a merged model does not say where its anchor's public text is; pass --probe-data"
    return CoordinatorTrust(trusted_keys=trusted, admission=policy, probe=probe, no_probe_reason=reason,
                            sign_key=args.sign_key, on_admission=print_report)

