"""What `bench_service.py` builds before it measures: a tiny anchor and expert from synthetic text, the
expert renamed and signed for each owner, and the service on a free port in a thread."""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

from safetensors.torch import load_file, save_file
from typing_extensions import Self

from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain
from flexolmo.core.fileio import sha256_file
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.package import MANIFEST_FILE, TENSOR_FILE, tensors_checksum
from flexolmo.service.app import create_app
from flexolmo.training.loop import OptimConfig
from flexolmo.trust.signing import sign_directory

WORDS = ["the", "of", "and", "a", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "it", "from",
         "at", "are", "an", "this", "be", "which", "or", "river", "city"]


def _corpus(path: Path, words: list[str], seed: int, count: int = 200) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                            for _ in range(count)))
    return path


def tiny_anchor_and_expert(root: Path) -> tuple[Path, Path]:
    public = _corpus(root / "public.jsonl", WORDS, 1)
    code_words = ["def", "return", "self", "import", "class", "if", "else", "for", "range", "print"]
    private = _corpus(root / "code.jsonl", code_words + WORDS[:8], 2)
    optim = {"batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 3, "checkpoint_every": 10, "seed": 0}
    pretrain(PretrainConfig(data=[public], out=root / "anchor", optim=OptimConfig(steps=40, **optim),
                            shape=AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                              intermediate_size=64, max_position_embeddings=128)))
    train_expert(ExpertConfig(anchor=root / "anchor", data=[private], name="code", out=root / "expert",
                              public_data=[public], public_share=0.5, eval_max_sequences=8,
                              optim=OptimConfig(steps=10, **{**optim, "lr": 5e-3})))
    return root / "anchor", root / "expert"


def owner_packages(expert: Path, root: Path, keys: Path, owners: list[str]) -> dict[str, Path]:
    """The expert renamed to each owner, checksums recomputed, signed with that owner's key."""
    packages = {}
    for name in owners:
        target = shutil.copytree(expert, root / name)
        tensors = load_file(target / TENSOR_FILE)
        save_file(tensors, target / TENSOR_FILE, metadata={"format": "flexolmo-expert", "name": name})
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        manifest.update(name=name, tensors_sha256=tensors_checksum(tensors),
                        file_sha256=sha256_file(target / TENSOR_FILE))
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
        sign_directory(target, keys / f"{name}.key")
        packages[name] = target
    return packages


class ServerThread:
    """uvicorn serving the app on a free port of 127.0.0.1 for the duration of a `with` block."""

    def __init__(self, engine):
        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
