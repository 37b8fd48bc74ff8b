"""The consortium service's timings, on one machine, over real HTTP (uvicorn) and a real database.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_service.py [--db URL] [--store s3://BUCKET/PREFIX
        --store-endpoint URL]

Builds a tiny anchor and one honest expert in a scratch directory (a few seconds of CPU), makes eight owners
(the expert renamed to each and signed by its own key), then measures:
- submission -> answer (`pending`, the package queued in the store) and -> admission result: one owner's signed
  upload until the service answers, then until the client, polling, holds the verdict the service's worker
  recorded (verification, authentication, the merge admission measures in, row-norm and public-probe checks),
  5 times;
- 8 owners submitting at the same moment: wall time, and that all 8 are admitted and the log verifies;
- withdrawal -> new active set: from the signed withdrawal until a client has fetched and verified an active
  set without the expert, for 5 owners;
- withdrawal -> first request served without the expert: version 1 (the 8 admitted experts) is published and
  served by `flexolmo serve`'s server following the service's active-set URL (polled every
  0.1 s); from the signed withdrawal until a completion comes back whose attribution gives the expert
  nothing, for 5 more owners (the requests before it count as served with the expert);
- audit-log verification at 100,000 events (chained rows bulk-written to a fresh SQLite file first).
Results: printed, and `benchmarks/results/service.json` (`service-postgresql.json` with a PostgreSQL --db;
`-s3` added with an S3 --store, e.g. moto's server: `python -m moto.server -p 5000` and AWS_* variables set).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import insert

import openai

from flexolmo.model.runtime import load_model
from flexolmo.serve.server import ModelServer, ServeOptions
from flexolmo.serve.threaded import running_server
from flexolmo.service.audit import GENESIS, HEAD_KEY, now_iso, row_hash, verify_log
from flexolmo.service.client import ConsortiumClient
from flexolmo.service.database import in_transaction, migrate, open_engine, put_setting
from flexolmo.service.models import AuditEvent
from flexolmo.service.registry import add_member, initialise
from flexolmo.service.versions import publish
from flexolmo.trust.active_set import verify_active_set
from flexolmo.trust.signing import TrustedKeys, generate_key_pair

sys.path.insert(0, str(Path(__file__).parent))
from common import argument_parser, command_line, results_file, write_results
from service_fixtures import ServerThread, owner_packages, tiny_anchor_and_expert

OWNERS = [f"owner{i}" for i in range(1, 9)]


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def submissions(url: str, keys: Path, packages: dict[str, Path]) -> tuple[list[float], list[float]]:
    """Seconds to the `pending` answer, and to the verdict, of five submissions one after the other."""
    client = ConsortiumClient(url, keys / "owner1.key")
    answered, decided = [], []
    for _ in range(5):
        start = time.perf_counter()
        queued = client.submit(packages["owner1"], wait=False)
        answered.append(time.perf_counter() - start)
        assert client.verdict(queued["submission"])["status"] == "admitted"
        decided.append(time.perf_counter() - start)
    return answered, decided


def concurrent_submissions(url: str, keys: Path, packages: dict[str, Path]) -> dict:
    barrier, answers = threading.Barrier(len(OWNERS)), {}

    def owner(name: str) -> None:
        barrier.wait()
        answers[name] = ConsortiumClient(url, keys / f"{name}.key").submit(packages[name])["status"]

    threads = [threading.Thread(target=owner, args=(name,)) for name in OWNERS]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"owners": len(OWNERS), "wall_seconds": time.perf_counter() - start,
            "admitted": sum(status == "admitted" for status in answers.values())}


def withdrawals(url: str, keys: Path, trusted: TrustedKeys) -> list[float]:
    seconds = []
    for name in OWNERS[1:6]:
        start = time.perf_counter()
        ConsortiumClient(url, keys / f"{name}.key").withdraw(name)
        active = verify_active_set(ConsortiumClient(url).active_set(), trusted)
        assert name not in {expert.name for expert in active.experts}
        seconds.append(time.perf_counter() - start)
    return seconds


def served_withdrawals(engine, url: str, keys: Path, root: Path, owners: list[str]) -> dict:
    """Seconds from each owner's signed withdrawal until the server that follows the service's active set
    answers a request without that owner's expert, and how many requests it served with it meanwhile. The
    owners' experts are one expert under eight names, so the version is published at top-k = every expert
    (each gets a share of every token; at a smaller top-k ties would hide some)."""
    model = Path(publish(engine, top_k=len(OWNERS) + 1)["path"])
    (root / "serve-keys").mkdir()
    (root / "serve-keys" / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
    options = ServeOptions(active_set=f"{url}/v1/active-set", coordinator_keys=root / "serve-keys",
                           active_set_poll=0.1)
    seconds, served_with = [], []
    with running_server(ModelServer(load_model(model), options)) as server:
        client = openai.OpenAI(api_key="unused", base_url=f"{server}/v1", max_retries=0, timeout=60)

        def share(name: str) -> float:
            usage = client.completions.create(model="published", prompt="the river and the city", max_tokens=1,
                                              temperature=0).usage.model_extra
            return usage["experts"]["prompt"].get(name, 0.0)

        for name in owners:
            assert share(name) > 0, f"{name} is not used before its withdrawal"
            start, used = time.perf_counter(), 0
            ConsortiumClient(url, keys / f"{name}.key").withdraw(name)
            while share(name) > 0:
                used += 1
            seconds.append(time.perf_counter() - start)
            served_with.append(used)
    return {"median": statistics.median(seconds), "all": seconds, "requests_served_with_it": served_with,
            "poll_seconds": options.active_set_poll}


def log_verification(path: Path, events: int = 100_000) -> dict:
    engine = open_engine(f"sqlite:///{path}")
    migrate(engine)
    rows, prev = [], GENESIS
    for seq in range(1, events + 1):
        time_, payload = now_iso(), json.dumps({"index": seq})
        digest = row_hash(seq, time_, "bench", "owner1", payload, prev)
        rows.append({"seq": seq, "time": time_, "kind": "bench", "actor": "owner1", "payload": payload,
                     "prev_hash": prev, "hash": digest})
        prev = digest

    def write(session) -> None:
        session.execute(insert(AuditEvent), rows)
        put_setting(session, HEAD_KEY, f"{events}:{prev}")

    in_transaction(engine, write)
    elapsed, check = timed(lambda: verify_log(engine))
    assert check.ok and check.rows == events, check.problems
    return {"events": events, "verify_seconds": elapsed}


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--db", help="database URL (default: a fresh SQLite file in the scratch directory)")
    parser.add_argument("--store", help="package store (default: a directory in the scratch directory)")
    parser.add_argument("--store-endpoint", help="the S3-compatible service's URL for an s3:// --store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch:
        root = Path(scratch)
        anchor, expert = tiny_anchor_and_expert(root)
        keys = root / "keys"
        for name in ("coordinator", *OWNERS):
            generate_key_pair(name, keys)
        (root / "trusted").mkdir()
        (root / "trusted" / "coordinator.pub").write_bytes((keys / "coordinator.pub").read_bytes())
        packages = owner_packages(expert, root / "packages", keys, OWNERS)
        url = args.db or f"sqlite:///{root / 'consortium.db'}"
        engine = open_engine(url)
        migrate(engine)
        in_transaction(engine, lambda s: initialise(s, anchor, args.store or root / "store", keys / "coordinator.key",
                                                    work_dir=root / "work", store_endpoint=args.store_endpoint))
        for name in OWNERS:
            in_transaction(engine, lambda s, n=name: add_member(s, n, keys / f"{n}.pub"))
        with ServerThread(engine) as server:
            answer_seconds, submit_seconds = submissions(server.url, keys, packages)
            concurrent = concurrent_submissions(server.url, keys, packages)
            withdraw_seconds = withdrawals(server.url, keys, TrustedKeys(root / "trusted"))
            served = served_withdrawals(engine, server.url, keys, root, [OWNERS[0], *OWNERS[6:]])
        check = verify_log(engine)
        log = log_verification(root / "log.db")
    results = {
        "command": command_line(), "machine": platform.platform(),
        "database": "sqlite" if not args.db else engine.url.get_backend_name(),
        "store": "s3" if (args.store or "").startswith("s3://") else "local",
        "admission_workers": 1,
        "submission_to_pending_answer_seconds": {"median": statistics.median(answer_seconds), "all": answer_seconds},
        "submission_to_admission_seconds": {"median": statistics.median(submit_seconds), "all": submit_seconds},
        "concurrent_submissions": {**concurrent, "log_intact": check.ok},
        "withdrawal_to_verified_active_set_seconds": {"median": statistics.median(withdraw_seconds),
                                                      "all": withdraw_seconds},
        "withdrawal_to_first_request_served_without_it_seconds": served,
        "log_verification": log,
    }
    name = "service" + ("" if results["database"] == "sqlite" else f"-{results['database']}") + (
        "-s3" if results["store"] == "s3" else "")
    print(json.dumps(results, indent=1))
    write_results(results_file(f"{name}.json"), results)


if __name__ == "__main__":
    main()
