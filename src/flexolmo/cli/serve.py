"""`flexolmo serve`: serve a merged model over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Every request runs only the experts its API key may use (`--keys`: a JSON object from key to expert names,
["*"] for all; a request's `experts` field narrows them; the public expert is always on), and reports each
expert's share of its routing in `usage.experts`. With `--active-set` and `--coordinator-keys` the server
follows the coordinator's signed active set, from a file or from the consortium service's URL (polled every
`--active-set-poll` seconds): an expert that leaves it is masked from the next request on; a set that is
expired or wrongly signed makes the server serve the public expert only (see /health). With `--trusted-keys`
the merged model must be signed by the coordinator (coordinator.pub there) before the server starts, so expert
names, which every allow-list and opt-out is written in, are the coordinator's; without it the server says on
stderr that it trusts whoever wrote the files.

Example:
  flexolmo serve --model merged/ --keys keys.json
  curl http://127.0.0.1:8000/v1/completions -H 'Authorization: Bearer KEY' \\
       -H 'Content-Type: application/json' -d '{"model": "merged", "prompt": "def ", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexolmo.cli.common import (
    add_command,
    add_device_flags,
    add_router_bias_flag,
    add_trusted_keys_flag,
    torch_dtype,
    trusted_keys,
)
from flexolmo.core.errors import TrustError
from flexolmo.serve.follow import DEFAULT_POLL, MAX_POLL, MIN_POLL


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="serve a merged model over an OpenAI-compatible API",
                         description=__doc__)
    parser.add_argument("--model", required=True, help="merged model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--keys", type=Path, default=None,
                        help="JSON object from API key to the experts it may use; without it, anyone may use all")
    parser.add_argument("--active-set", default=None, metavar="FILE|URL",
                        help="the coordinator's signed active set: a file, or the consortium service's "
                             "http(s)://HOST/v1/active-set")
    parser.add_argument("--active-set-poll", type=float, default=DEFAULT_POLL, metavar="SECONDS",
                        help=f"seconds between fetches of an active-set URL ({MIN_POLL} to {MAX_POLL})")
    parser.add_argument("--coordinator-keys", type=Path, default=None,
                        help="directory with the coordinator's public key, which signs the active set")
    parser.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    add_trusted_keys_flag(parser)
    add_router_bias_flag(parser)
    add_device_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from flexolmo.model.merged_format import authenticate_merged_model
    from flexolmo.model.runtime import load_model
    from flexolmo.serve.app import create_app
    from flexolmo.serve.server import ModelServer, ServeOptions

    if (args.active_set is None) != (args.coordinator_keys is None):
        raise TrustError("--active-set and --coordinator-keys go together: the set is only as good as its signer")
    if not MIN_POLL <= args.active_set_poll <= MAX_POLL:
        raise TrustError(f"--active-set-poll must be between {MIN_POLL} and {MAX_POLL} seconds")
    trusted = trusted_keys(args)
    # Before anything loads: with keys the coordinator's signature must cover the files as they are (one line
    # and no server when it does not); without keys, one warning line.
    authenticate_merged_model(args.model, trusted, "serve")
    loaded = load_model(args.model, dtype=torch_dtype(args.dtype), device=args.device, router_bias=args.router_bias)
    options = ServeOptions(args.keys, args.active_set, args.coordinator_keys, args.max_batch, args.active_set_poll)
    uvicorn.run(create_app(ModelServer(loaded, options)), host=args.host, port=args.port, log_level="info")
    return 0
