"""`flexolmo submit PACKAGE --coordinator URL --sign-key NAME.key [--proxies PROXIES.json]`: send your signed
expert package (and your proxy file) to the consortium service. The service queues the package for admission at
once; this command then waits for the verdict (admitted, or refused with its reasons) unless --no-wait, and exits
1 on a refusal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flexolmo.cli.common import add_command


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="submit an expert package to a consortium service",
                         description=__doc__)
    parser.add_argument("package", type=Path, help="the package directory")
    parser.add_argument("--coordinator", required=True, help="the service's URL, e.g. http://127.0.0.1:8700")
    parser.add_argument("--sign-key", required=True, type=Path, help="your private key (NAME.key)")
    parser.add_argument("--licence", default=None,
                        help="the licence your expert is offered under (an SPDX identifier such as CC-BY-4.0), "
                             "printed in the model card of every version that holds it")
    parser.add_argument("--data-description", default=None,
                        help="what your expert was trained on, in your words, for the model card")
    parser.add_argument("--proxies", type=Path, default=None,
                        help="your proxy file (`flexolmo select-proxy`), sent first: admission then probes your "
                             "domain with it whenever another member's expert joins (it replaces the one sent "
                             "before)")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the package is queued (status pending); read the verdict later with "
                             "`flexolmo status`")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from flexolmo.service.client import ConsortiumClient

    declaration = {key: value for key, value in (("licence", args.licence), ("data", args.data_description))
                   if value is not None}
    client = ConsortiumClient(args.coordinator, args.sign_key)
    if args.proxies is not None:
        sent = client.send_proxies(args.proxies)
        print(f"proxies sent: {sent['documents']} documents (sha256 {sent['proxies_sha256'][:16]}...)",
              file=sys.stderr)
    answer = client.submit(args.package, wait=False, declaration=declaration)
    if not args.no_wait:
        print(f"queued as submission {answer['submission']}; waiting for its admission verdict", file=sys.stderr)
        answer = client.verdict(answer["submission"])
    print(json.dumps(answer, indent=1))
    return 0 if answer["status"] in ("admitted", "pending") else 1
