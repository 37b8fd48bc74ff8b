"""`flexolmo coordinator`: run a consortium as a service, with its state in one database.

  flexolmo coordinator init --anchor ANCHOR --sign-key coordinator.key [--db URL] [--store DIR|s3://BUCKET/PREFIX]
      [--store-endpoint URL] [--work-dir DIR] [--probe-data F..]
  flexolmo coordinator add-member NAME --public-key NAME.pub [--db URL]
  flexolmo coordinator revoke-member NAME [--db URL]
  flexolmo coordinator serve [--db URL] [--host H] [--port P] [--workers N]
  flexolmo coordinator worker [--db URL]
  flexolmo coordinator publish [--db URL] [--top-k K]
  flexolmo coordinator policy --publish-after N [--top-k K] [--db URL]
  flexolmo coordinator log --verify [--export FILE.jsonl] [--db URL]
  flexolmo coordinator verify VERSION_DIR --public-key coordinator.pub

--db is a SQLAlchemy URL: a SQLite file by default, postgresql+psycopg://USER@HOST:PORT/DB when it grows.
Every subcommand takes the same --db.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

from flexolmo.cli.common import HelpFormatter, add_command


def _sub(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    from flexolmo.service.database import DEFAULT_DB

    parser = subparsers.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    parser.add_argument("--db", default=DEFAULT_DB, help="database URL (SQLAlchemy)")
    return parser


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="run the consortium service (members, admission, versions, log)",
                         description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, help="what to do")
    init = _sub(actions, "init", "create the database and fix the anchor, store and coordinator key")
    init.add_argument("--anchor", required=True, type=Path, help="the consortium's anchor directory")
    init.add_argument("--sign-key", required=True, type=Path, help="the coordinator's private key (NAME.key)")
    init.add_argument("--store", default="consortium-store",
                      help="package store: a directory, or s3://BUCKET/PREFIX (credentials from the AWS_* "
                           "environment)")
    init.add_argument("--store-endpoint", default=None,
                      help="the S3-compatible service's URL for an s3:// store (default: AWS)")
    init.add_argument("--work-dir", type=Path, default=None,
                      help="local directory for uploads in progress, scratch space and published versions "
                           "(default: the --store directory; consortium-work with an s3:// store)")
    init.add_argument("--probe-data", nargs="+", type=Path, default=None,
                      help="public text admission probes with (default: the held-out text the anchor records)")
    member = _sub(actions, "add-member", "register a member (or rotate its key)")
    member.add_argument("name", help="the member's name (its expert's name)")
    member.add_argument("--public-key", required=True, type=Path, help="the member's public key (NAME.pub)")
    revoke = _sub(actions, "revoke-member", "revoke a member's key: its requests are refused from now on")
    revoke.add_argument("name", help="the member's name")
    serve = _sub(actions, "serve", "serve the HTTP API and web page")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8700, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1,
                       help="admission workers in this process (0: only `coordinator worker` processes admit)")
    _lease(serve)
    worker = _sub(actions, "worker", "run an admission worker process (beside or instead of serve's own)")
    _lease(worker)
    publish = _sub(actions, "publish", "merge the admitted, active experts into the next version")
    publish.add_argument("--top-k", type=int, default=2, help="experts active per token")
    publish.add_argument("--release-stale", action="store_true",
                         help="first release reservations over an hour old (left by a killed publisher)")
    _lease(publish)
    policy = _sub(actions, "policy", "publish by policy: a new version after every N admissions, by the workers")
    policy.add_argument("--publish-after", type=int, required=True,
                        help="admissions between publications (1: on each admission; 0: only on command)")
    policy.add_argument("--top-k", type=int, default=2, help="experts active per token in those versions")
    log = _sub(actions, "log", "verify and export the audit log")
    log.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if broken")
    log.add_argument("--export", type=Path, help="write every event as JSON lines")
    verify = actions.add_parser("verify", help="verify a published version (signature, log, attestation)",
                                formatter_class=HelpFormatter)
    verify.add_argument("version_dir", type=Path, help="the version's model directory")
    verify.add_argument("--public-key", required=True, type=Path, help="the coordinator's public key (NAME.pub)")
    parser.set_defaults(run=run)


def _lease(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lease-seconds", type=float, default=30.0,
                        help="how long a job or publication is held without renewal before another process may "
                             "take it over (its holder is presumed dead)")


def _engine(url: str):
    from flexolmo.service.database import migrate, open_engine

    engine = open_engine(url)
    migrate(engine)
    return engine


def _in_session(engine, action):
    from flexolmo.service.database import in_transaction

    return in_transaction(engine, action)


def _log(engine, args: argparse.Namespace) -> int:
    from flexolmo.service.audit import export_log, verify_log

    if args.export:
        print(f"exported {export_log(engine, args.export)} events to {args.export}")
    if args.verify:
        check = verify_log(engine)
        if not check.ok:
            print(f"audit log BROKEN ({check.rows} rows): {check.problems[0]}")
            return 1
        print(f"audit log intact: {check.rows} events, hash chain and head verified")
    return 0


def _work(engine, lease) -> None:
    import signal
    import threading

    from flexolmo.service.worker import Worker

    stop = threading.Event()
    worker = Worker(engine, lease)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (stop.set(), worker.wake.set()))
    print(f"admission worker {worker.name} started", flush=True)
    worker.run(stop)


def run(args: argparse.Namespace) -> int:
    from flexolmo.service import registry
    from flexolmo.service.versions import publish, release_stale

    if args.action == "verify":
        from flexolmo.service.versions import verify_version

        statement = verify_version(args.version_dir, args.public_key)
        print(f"version {statement['predicate']['version']} verified: signed by the coordinator, attested "
              f"output {statement['subject'][0]['digest']['sha256'][:16]}..., inputs "
              f"{', '.join(i['name'] for i in statement['predicate']['inputs'])}")
        return 0
    engine = _engine(args.db)
    if args.action == "init":
        settings = _in_session(engine, lambda s: registry.initialise(s, args.anchor, args.store, args.sign_key,
                                                                            args.probe_data, args.work_dir,
                                                                            args.store_endpoint))
        print(f"consortium initialised in {args.db} (anchor {settings['anchor_fingerprint'][:16]}...)")
    elif args.action == "add-member":
        member = _in_session(engine, lambda s: registry.add_member(s, args.name, args.public_key).key_id)
        print(f"member {args.name} registered (key id {member[:16]}...)")
    elif args.action == "revoke-member":
        _in_session(engine, lambda s: registry.revoke_member(s, args.name))
        print(f"member {args.name} revoked")
    elif args.action == "serve":
        import uvicorn

        from flexolmo.service.app import create_app

        uvicorn.run(create_app(engine, args.workers, timedelta(seconds=args.lease_seconds)), host=args.host,
                    port=args.port, log_level="warning")
    elif args.action == "worker":
        _work(engine, timedelta(seconds=args.lease_seconds))
    elif args.action == "policy":
        from flexolmo.service.policy import set_policy

        policy = _in_session(engine, lambda s: set_policy(s, args.publish_after, args.top_k))
        print(f"publication policy: {policy}")
    elif args.action == "publish":
        if args.release_stale:
            print(f"released stale reservations: {release_stale(engine) or 'none'}")
        print(json.dumps(publish(engine, args.top_k, timedelta(seconds=args.lease_seconds)), indent=1))
    else:
        return _log(engine, args)
    return 0
