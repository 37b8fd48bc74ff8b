"""One home for every default: the command line is generated from the typed configs, so a command without
flags builds exactly the config the Python API builds without arguments; and one flag means one thing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from flexolmo.cli import (
    audit,
    build_parser,
    coordinator,
    data,
    demo,
    eval_tasks,
    evaluate,
    generate,
    import_anchor,
    init_router,
    select_proxy,
    train_expert,
    trust_flags,
    tune_router,
)
from flexolmo.cli import merge as merge_cli
from flexolmo.cli import pretrain as pretrain_cli
from flexolmo.cli.add import ADD_FIELDS
from flexolmo.cli.common import OPTIM_FIELDS
from flexolmo.cli.config_flags import FLAG_NAMES, config_values, flag_name
from flexolmo.cli.plan import PLAN_FIELDS
from flexolmo.cli.pretrain import pretrain_config
from flexolmo.cli.remove import REMOVE_FIELDS
from flexolmo.cli.train_expert import expert_config
from flexolmo.cli.tune_router import tune_config
from flexolmo.coordinator.admission import AdmissionPolicy
from flexolmo.coordinator.importer import ImportConfig
from flexolmo.coordinator.pretrain import AnchorShape, PretrainConfig
from flexolmo.coordinator.router_tuning import TuneConfig
from flexolmo.data.overlap import OverlapSettings
from flexolmo.evaluation.audit import AuditConfig
from flexolmo.evaluation.scoring import EvalSettings
from flexolmo.evaluation.tasks import TaskSettings
from flexolmo.experiments.demo_config import DemoConfig
from flexolmo.model.merged_format import MergeSettings
from flexolmo.model.router_init import PublicRowSettings
from flexolmo.model.runtime import GenerationSettings
from flexolmo.owner.expert import ExpertConfig
from flexolmo.owner.privacy import DPConfig
from flexolmo.owner.proxy import ProxyConfig
from flexolmo.service.settings import ServiceSettings
from flexolmo.training.distributed import ParallelConfig
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
    assert evaluate.eval_settings(parse(["eval", "--model", "m", "--data", "d.jsonl"])) == EvalSettings()


def optim_default(config) -> OptimConfig:
    """The optimisation config a training stage builds when given none: its flags' defaults."""
    return config.model_fields["optim"].get_default(call_default_factory=True)


# Every flag generated from a config: (command, config, fields, flag prefix, stage defaults or None).
GENERATED = [
    ("train-expert", ExpertConfig, train_expert.EXPERT_FIELDS + train_expert.METHOD_FIELDS, "", None),
    ("train-expert", DPConfig, train_expert.DP_FIELDS, "dp_", None),
    ("train-expert", ParallelConfig, train_expert.PARALLEL_FIELDS, "", None),
    ("train-expert", OptimConfig, OPTIM_FIELDS, "", optim_default(ExpertConfig)),
    ("pretrain", PretrainConfig, pretrain_cli.PRETRAIN_FIELDS, "", None),
    ("pretrain", AnchorShape, pretrain_cli.SHAPE_FIELDS, "", None),
    ("pretrain", OptimConfig, OPTIM_FIELDS, "", optim_default(PretrainConfig)),
    ("tune-router", TuneConfig, tune_router.TUNE_FIELDS, "", None),
    ("tune-router", OptimConfig, OPTIM_FIELDS, "", optim_default(TuneConfig)),
    ("plan", PlanSettings, PLAN_FIELDS, "", None),
    ("eval", EvalSettings, evaluate.EVAL_FIELDS, "", None),
    ("merge", MergeSettings, merge_cli.MERGE_FIELDS, "", None),
    ("merge", AdmissionPolicy, trust_flags.ADMISSION_FIELDS, "", None),
    ("add", MergeSettings, ADD_FIELDS, "", None),
    ("add", AdmissionPolicy, trust_flags.ADMISSION_FIELDS, "", None),
    ("remove", MergeSettings, REMOVE_FIELDS, "", None),
    ("generate", GenerationSettings, generate.GENERATION_FIELDS, "", None),
    ("eval-tasks", TaskSettings, eval_tasks.TASK_FIELDS, "", None),
    ("audit-extraction", AuditConfig, audit.AUDIT_FIELDS, "", None),
    ("select-proxy", ProxyConfig, select_proxy.PROXY_FIELDS, "", None),
    ("import-anchor", ImportConfig, import_anchor.IMPORT_FIELDS, "", None),
    ("init-router", PublicRowSettings, init_router.PUBLIC_ROW_FIELDS, "", None),
    ("data overlap", OverlapSettings, data.OVERLAP_FIELDS, "", None),
    ("demo", DemoConfig, demo.DEMO_FIELDS, "", None),
    *[(f"coordinator {action}", ServiceSettings, ["db", *fields], "", None) for action, fields in [
        ("init", coordinator.INIT_FIELDS), ("add-member", []), ("revoke-member", []),
        ("serve", coordinator.SERVE_FIELDS), ("worker", coordinator.WORKER_FIELDS),
        ("publish", coordinator.PUBLISH_FIELDS), ("policy", coordinator.POLICY_FIELDS), ("log", [])]],
]


def command_parsers() -> dict:
    """Every command's parser by its full name, sub-commands included (`data overlap`, `coordinator init`)."""
    found = {}

    def walk(name: str, parser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    for name, parser in build_parser().commands.items():
        walk(name, parser)
    return found


@pytest.mark.parametrize("command, config, fields, prefix, defaults", GENERATED,
                         ids=[f"{row[0]}-{row[1].__name__}" for row in GENERATED])
def test_generated_flags_say_what_their_field_says(command, config, fields, prefix, defaults):
    actions = {action.dest: action for action in command_parsers()[command]._actions}
    for field in fields:
        action, info = actions[prefix + field], config.model_fields[field]
        assert action.option_strings[0] == flag_name(field, prefix)
        assert action.help.replace("%%", "%") == info.description, f"{command} {action.option_strings[0]}"
        if action.required:
            continue
        if defaults is not None:
            expected = getattr(defaults, field)
        else:  # a field the config requires but the command does not (--dp-epsilon) is off by default
            expected = None if info.is_required() else info.get_default(call_default_factory=True)
        assert action.default == expected, f"{command} {action.option_strings[0]}"


@pytest.mark.parametrize("argv, build, expected", [
    (["merge", "--anchor", "a", "--packages", "p", "--top-k", "2", "--out", "o"],
     lambda args: merge_cli.merge_settings(args, merge_cli.MERGE_FIELDS), MergeSettings(top_k=2)),
    (["merge", "--anchor", "a", "--packages", "p", "--top-k", "2", "--out", "o"], trust_flags.admission_policy,
     AdmissionPolicy()),
    (["add", "--model", "m", "--packages", "p", "--out", "o"],
     lambda args: merge_cli.merge_settings(args, ADD_FIELDS), MergeSettings()),
    (["add", "--model", "m", "--packages", "p", "--out", "o"], trust_flags.admission_policy, AdmissionPolicy()),
    (["remove", "--model", "m", "--exclude", "x", "--out", "o"],
     lambda args: merge_cli.merge_settings(args, REMOVE_FIELDS), MergeSettings()),
    (["generate", "--model", "m", "--prompt", "p"], generate.generation_settings, GenerationSettings()),
    (["eval-tasks", "--model", "m", "--tasks", "t"], eval_tasks.task_settings, TaskSettings()),
    (["audit-extraction", "--model", "m", "--data", "d.jsonl"], audit.audit_config,
     AuditConfig(model=Path("m"), data=[Path("d.jsonl")])),
    (["select-proxy", "--data", "d.jsonl", "--public-data", "p.jsonl", "--name", "n", "--out", "o.json"],
     select_proxy.proxy_config,
     ProxyConfig(data=[Path("d.jsonl")], public=[Path("p.jsonl")], name="n", out=Path("o.json"))),
    (["import-anchor", "--source", "s", "--public-data", "p.jsonl", "--out", "o"], import_anchor.import_config,
     ImportConfig(source=Path("s"), public_data=[Path("p.jsonl")], out=Path("o"))),
    (["init-router", "--anchor", "a", "--public-data", "p.jsonl"], init_router.public_row_settings,
     PublicRowSettings()),
    (["data", "overlap", "--train", "t.jsonl", "--heldout", "h.jsonl"], data.overlap_settings, OverlapSettings()),
    (["demo"], demo.demo_config, DemoConfig()),
    (["coordinator", "serve"], lambda args: coordinator.service_settings(args, coordinator.SERVE_FIELDS),
     ServiceSettings()),
    (["coordinator", "publish"], lambda args: coordinator.service_settings(args, coordinator.PUBLISH_FIELDS),
     ServiceSettings()),
], ids=lambda value: value[0] if isinstance(value, list) else "")
def test_a_command_without_optional_flags_builds_the_api_default(argv, build, expected):
    assert build(parse(argv)) == expected


def test_a_quick_demo_without_flags_is_the_api_quick_run():
    assert demo.demo_config(parse(["demo", "--quick"])) == DemoConfig.quick_run()


def test_one_flag_means_one_thing_on_every_command():
    meanings: dict[str, set[str]] = {}
    commands = command_parsers()
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
