"""The child's side of task scoring: one runner, lm-eval's ``simple_evaluate``, the scores as JSON.

Run by :mod:`hubquant.eval_worker` for a ``{"kind": "tasks"}`` job, so a variant's memory and its
lm-eval imports stay in the child like every other measurement. The job names the runner (the
reference in PyTorch, or an artifact), the source (whose tokenizer every runtime shares), the
resolved task names with their include paths, and limit / few-shot / max length.

The result keeps, per reported task (a requested task, or a requested group's aggregate): every
metric lm-eval gives with its standard error, and per example the metric values — the parent pairs
them with the reference's for the recovery's standard error. Per-request loglikelihoods and
generations are kept too (what the tests compare between runtimes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

PerDoc = dict[str, dict[str, float]]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    subtasks = group_subtasks.get(name)
    if not subtasks:
        return [name]
    return [leaf for sub in subtasks for leaf in _leaves(sub, group_subtasks)]


def _per_doc(samples: dict[str, list[dict[str, Any]]], leaves: list[str]) -> PerDoc:
    """``"metric,filter"`` → ``"task/doc_id"`` → value, for metrics that are numbers per example."""
    values: PerDoc = {}
    for leaf in leaves:
        for sample in samples.get(leaf, []):
            for metric in sample.get("metrics", []):
                number = _number(sample.get(metric)) if not isinstance(sample.get(metric), list | tuple) else None
                if number is not None:
                    values.setdefault(f"{metric},{sample['filter']}", {})[f"{leaf}/{sample['doc_id']}"] = number
    return values


def _responses(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per example: the loglikelihood of each choice, the rolling loglikelihood, or the generation."""
    out: dict[str, Any] = {}
    for sample in samples:
        if sample.get("filter") not in (None, "none") and str(sample["doc_id"]) in out:
            continue
        response = sample.get("filtered_resps")
        if isinstance(response, list) and response and isinstance(response[0], list | tuple):
            response = [float(r[0]) for r in response]
        elif isinstance(response, list) and response and isinstance(response[0], int | float):
            response = [float(r) for r in response]
        out[str(sample["doc_id"])] = response
    return out


def _metrics(results: dict[str, Any], higher: dict[str, bool]) -> list[dict[str, Any]]:
    metrics = []
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or _number(value) is None:
            continue
        metrics.append(
            {
                "metric": metric,
                "filter": filter_name,
                "value": _number(value),
                "stderr": _number(results.get(f"{metric}_stderr,{filter_name}")),
                "higher_is_better": higher.get(metric),
            }
        )
    return metrics


def _dataset(config: dict[str, Any]) -> str | None:
    """The Hub dataset a task reads (None for local files and groups)."""
    path = config.get("dataset_path")
    local = (None, "json", "csv", "parquet", "text", "arrow")
    return None if path in local or Path(str(path)).exists() else str(path)


def report(out: dict[str, Any], requested: list[str]) -> dict[str, Any]:
    """The part of lm-eval's output hubquant keeps (see the module's docstring)."""
    groups = out.get("group_subtasks", {})
    samples = out.get("samples", {})
    shown = [name for name in requested if name in out["results"]]
    shown += [leaf for name in requested if name not in out["results"] for leaf in _leaves(name, groups)]
    tasks = {}
    for name in dict.fromkeys(shown):
        leaves = _leaves(name, groups)
        higher: dict[str, bool] = {}
        for leaf in leaves:
            higher.update(out.get("higher_is_better", {}).get(leaf, {}))
        tasks[name] = {
            "samples": sum(int(out.get("n-samples", {}).get(leaf, {}).get("effective", 0)) for leaf in leaves),
            "num_fewshot": out.get("n-shot", {}).get(name, out.get("n-shot", {}).get(leaves[0])),
            "dataset": _dataset(out.get("configs", {}).get(name, {})),
            "metrics": _metrics(out["results"][name], higher),
            "per_doc": _per_doc(samples, leaves),
            "responses": {leaf: _responses(samples.get(leaf, [])) for leaf in leaves},
        }
    return tasks


def run_tasks_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load the runner, score the tasks through :class:`hubquant.lm_adapter.RunnerLM`, return the report."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from hubquant.lm_adapter import RunnerLM
    from hubquant.source import resolve_source

    source = resolve_source(job["source"])
    started = time.perf_counter()
    if job.get("artifact"):
        from hubquant.artifact import load_artifact
        from hubquant.exporters import get_exporter

        artifact = load_artifact(job["artifact"])
        runner = get_exporter(artifact.format)().runner(artifact, context_length=int(job["max_length"]))
    else:
        from hubquant.torch_runner import TorchRunner

        runner = TorchRunner(source, weights=job.get("weights", "fp32"))
    load = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = RunnerLM(
        runner, tokenizer, vocab_size=int(source.config.get("vocab_size") or 0) or None, max_length=job["max_length"]
    )
    manager = TaskManager(include_path=job["include"] or None, include_defaults=job["defaults"])
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=list(job["tasks"]),
        num_fewshot=job.get("num_fewshot"),
        limit=job.get("limit"),
        task_manager=manager,
        log_samples=True,
    )
    seconds = time.perf_counter() - started
    runner.close()
    tasks = report(out, list(job["tasks"]))
    return {
        "tasks": tasks,
        "seconds": seconds,
        "load_seconds": load,
        "examples": sum(int(v.get("effective", 0)) for v in out.get("n-samples", {}).values()),
        "forward_passes": model.forward_passes,
        "forward_tokens": model.forward_tokens,
    }
