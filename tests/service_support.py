"""Shared by the service tests: a real PostgreSQL server started from its binaries, fresh databases on it or
in SQLite files, signed tiny packages (honest and hostile), and the service on a real HTTP port."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import tiny_optim
from safetensors.torch import load_file, save_file

PG_BIN_DIRS = ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_binary(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        if Path(directory, name).is_file():
            return str(Path(directory, name))
    return shutil.which(name)


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` (or `nobody`) user then."""
    if os.geteuid() != 0:
        return []
    has_postgres = subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode == 0
    user = "postgres" if has_postgres else "nobody"
    return ["runuser", "-u", user, "--"]


def missing_service(reason: str) -> None:
    """Skip a test whose service is not installed, except in CI (`.ci/run` sets FLEXOLMO_REQUIRE_SERVICES), where
    a missing service is a failure: a green CI must not hide a test that did not run."""
    if os.environ.get("FLEXOLMO_REQUIRE_SERVICES"):
        pytest.fail(reason)
    pytest.skip(reason)


class PostgresInstance:
    """A PostgreSQL server of its own, in a temporary directory on a free port of 127.0.0.1, that a test can
    stop and start again (a lost database)."""

    def __init__(self):
        self.initdb, self.pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            missing_service("PostgreSQL binaries (initdb, pg_ctl) are not installed; install postgresql from Debian")
        self.root = Path(tempfile.mkdtemp(prefix="flexolmo-pg-"))
        self.prefix = _as_postgres_user()
        if self.prefix:
            shutil.chown(self.root, self.prefix[2])
        self.data, self.port = self.root / "data", free_port()
        subprocess.run([*self.prefix, self.initdb, "-D", str(self.data), "-U", "flexolmo", "--auth=trust", "-E",
                        "UTF8"], check=True, capture_output=True)
        self.url = f"postgresql+psycopg://flexolmo@127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                        f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run([*self.prefix, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """The tests' PostgreSQL server; yields its base URL."""
    instance = PostgresInstance()
    instance.start()
    try:
        yield instance.url
    finally:
        instance.remove()


def new_postgres_database(server: str) -> str:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres",
                         autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def database_url(kind: str, request, tmp_path: Path) -> str:
    """A fresh, empty database of `kind` (sqlite or postgresql)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'consortium.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, as a process of its own (never the internet), with
    dummy credentials in the environment for boto3; yields its endpoint URL."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        missing_service("moto's server is not installed: pip install 'moto[server]'")
    import boto3

    port = free_port()
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client, deadline = boto3.client("s3", endpoint_url=endpoint), time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto's S3 server did not start within 60 s") from None
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_keys(directory: Path, names: list[str]) -> Path:
    from flexolmo.trust.signing import generate_key_pair

    for name in names:
        generate_key_pair(name, directory)
    return directory


def train_signed(anchor: Path, corpora: dict, keys: Path, root: Path, domain: str) -> Path:
    from flexolmo.owner.expert import ExpertConfig, train_expert

    out = root / domain
    train_expert(ExpertConfig(anchor=anchor, data=[corpora[domain]], name=domain, out=out,
                              public_data=[corpora["public"]], public_share=0.5, eval_max_sequences=8,
                              optim=tiny_optim(steps=10, lr=5e-3)),
                 sign_key=keys / f"{domain}.key")
    return out


def hostile_copy(source: Path, target: Path, name: str, key: Path, scale: float = 20.0) -> Path:
    """What a router hijacker submits: an honest package renamed as its own, router rows scaled, checksums
    recomputed with flexolmo's functions and signed with its own key, so only admission can refuse it."""
    from flexolmo.core.fileio import sha256_file
    from flexolmo.owner.package import MANIFEST_FILE, TENSOR_FILE, tensors_checksum
    from flexolmo.trust.signing import sign_directory

    shutil.copytree(source, target)
    tensors = load_file(target / TENSOR_FILE)
    tensors = {k: v * scale if k.endswith("router.weight") else v for k, v in tensors.items()}
    save_file(tensors, target / TENSOR_FILE, metadata={"format": "flexolmo-expert", "name": name})
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest.update(name=name, tensors_sha256=tensors_checksum(tensors), file_sha256=sha256_file(target / TENSOR_FILE))
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    sign_directory(target, key)
    return target


def submit_now(engine, member, package: Path, declaration: dict | None = None) -> dict:
    """Submit `package` as `member` and run admission in this thread (what the service's worker does)."""
    import hashlib

    from sqlalchemy.orm import Session

    from flexolmo.service.store import pack_directory
    from flexolmo.service.submissions import receive, submission
    from flexolmo.service.worker import run_pending

    body = pack_directory(package)
    answer = receive(engine, member, body, hashlib.sha256(body).hexdigest(), declaration)
    assert answer["status"] == "pending", answer
    run_pending(engine)
    with Session(engine) as session:
        return submission(session, answer["submission"])


# Run `flexolmo ARGV...` in a process of its own, with `target` ("module:attribute" or "module:Class.method") wrapped so
# that after the original returns the process says so in the file FLEXOLMO_TEST_SIGNAL and then hangs: a point at which
# a test kills it (kill -9) deterministically, instead of racing a timer against the work.
_HANG_AFTER = """
import functools, importlib, os, sys, time
module, _, path = sys.argv[1].partition(":")
owner = importlib.import_module(module)
*parents, attribute = path.split(".")
for name in parents:
    owner = getattr(owner, name)
original = getattr(owner, attribute)
@functools.wraps(original)
def hang(*args, **kwargs):
    original(*args, **kwargs)
    open(os.environ["FLEXOLMO_TEST_SIGNAL"], "w").write(str(os.getpid()))
    while True:
        time.sleep(60)
setattr(owner, attribute, hang)
from flexolmo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start_hanging(target: str, argv: list[str], signal_file: Path, timeout: float = 180.0) -> subprocess.Popen:
    """`flexolmo ARGV` in a new process that hangs right after `target` returned; returns once it hangs."""
    import flexolmo

    env = {**os.environ, "FLEXOLMO_TEST_SIGNAL": str(signal_file),
           "PYTHONPATH": os.pathsep.join([str(Path(flexolmo.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-c", _HANG_AFTER, target, *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not signal_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"flexolmo {' '.join(argv)} exited ({process.returncode}) before it reached "
                               f"{target}: {process.stdout.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"flexolmo {' '.join(argv)} did not reach {target} within {timeout:.0f} s")
        time.sleep(0.05)
    return process


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()


class RunningService:
    """The FastAPI app served by uvicorn on a free port in a thread, stopped on `close`."""

    def __init__(self, engine, workers: int = 1):
        import uvicorn

        from flexolmo.service.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, workers), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start within 30 s")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def service_keys(tmp_path_factory) -> Path:
    return make_keys(tmp_path_factory.mktemp("service-keys"), ["coordinator", "code", "math", "hostile"])


@pytest.fixture(scope="session")
def service_packages(tmp_path_factory, tiny_anchor, corpora, service_keys) -> dict[str, Path]:
    """Two honest signed experts and a hostile one (router rows x20, signed by its own member)."""
    root = tmp_path_factory.mktemp("service-packages")
    packages = {domain: train_signed(tiny_anchor, corpora, service_keys, root, domain) for domain in ("code", "math")}
    packages["hostile"] = hostile_copy(packages["math"], root / "hostile", "hostile", service_keys / "hostile.key")
    return packages
