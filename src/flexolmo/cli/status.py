"""`flexolmo status --coordinator URL`: a consortium service's members, submissions, versions, withdrawals
and current active-set version."""

from __future__ import annotations

import argparse

from flexolmo.cli.common import add_command, add_json_flag, json_output, write_json_output


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="show a consortium service's state", description=__doc__)
    parser.add_argument("--coordinator", required=True, help="the service's URL")
    add_json_flag(parser, "the full state, as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.core.progress import print_table
    from flexolmo.service.client import ConsortiumClient

    target = json_output(args)
    state = ConsortiumClient(args.coordinator).status()
    if target is not None:
        write_json_output(target, state, "state")
        return 0
    print_table(f"submissions (active set version {state['active_set_version']})",
                ["#", "member", "package", "status"],
                [[s["id"], s["member"], s["package_sha256"][:16], s["status"]] for s in state["submissions"]])
    print_table("versions", ["version", "status", "experts"],
                [[v["number"], v["status"], ", ".join(e["name"] for e in v["experts"])] for v in state["versions"]])
    return 0
