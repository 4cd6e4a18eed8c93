"""Task accuracy per variant: lm-evaluation-harness tasks, scored the same way through every runtime.

``hubquant eval --tasks arc_easy,hellaswag`` (or the recipe's ``eval.tasks``) runs each task
against the PyTorch reference and every variant through :class:`hubquant.lm_adapter.RunnerLM`, an
lm-eval model over hubquant's runners: the same tokenizer, the same requests, one child process per
runtime (:mod:`hubquant.task_worker`). A task is an lm-eval task or group name, or the path of a
task YAML file or a folder of them (as lm-eval's ``--include_path`` takes them).

Per variant and metric: lm-eval's value ± standard error, the reference's, and the **recovery**
``variant / reference`` with a paired standard error over the same examples
(:func:`hubquant.stats.ratio_of_means`); a group's recovery pools its tasks' examples. Metrics for
which lm-eval gives no standard error (perplexity-like ones) are kept in ``eval.json`` but not
shown. The reference's scores are cached per (source, task settings, task files, lm-eval version).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import EvaluationError, HubquantError, MissingDependencyError, RecipeError
from hubquant.records import Evaluation, TaskResults, TaskScore

if TYPE_CHECKING:
    from hubquant.source import SourceModel

#: Bump when what a task result holds changes: cached reference scores are recomputed.
TASKS_VERSION = 1
#: lm-eval's own default for models that do not say (``HFLM._DEFAULT_MAX_LENGTH``).
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class TaskSettings:
    """Which tasks, on how many examples, with how many few-shot examples, in how many tokens."""

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    max_length: int = DEFAULT_MAX_LENGTH

    @classmethod
    def parse(cls, tasks: str | Sequence[str], **kwargs: Any) -> TaskSettings | None:
        """From ``a,b`` or a list (None when empty)."""
        names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        return cls(tuple(names), **kwargs) if names else None

    def record(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "limit": self.limit,
            "num_fewshot": self.num_fewshot,
            "max_length": self.max_length,
        }


@dataclass(frozen=True)
class TaskPlan:
    """The tasks as lm-eval will run them."""

    settings: TaskSettings
    names: tuple[str, ...]
    include: tuple[str, ...]
    #: lm-eval's own task index is needed (indexing it takes seconds; local-only tasks skip it).
    defaults: bool
    #: sha256 over the files of the include paths: a changed local task is scored again.
    digest: str
    lm_eval_version: str

    def job(self, source: SourceModel, max_length: int, **runner: Any) -> dict[str, Any]:
        return {
            "kind": "tasks",
            "source": str(source.path),
            "tasks": list(self.names),
            "include": list(self.include),
            "defaults": self.defaults,
            "limit": self.settings.limit,
            "num_fewshot": self.settings.num_fewshot,
            "max_length": max_length,
            **runner,
        }


def check_installed() -> str:
    """lm-eval's version; refuses when it is missing."""
    import importlib.metadata

    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"task scoring needs lm-evaluation-harness ({exc.name or 'lm_eval'} is not installed)",
            extra="tasks",
            hint='install it with: pip install "hubquant[tasks]"',
        ) from None
    return importlib.metadata.version("lm_eval")


def _digest(manager: Any, folders: Sequence[str]) -> str:
    """sha256 over the task YAML files inside the include folders and the local data files they name —
    not every file under a folder, which may be a project root holding models."""
    roots = [Path(folder) for folder in folders]
    files: set[Path] = set()
    for entry in manager.task_index.values():
        yaml_path = _field(entry, "yaml_path")
        if not yaml_path or yaml_path == -1 or not any(Path(yaml_path).is_relative_to(r) for r in roots):
            continue
        files.add(Path(yaml_path))
        data = ((_field(entry, "cfg") or {}).get("dataset_kwargs") or {}).get("data_files") or {}
        for value in data.values() if isinstance(data, dict) else [data]:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and Path(item).is_file():
                    files.add(Path(item))
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def resolve_tasks(settings: TaskSettings) -> TaskPlan:
    """Task names and include paths lm-eval will be given; refuses an unknown task before any work.

    Raises:
        MissingDependencyError: lm-eval is not installed.
        RecipeError: a task is neither a known lm-eval task nor a task file or folder.
    """
    version = check_installed()
    from lm_eval.tasks import TaskManager

    include, names, wanted = [], [], []
    for spec in settings.tasks:
        path = Path(spec).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            include.append(str(path.resolve().parent))
            wanted.append(("file", str(path.resolve())))
        elif path.is_dir():
            include.append(str(path.resolve()))
            wanted.append(("folder", str(path.resolve())))
        else:
            wanted.append(("name", spec))
    include = list(dict.fromkeys(include))
    defaults = any(kind == "name" for kind, _ in wanted)
    manager = TaskManager(include_path=include or None, include_defaults=defaults)
    for kind, value in wanted:
        if kind == "name":
            if value not in manager.all_tasks:
                raise RecipeError(f"unknown lm-eval task {value!r}{_close(value, manager.all_tasks)}", hint=_HINT)
            names.append(value)
            continue
        found = [
            name
            for name, entry in manager.task_index.items()
            if _kind(entry) in ("TASK", "GROUP", "PY_TASK", "task", "group", "python_task")
            and _within(_field(entry, "yaml_path"), value, folder=kind == "folder")
        ]
        if not found:
            raise RecipeError(f"{value} defines no lm-eval task (no YAML with a `task:` or `group:` key)", hint=_HINT)
        names += sorted(found)
    return TaskPlan(settings, tuple(dict.fromkeys(names)), tuple(include), defaults, _digest(manager, include), version)


_HINT = "name an lm-eval task (lm-eval ls tasks), or the path of a task YAML file or folder"


def _field(entry: Any, name: str) -> Any:
    """A task index entry's field (a dataclass in lm-eval 0.4.10+, a dict before)."""
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def _kind(entry: Any) -> str:
    kind = _field(entry, "type") if isinstance(entry, dict) else _field(entry, "kind")
    return str(getattr(kind, "name", kind))


def _within(yaml_path: Any, target: str, *, folder: bool) -> bool:
    if not yaml_path or yaml_path == -1:
        return False
    resolved = str(Path(yaml_path).resolve())
    return resolved.startswith(target.rstrip(os.sep) + os.sep) if folder else resolved == target


def _close(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def max_length(settings: TaskSettings, source: SourceModel) -> int:
    """The tokens a request may use: the settings' limit, at most the model's positions."""
    positions = source.config.get("max_position_embeddings") or settings.max_length
    return min(settings.max_length, int(positions))


def write_choice_task(
    folder: Path, name: str, examples: Sequence[dict[str, Any]], *, metrics: Sequence[str] = ("acc",), **extra: Any
) -> Path:
    """An lm-eval multiple-choice task over local examples — ``{"question", "choices", "answer"}``
    (the index of the right choice) — for offline use: writes ``folder/NAME.jsonl`` and
    ``folder/NAME.yaml`` and returns the YAML, which ``--tasks`` takes. The examples are the task's
    test split and its few-shot source; ``extra`` adds task keys (``num_fewshot=2``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(dict(example)) + "\n" for example in examples), encoding="utf-8")
    lines = [
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{train: {json.dumps(str(data))}, test: {json.dumps(str(data))}}}}}",
        "training_split: train",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{question}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{answer}}"',
        "metric_list:",
        *(f"  - {{metric: {metric}, aggregation: mean, higher_is_better: true}}" for metric in metrics),
        *(f"{key}: {json.dumps(value)}" for key, value in extra.items()),
    ]
    path = folder / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- scores ----------------------------------------------------------------------------------------
def paired_recovery(ours: dict[str, float], theirs: dict[str, float]) -> tuple[float | None, float | None]:
    """Recovery = mean of ours / mean of theirs over the examples both scored, with its paired standard error."""
    import numpy as np

    from hubquant.stats import ratio_of_means

    docs = sorted(set(ours) & set(theirs))
    values, base = np.array([ours[d] for d in docs]), np.array([theirs[d] for d in docs])
    estimate = ratio_of_means(values, base)
    if estimate is None:
        return None, None
    stderr = estimate.stderr
    if stderr is not None and np.isin(np.concatenate([values, base]), (0.0, 1.0)).all():
        # Right/wrong per example: with no answer changed the paired error is 0, which claims more than
        # n examples can show. It is never smaller than what one changed answer would give.
        stderr = max(stderr, 1.0 / (len(docs) * float(base.mean())))
    return estimate.value, stderr


def task_results(result: dict[str, Any], reference: dict[str, Any] | None, plan: TaskPlan) -> TaskResults:
    """A runner's task scores, each beside the reference's, with its recovery (None for the reference)."""
    scores = []
    for name, task in result["tasks"].items():
        ref_task = (reference or {}).get("tasks", {}).get(name, {})
        theirs = {(m["metric"], m["filter"]): m for m in ref_task.get("metrics", [])}
        for m in task["metrics"]:
            ref = theirs.get((m["metric"], m["filter"]))
            recovery: tuple[float | None, float | None] = (None, None)
            key = f"{m['metric']},{m['filter']}"
            if reference is not None and ref is not None and m["higher_is_better"]:
                recovery = paired_recovery(task["per_doc"].get(key, {}), ref_task.get("per_doc", {}).get(key, {}))
            base = ref if reference is not None else m
            scores.append(
                TaskScore(
                    task=name,
                    **m,
                    reference=base["value"] if base else None,
                    reference_stderr=base["stderr"] if base else None,
                    recovery=recovery[0],
                    recovery_stderr=recovery[1],
                    samples=task["samples"],
                    num_fewshot=task["num_fewshot"],
                    dataset=task.get("dataset"),
                )
            )
    return TaskResults(
        settings=plan.settings.record(),
        lm_eval_version=plan.lm_eval_version,
        scores=scores,
        seconds=result["seconds"],
        examples=result["examples"],
        forward_passes=result["forward_passes"],
    )


def _reference_cache(source: SourceModel, plan: TaskPlan, length: int) -> Path:
    from hubquant.paths import cache_root

    key = {
        "source": source.fingerprint,
        "settings": plan.settings.record(),
        "names": plan.names,
        "max_length": length,
        "files": plan.digest,
        "lm_eval": plan.lm_eval_version,
        "v": TASKS_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "tasks" / f"{digest}.json"


def score_tasks(
    rows: list[Evaluation],
    source: SourceModel,
    plan: TaskPlan,
    *,
    weights: str,
    run: Callable[[dict[str, Any]], dict[str, Any]],
    say: Callable[[str], None],
    finish: Callable[[Evaluation], None],
) -> None:
    """Score the reference (cached) and every measured variant on the plan's tasks, in child processes.

    ``run`` runs one job in a child; ``finish`` is called with each variant row once its tasks are
    scored or failed (a failure becomes the row's error). Rows that already carry task scores
    (reused evaluations with the same settings) are left as they are.
    """
    length = max_length(plan.settings, source)
    cache = _reference_cache(source, plan, length)
    tasks = ", ".join(plan.names)
    if cache.is_file():
        say(f"tasks: reusing the reference's cached scores ({tasks})")
        reference = json.loads(cache.read_text())
    else:
        say(f"tasks: scoring the reference on {tasks} (lm-eval {plan.lm_eval_version}; cached after)")
        try:
            reference = run({**plan.job(source, length, weights=weights), "label": "reference (tasks)"})
        except HubquantError as exc:
            raise EvaluationError(
                f"the reference could not be scored on the tasks: {exc.message}", hint=exc.hint
            ) from None
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(reference))
        os.replace(tmp, cache)
    rows[0].tasks = task_results(reference, None, plan)
    for row in rows[1:]:
        if row.error or row.tasks is not None:
            continue
        say(f"{row.label}: scoring {tasks} in a child process")
        try:
            result = run({**plan.job(source, length, artifact=row.path), "label": f"{row.label} (tasks)"})
            row.tasks = task_results(result, reference, plan)
        except HubquantError as exc:
            say(f"{row.label}: task scoring failed ({exc.message})")
            row.error = f"task scoring failed: {exc.message}"
        finish(row)
