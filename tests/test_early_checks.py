"""Wrong settings are refused before any model is loaded or data read, and training commands score a capped
number of held-out sequences."""

from __future__ import annotations

import pytest
from conftest import tiny_optim

from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig, pretrain
from flexolmo.core.errors import CheckpointError, DataError, FlexOlmoError
from flexolmo.owner.expert import ExpertConfig, train_expert
from flexolmo.owner.privacy import DPConfig
from flexolmo.training.run_state import CHECKPOINT_DIRNAME, STATE_FILE

SHAPE = AnchorShape(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                    max_position_embeddings=128)


def expert_config(tmp_path, **overrides) -> ExpertConfig:
    # The anchor does not exist: a check that ran after loading it would raise an AnchorError instead.
    settings = dict(anchor=tmp_path / "no-anchor", data=[tmp_path / "no-data.jsonl"], name="code",
                    out=tmp_path / "code.expert", optim=tiny_optim())
    settings.update(overrides)
    return ExpertConfig(**settings)


def test_train_expert_refuses_flag_errors_before_loading_the_anchor(tmp_path):
    (tmp_path / "code.expert.ckpt" / CHECKPOINT_DIRNAME).mkdir(parents=True)
    (tmp_path / "code.expert.ckpt" / CHECKPOINT_DIRNAME / STATE_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="pass --resume to continue it"):
        train_expert(expert_config(tmp_path))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_expert(expert_config(tmp_path, out=tmp_path / "other.expert"), resume=True)
    with pytest.raises(FlexOlmoError, match="--grad-accum 1"):
        train_expert(expert_config(tmp_path, dp=DPConfig(epsilon=8), optim=tiny_optim(grad_accum=2)))
    with pytest.raises(DataError, match="--public-share needs --public-data"):
        train_expert(expert_config(tmp_path, public_share=0.5))
    with pytest.raises(DataError, match="leaves no owner or no public sequence"):
        train_expert(expert_config(tmp_path, public_share=0.1, public_data=[tmp_path / "p.jsonl"]))


def test_pretrain_refuses_a_rerun_over_a_checkpoint_before_training_a_tokenizer(tmp_path, corpora):
    work = tmp_path / "anchor.ckpt"
    (work / CHECKPOINT_DIRNAME).mkdir(parents=True)
    (work / CHECKPOINT_DIRNAME / STATE_FILE).write_text("{}")
    config = PretrainConfig(data=[corpora["public"]], out=tmp_path / "anchor", shape=SHAPE, optim=tiny_optim())
    with pytest.raises(CheckpointError, match="pass --resume"):
        pretrain(config)
    assert sorted(path.name for path in work.iterdir()) == [CHECKPOINT_DIRNAME]  # no tokenizer was trained
    with pytest.raises(CheckpointError, match="nothing to resume"):
        pretrain(config.model_copy(update={"out": tmp_path / "fresh"}), resume=True)


def test_pretrain_scores_at_most_eval_max_sequences(tmp_path, corpora):
    summary = pretrain(PretrainConfig(data=[corpora["public"]], out=tmp_path / "anchor", shape=SHAPE,
                                      eval_max_sequences=3, optim=tiny_optim(steps=2)))
    assert summary["heldout"]["tokens"] == 3 * 32
