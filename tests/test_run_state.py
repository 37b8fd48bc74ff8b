"""Stale state: an interrupted or failed run leaves either a checkpoint to resume or nothing, and `--resume`
continues only the very same run (settings and data)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_optim

from flexolmo.cli import main
from flexolmo.core.errors import CheckpointError


def interrupt_at(monkeypatch, step: int, error: BaseException) -> None:
    """Make the training loop raise `error` when it reaches `step`."""
    import flexolmo.training.loop as training

    schedule = training.learning_rate

    def failing(current: int, config):
        if current == step:
            raise error
        return schedule(current, config)

    monkeypatch.setattr(training, "learning_rate", failing)


def expert_args(tiny_anchor, corpora, out: Path, *changes: str) -> list[str]:
    settings = {"--anchor": str(tiny_anchor), "--data": str(corpora["code"]), "--name": "code", "--out": str(out),
                "--steps": "6", "--batch-size": "4", "--seq-len": "32", "--checkpoint-every": "2",
                "--eval-max-sequences": "4"}
    flags = []
    for flag, value in zip(changes[::2], changes[1::2]):
        settings[flag] = value
    for flag, value in settings.items():
        flags += [flag, value] if value is not None else [flag]
    return ["train-expert", *flags]


def test_interrupted_before_the_first_checkpoint_leaves_nothing_and_says_start_again(tiny_anchor, corpora,
                                                                                      tmp_path, monkeypatch,
                                                                                      capsys):
    out = tmp_path / "code"
    interrupt_at(monkeypatch, 1, KeyboardInterrupt())
    assert main(expert_args(tiny_anchor, corpora, out)) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("flexolmo train-expert: interrupted before the first checkpoint; nothing was kept: rerun the "
                     "command without --resume")
    assert not out.exists() and not (tmp_path / "code.ckpt").exists()
    assert main(expert_args(tiny_anchor, corpora, out, "--resume", None)) == 1
    assert "nothing to resume" in capsys.readouterr().err


def test_a_failed_run_leaves_no_empty_work_directory(tiny_anchor, corpora, tmp_path, monkeypatch, capsys):
    from flexolmo.core.errors import DataError

    interrupt_at(monkeypatch, 0, DataError("a corrupt batch"))
    assert main(expert_args(tiny_anchor, corpora, tmp_path / "code")) == 1
    assert "a corrupt batch" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_resume_refuses_any_other_setting_or_data_and_names_it(tiny_anchor, corpora, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "code", tmp_path / "code.ckpt"
    interrupt_at(monkeypatch, 3, KeyboardInterrupt())
    assert main(expert_args(tiny_anchor, corpora, out)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"flexolmo train-expert: interrupted; {work} keeps the checkpoint of step 2: rerun the same command "
        "with --resume to continue")
    monkeypatch.undo()
    changes = {
        ("--data", str(corpora["math"])): "data (",
        ("--name", "legal"): "settings.name (\"code\" then, \"legal\" now)",
        ("--router-init", "random"): "settings.router_init",
        ("--z-loss", "0.01"): "settings.z_loss_coef (0.001 then, 0.01 now)",
        ("--lr", "0.01"): "optim.lr",
        ("--fsdp", None): "checkpoint_format (\"replicated\" then, \"sharded\" now)",
    }
    for change, named in changes.items():
        assert main(expert_args(tiny_anchor, corpora, out, *change, "--resume", None)) == 1, change
        error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flexolmo")]
        assert len(error) == 1 and "cannot resume, this run differs from the checkpoint's in" in error[0], error
        assert named in error[0] and not out.exists(), (change, error)
    assert main(expert_args(tiny_anchor, corpora, out)) == 1  # a fresh start over a checkpoint
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(expert_args(tiny_anchor, corpora, out, "--resume", None)) == 0
    assert (out / "manifest.json").exists() and not work.exists()


def test_pretrain_never_reuses_a_stale_tokenizer(corpora, tmp_path):
    from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain, train_tokenizer
    from flexolmo.data.documents import iter_texts
    from flexolmo.model.runtime import load_model

    out = tmp_path / "anchor"
    # What a run killed before its first checkpoint leaves: a tokenizer of other settings, no checkpoint.
    stale = train_tokenizer(iter_texts([corpora["code"]]), 300)
    stale.save_pretrained(str(tmp_path / "anchor.ckpt" / "tokenizer"))
    config = PretrainConfig(data=[corpora["public"]], out=out,
                            shape=AnchorShape(vocab_size=400, hidden_size=16, num_layers=1, num_heads=2,
                                              intermediate_size=32, max_position_embeddings=64),
                            optim=tiny_optim(steps=2))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain(config, resume=True)
    pretrain(config)
    shipped = load_model(out).tokenizer  # trained afresh on the public text, up to 400 tokens
    assert len(shipped) > len(stale) and shipped.get_vocab() != stale.get_vocab()
    assert not (tmp_path / "anchor.ckpt").exists()
