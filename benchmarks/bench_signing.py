"""Signing and verifying the demo's packages and a merged model with OpenSSF model-signing, offline.

    .venv/bin/python benchmarks/bench_signing.py

Keys: a fresh P-256 pair per member (`flexolmo keygen`'s format). For each of the demo's five packages
(`--demo-dir`/experts, as `bench_admission.py` leaves them) and for the merged model of all five (merged here,
no admission), the best of 3 rounds of: signing (hash every file, sign the statement, write `model.sig`),
verifying (check the signature, hash every file again, compare), and, as the baseline measured in the same
process, one plain SHA-256 pass over the same files. Signing costs what hashing costs plus a constant.
Results: a table and `benchmarks/results/signing.json`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from flexolmo.coordinator.merge import merge
from flexolmo.core.fileio import sha256_file
from flexolmo.core.progress import print_table
from flexolmo.experiments.demo_config import CLOSED_DOMAINS
from flexolmo.trust.signing import (
    SIGNATURE_FILE,
    TrustedKeys,
    generate_key_pair,
    sign_directory,
    verify_directory,
)

from common import argument_parser, command_line, results_file, write_results

RESULTS = results_file("signing.json")
ROUNDS = 3


def best(action) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, key: Path, trusted: TrustedKeys) -> dict:
    files = [item for item in path.rglob("*") if item.is_file() and item.name != SIGNATURE_FILE]
    return {
        "bytes": sum(item.stat().st_size for item in files),
        "sha256_seconds": best(lambda: [sha256_file(item) for item in files]),
        "sign_seconds": best(lambda: sign_directory(path, key)),
        "verify_seconds": best(lambda: verify_directory(path, trusted)),
    }


def main() -> None:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/demo"), help="the demo data (anchor and corpora)")
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"),
                        help="a finished demo run whose experts/ packages are signed and merged")
    args = parser.parse_args()
    results = {"command": command_line(), "rounds": ROUNDS, "artefacts": {}}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "trusted").mkdir()
        for name in (*CLOSED_DOMAINS, "coordinator"):
            generate_key_pair(name, scratch / "private")
            shutil.copy(scratch / "private" / f"{name}.pub", scratch / "trusted")
        trusted = TrustedKeys(scratch / "trusted")
        for domain in CLOSED_DOMAINS:
            package = shutil.copytree(args.demo_dir / "experts" / domain, scratch / "packages" / domain)
            results["artefacts"][f"package {domain}"] = measure(package, scratch / "private" / f"{domain}.key",
                                                                trusted)
        merged = scratch / "merged"
        merge(args.data_dir / "anchor", [scratch / "packages" / d for d in CLOSED_DOMAINS], merged, top_k=2)
        results["artefacts"]["merged model (5 experts)"] = measure(merged, scratch / "private" / "coordinator.key",
                                                                   trusted)
    write_results(RESULTS, results)
    print_table("signing and verifying (best of 3; seconds)", ["artefact", "MB", "sha256 pass", "sign", "verify",
                                                                "sign / sha256", "verify / sha256"],
                [[name, f"{r['bytes'] / 1e6:.1f}", r["sha256_seconds"], r["sign_seconds"], r["verify_seconds"],
                  f"{r['sign_seconds'] / r['sha256_seconds']:.2f}", f"{r['verify_seconds'] / r['sha256_seconds']:.2f}"]
                 for name, r in results["artefacts"].items()])


if __name__ == "__main__":
    main()
