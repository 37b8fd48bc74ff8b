"""`flexolmo coordinator`: run a consortium as a service, with its state in one database.

  flexolmo coordinator init --anchor ANCHOR --sign-key coordinator.key [--db URL] [--store DIR|s3://BUCKET/PREFIX]
      [--store-endpoint URL] [--work-dir DIR] [--probe-data F..] [--public-data F..]
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
from collections.abc import Sequence
from pathlib import Path

from flexolmo.cli.common import HelpFormatter, add_command
from flexolmo.cli.config_flags import add_config_flags, config_values
from flexolmo.service.settings import ServiceSettings

# Which `ServiceSettings` fields each sub-command exposes as flags (their defaults and help are the fields').
INIT_FIELDS = ["store", "store_endpoint", "work_dir"]
SERVE_FIELDS = ["host", "port", "workers", "lease_seconds"]
WORKER_FIELDS = ["lease_seconds"]
PUBLISH_FIELDS = ["top_k", "lease_seconds"]
POLICY_FIELDS = ["top_k"]


def _sub(subparsers, name: str, help: str, fields: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_config_flags(parser, ServiceSettings, ["db", *fields])
    return parser


def service_settings(args: argparse.Namespace, fields: Sequence[str]) -> ServiceSettings:
    """The settings a sub-command's flags give (the fields it does not expose keep their defaults)."""
    return ServiceSettings(**config_values(args, ["db", *fields]))


def register(subparsers, name: str) -> None:
    parser = add_command(subparsers, name, help="run the consortium service (members, admission, versions, log)",
                         description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True, help="what to do")
    init = _sub(actions, "init", "create the database and fix the anchor, store and coordinator key", INIT_FIELDS)
    init.add_argument("--anchor", required=True, type=Path, help="the consortium's anchor directory")
    init.add_argument("--sign-key", required=True, type=Path, help="the coordinator's private key (NAME.key)")
    init.add_argument("--probe-data", nargs="+", type=Path, default=None,
                      help="public text admission probes with (default: the held-out text the anchor records)")
    init.add_argument("--public-data", nargs="+", type=Path, default=None,
                      help="the public text members choose their proxies from (`select-proxy --public`); without "
                           "it, members cannot send proxies and their domains are not probed at admission")
    member = _sub(actions, "add-member", "register a member (or rotate its key)")
    member.add_argument("name", help="the member's name (its expert's name)")
    member.add_argument("--public-key", required=True, type=Path, help="the member's public key (NAME.pub)")
    revoke = _sub(actions, "revoke-member", "revoke a member's key: its requests are refused from now on")
    revoke.add_argument("name", help="the member's name")
    _sub(actions, "serve", "serve the HTTP API and web page", SERVE_FIELDS)
    _sub(actions, "worker", "run an admission worker process (beside or instead of serve's own)", WORKER_FIELDS)
    publish = _sub(actions, "publish", "merge the admitted, active experts into the next version", PUBLISH_FIELDS)
    publish.add_argument("--release-stale", action="store_true",
                         help="first release reservations over an hour old (left by a killed publisher)")
    policy = _sub(actions, "policy", "publish by policy: a new version after every N admissions, by the workers",
                  POLICY_FIELDS)
    policy.add_argument("--publish-after", type=int, required=True,
                        help="admissions between publications (1: on each admission; 0: only on command)")
    log = _sub(actions, "log", "verify and export the audit log")
    log.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 if broken")
    log.add_argument("--export", type=Path, help="write every event as JSON lines")
    verify = actions.add_parser("verify", help="verify a published version (signature, log, attestation)",
                                formatter_class=HelpFormatter)
    verify.add_argument("version_dir", type=Path, help="the version's model directory")
    verify.add_argument("--public-key", required=True, type=Path, help="the coordinator's public key (NAME.pub)")
    parser.set_defaults(run=run)


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
        chosen = service_settings(args, INIT_FIELDS)
        settings = _in_session(engine, lambda s: registry.initialise(s, args.anchor, chosen.store, args.sign_key,
                                                                            args.probe_data, chosen.work_dir,
                                                                            chosen.store_endpoint,
                                                                            args.public_data))
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

        chosen = service_settings(args, SERVE_FIELDS)
        uvicorn.run(create_app(engine, chosen.workers, chosen.lease), host=chosen.host, port=chosen.port,
                    log_level="warning")
    elif args.action == "worker":
        _work(engine, service_settings(args, WORKER_FIELDS).lease)
    elif args.action == "policy":
        from flexolmo.service.policy import set_policy

        top_k = service_settings(args, POLICY_FIELDS).top_k
        policy = _in_session(engine, lambda s: set_policy(s, args.publish_after, top_k))
        print(f"publication policy: {policy}")
    elif args.action == "publish":
        if args.release_stale:
            print(f"released stale reservations: {release_stale(engine) or 'none'}")
        chosen = service_settings(args, PUBLISH_FIELDS)
        print(json.dumps(publish(engine, chosen.top_k, chosen.lease), indent=1))
    else:
        return _log(engine, args)
    return 0
