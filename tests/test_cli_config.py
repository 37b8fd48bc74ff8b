"""One home for every default: the command line is generated from the typed configs, so a command without
flags builds exactly the config the Python API builds without arguments; and one flag means one thing."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexolmo.cli import build_parser
from flexolmo.cli.config_flags import FLAG_NAMES, config_values
from flexolmo.cli.plan import PLAN_FIELDS
from flexolmo.cli.pretrain import pretrain_config
from flexolmo.cli.train_expert import expert_config
from flexolmo.cli.tune_router import tune_config
from flexolmo.coordinator.pretrain import PretrainConfig
from flexolmo.coordinator.router_tuning import TuneConfig
from flexolmo.owner.expert import ExpertConfig
from flexolmo.training.loop import OptimConfig, learning_rate
from flexolmo.training.memory_plan import PlanSettings


def parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_train_expert_without_flags_is_the_api_default():
    args = parse(["train-expert", "--anchor", "a", "--data", "d.jsonl", "--name", "n", "--out", "o"])
    assert expert_config(args) == ExpertConfig(anchor=Path("a"), data=[Path("d.jsonl")], name="n", out=Path("o"))


def test_pretrain_without_flags_is_the_api_default():
    args = parse(["pretrain", "--data", "d.jsonl", "--out", "o"])
    assert pretrain_config(args) == PretrainConfig(data=[Path("d.jsonl")], out=Path("o"))


def test_tune_router_without_flags_is_the_api_default():
    args = parse(["tune-router", "--model", "m", "--public-data", "p.jsonl", "--proxies", "x.json", "--out", "o"])
    assert tune_config(args) == TuneConfig(model=Path("m"), public=[Path("p.jsonl")], proxies=[Path("x.json")],
                                           out=Path("o"))


def test_plan_without_flags_plans_train_expert_without_flags():
    settings = PlanSettings(**config_values(parse(["plan", "--anchor", "a"]), PLAN_FIELDS))
    optim = ExpertConfig.model_fields["optim"].get_default(call_default_factory=True)
    assert settings == PlanSettings()
    assert (settings.batch_size, settings.seq_len, settings.dtype) == (optim.batch_size, optim.seq_len, optim.dtype)


@pytest.mark.parametrize("steps, warmup", [(200, 20), (40, 4), (5, 1)])
def test_warmup_defaults_to_a_tenth_of_the_steps_everywhere(steps, warmup):
    cli = parse(["train-expert", "--anchor", "a", "--data", "d", "--name", "n", "--out", "o", "--steps", str(steps)])
    for config in (expert_config(cli).optim, OptimConfig(steps=steps)):
        assert config.warmup == warmup
        assert learning_rate(warmup - 1, config) == pytest.approx(config.lr)  # the peak is reached at the warmup


def test_eval_without_flags_scores_with_the_api_default_settings():
    from flexolmo.cli.evaluate import eval_settings
    from flexolmo.evaluation.scoring import EvalSettings

    assert eval_settings(parse(["eval", "--model", "m", "--data", "d.jsonl"])) == EvalSettings()


def test_one_flag_means_one_thing_on_every_command():
    meanings: dict[str, set[str]] = {}
    commands = build_parser().commands
    for command in commands.values():
        for action in command._actions:
            for flag in action.option_strings:
                # a config field named otherwise than its flag (FLAG_NAMES) keeps the flag's meaning
                dest = FLAG_NAMES.get(action.dest, action.dest).lstrip("-").replace("-", "_")
                meanings.setdefault(flag, set()).add((dest, "switch" if action.nargs == 0 else "value"))
    assert {flag: dests for flag, dests in meanings.items() if len(dests) > 1} == {}
    # The names a new user tripped over: one spelling each.
    assert "--key" not in meanings and "--experts" not in meanings
    for name in ("history", "remove", "tune-router", "eval", "generate", "add"):
        assert not [a for a in commands[name]._actions if not a.option_strings], f"{name} takes a bare path"
