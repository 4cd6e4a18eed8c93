"""lm-eval task scores through hubquant's adapter: the same requests through every runtime and the reference.

The tasks are the suite's own (tests/lm_tasks.py: local JSONL, no Hub): multiple choice, rolling
loglikelihood and greedy generation. The reference adapter is held to lm-eval's own ``hf`` model;
every runtime's full-precision form to the reference; and the scores, with their recovery and
standard errors, are followed into the table, eval.json, MLflow and the staged card.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import quantize_json, run_cli
from lm_tasks import QUESTIONS, write_group, write_tasks

pytestmark = pytest.mark.slow

#: Largest relative difference of a per-example loglikelihood from the reference's: float32 runtimes
#: differ in summation order only; 16-bit weights round every weight (measured: ≤ 6e-5 and ≤ 4e-4).
ROUNDING = {"32": 2e-4, "16": 2e-3}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-tasks"))


def _score(source: Path, tasks: Path, work: Path, **runner: str) -> dict:
    """One runner's task job, run as hubquant runs it (a child process)."""
    from hubquant.eval_worker import run_worker
    from hubquant.source import resolve_source
    from hubquant.tasks import TaskSettings, resolve_tasks

    plan = resolve_tasks(TaskSettings((str(tasks),), max_length=256))
    assert plan.names == ("hubquant_gen", "hubquant_mc", "hubquant_mc_fewshot", "hubquant_rolling")
    assert not plan.defaults, "local tasks only: lm-eval's own index is not built"
    work.mkdir(parents=True, exist_ok=True)
    return run_worker({**plan.job(resolve_source(str(source)), 256, **runner), "label": "test"}, work)


def _responses(result: dict, task: str) -> np.ndarray:
    by_doc = result["tasks"][task]["responses"][task]
    return np.array([value for doc in sorted(by_doc, key=int) for value in by_doc[doc]], dtype=np.float64)


@pytest.fixture(scope="module")
def reference(tiny_phi3: Path, tasks: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _score(tiny_phi3, tasks, tmp_path_factory.mktemp("work"), weights="fp32")


def test_reference_adapter_matches_lm_eval_hf_model(tiny_phi3: Path, tasks: Path, reference: dict) -> None:
    """The same task through lm-eval's own ``hf`` model gives the same loglikelihoods and generations."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = HFLM(pretrained=str(tiny_phi3), dtype="float32", device="cpu", batch_size=1, max_length=256)
    names = ["hubquant_mc", "hubquant_mc_fewshot", "hubquant_rolling", "hubquant_gen"]
    theirs = lm_eval.simple_evaluate(
        model=hf, tasks=names, task_manager=TaskManager(include_path=str(tasks), include_defaults=False)
    )
    for task in names[:3]:
        expected = np.array(
            [
                r[0] if isinstance(r, list | tuple) else r
                for s in sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
                for r in (s["filtered_resps"] if isinstance(s["filtered_resps"], list) else [s["filtered_resps"]])
            ],
            dtype=np.float64,
        )
        ours = _responses(reference, task)
        assert ours.shape == expected.shape and len(ours) >= (4 * len(QUESTIONS) if "mc" in task else 4)
        assert np.abs(ours - expected).max() < 1e-4, task
        for metric in ("acc", "acc_norm", "bits_per_byte"):
            if f"{metric},none" in theirs["results"][task]:
                mine = {m["metric"]: m["value"] for m in reference["tasks"][task]["metrics"]}
                assert mine[metric] == pytest.approx(theirs["results"][task][f"{metric},none"], abs=1e-6)
    generated = {str(s["doc_id"]): s["filtered_resps"] for s in theirs["samples"]["hubquant_gen"]}
    assert all(text and text[0] for text in generated.values()), "greedy generation produced text to compare"
    assert reference["tasks"]["hubquant_gen"]["responses"]["hubquant_gen"] == generated
    assert reference["tasks"]["hubquant_mc_fewshot"]["num_fewshot"] == 2


def test_every_runtime_scores_the_tasks_like_the_reference(
    tiny_phi3: Path, tasks: Path, reference: dict, tmp_path: Path
) -> None:
    """Each runtime's unquantized form gives the reference's per-example loglikelihoods within rounding."""
    built = {}
    for fmt, precision in [
        ("gguf", "F32"),
        ("gguf", "F16"),
        ("onnx", "fp32"),
        ("openvino", "fp32"),
        ("mlx", "fp32"),
        ("mlx", "fp16"),
    ]:
        built[(fmt, precision)] = quantize_json(tiny_phi3, tmp_path / "out", fmt, precision)[0]["path"]
    for (fmt, precision), path in built.items():
        result = _score(tiny_phi3, tasks, tmp_path / "work", artifact=path)
        tolerance = ROUNDING["32" if precision.endswith("32") else "16"]
        for task in ("hubquant_mc", "hubquant_mc_fewshot", "hubquant_rolling"):
            ours, theirs = _responses(result, task), _responses(reference, task)
            worst = float(np.abs((ours - theirs) / theirs).max())
            assert worst < tolerance, f"{fmt} {precision} {task}: {worst:.2e}"
        if precision == "fp32" and fmt != "gguf":  # llama.cpp's own kernels differ more than summation order
            assert result["tasks"]["hubquant_gen"]["responses"] == reference["tasks"]["hubquant_gen"]["responses"]
        assert result["forward_passes"] > 0 and result["examples"] == reference["examples"]


def test_tasks_reach_the_table_eval_json_mlflow_and_card(
    tiny_phi3: Path, tasks: Path, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "source": str(tiny_phi3),
                "output": str(tmp_path / "out"),
                "experiment": "hubquant-tests/tasks",
                "variants": [{"format": "gguf", "precision": p} for p in ("Q8_0", "Q2_K")],
                "eval": {
                    "context": 128,
                    "max_windows": 2,
                    "tasks": [str(tasks / "hubquant_mc.yaml")],
                    "task_limit": 10,
                    "task_max_length": 256,
                },
                "hub": {"namespace": "ns"},
            }
        )
    )
    code, out, err = run_cli("publish", str(recipe), "--dry-run", "--stage-dir", str(tmp_path / "stage"))
    assert code in (0, 2), err
    evaluation = json.loads((tmp_path / "out" / "gguf-Q2_K" / "eval.json").read_text())
    scores = {s["metric"]: s for s in evaluation["tasks"]["scores"]}
    assert set(scores) == {"acc", "acc_norm"} and evaluation["tasks"]["settings"]["limit"] == 10
    acc = scores["acc"]
    assert acc["task"] == "hubquant_mc" and acc["samples"] == 10 and acc["stderr"] > 0
    assert acc["reference"] is not None and acc["recovery"] is not None and acc["recovery_stderr"] is not None
    if acc["reference"]:
        assert acc["recovery"] == pytest.approx(acc["value"] / acc["reference"])

    # the table, printed by publish below the comparison
    assert "first 10 examples of each task" in out and "hubquant_mc acc" in out
    q2 = [line for line in out.splitlines() if "gguf Q2_K" in line and line.count("±") == 2]
    assert len(q2) == 2, out  # acc and acc_norm: score ± se, recovery ± se

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("hubquant-tests/tasks")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`hubquant.precision` = 'Q2_K'")
    metrics = runs[0].data.metrics
    assert metrics["task.hubquant_mc.acc"] == pytest.approx(acc["value"])
    assert metrics["task.hubquant_mc.acc_stderr"] == pytest.approx(acc["stderr"])
    assert metrics["task.hubquant_mc.acc_recovery"] == pytest.approx(acc["recovery"])
    assert "task.hubquant_mc.acc_recovery_stderr" in metrics

    card = (tmp_path / "stage" / "ns" / "tiny-phi3-GGUF" / "files" / "README.md").read_text()
    assert "### Task accuracy" in card and "Only the first 10 examples of each task were scored" in card
    assert "| hubquant_mc acc | original |" in card and "| hubquant_mc acc | Q2_K |" in card
    assert "hubquant_mc" not in card.split("---")[1], "limited scores stay out of the model index"


def test_a_group_is_scored_as_lm_eval_aggregates_it(tiny_phi3: Path, tmp_path: Path) -> None:
    """A group's row is lm-eval's size-weighted aggregate; its recovery pools the examples of its tasks."""
    group = write_group(tmp_path / "group")
    [artifact] = quantize_json(tiny_phi3, tmp_path / "out", "gguf", "Q2_K")
    code, table, err = run_cli(
        "eval", artifact["path"], "--context", "128", "--max-windows", "1", "--no-fidelity",
        "--tasks", str(group), "--task-max-length", "256", "--no-track",
    )  # fmt: skip
    assert code == 0, err
    assert "hubquant_group acc" in table and "hubquant_ga" not in table, "the group, not its tasks"
    [score] = json.loads((Path(artifact["path"]) / "eval.json").read_text())["tasks"]["scores"]
    assert score["task"] == "hubquant_group" and score["samples"] == len(QUESTIONS)
    assert score["stderr"] is not None and score["recovery_stderr"] is not None
    if score["reference"]:
        assert score["recovery"] == pytest.approx(score["value"] / score["reference"])


def test_task_inputs_are_refused_before_any_work(
    untrained_phi3: Path, tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [artifact] = quantize_json(untrained_phi3, tmp_path / "out", "gguf", "Q8_0")
    eval_args = ("eval", artifact["path"], "--no-track")

    code, _, err = run_cli(*eval_args, "--tasks", "arc_eazy")
    assert code == 1 and "unknown lm-eval task 'arc_eazy'" in err and "arc_easy" in err and "Traceback" not in err
    assert "reference:" not in err, "refused before the reference was computed"

    empty = tmp_path / "not-a-task.yaml"
    empty.write_text("dataset_path: json\n")
    code, _, err = run_cli(*eval_args, "--tasks", str(empty))
    assert code == 1 and "defines no lm-eval task" in err

    code, _, err = run_cli(*eval_args, "--limit", "5")
    assert code == 1 and "--limit and --num-fewshot apply to --tasks" in err

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = run_cli(*eval_args, "--tasks", str(tasks))
    assert code == 1 and "hubquant[tasks]" in err and "Traceback" not in err


def test_a_recipe_with_tasks_installs_lm_eval_in_each_matrix_job(untrained_phi3: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    variants = [{"format": "gguf", "precision": "Q8_0"}, {"format": "mlx", "precision": "4bit"}]
    for tasks, expected in (([], ["gguf", "mlx"]), (["arc_easy"], ["gguf,tasks", "mlx,tasks"])):
        recipe.write_text(json.dumps({"source": str(untrained_phi3), "variants": variants, "eval": {"tasks": tasks}}))
        code, out, err = run_cli("plan", str(recipe), "--github-matrix")
        assert code == 0, err
        assert [job["extra"] for job in json.loads(out)["include"]] == expected


def test_recovery_error_is_never_below_what_one_changed_answer_gives() -> None:
    from hubquant.tasks import paired_recovery

    reference = {str(i): float(i % 2) for i in range(10)}  # 5 of 10 right
    assert paired_recovery(reference, reference) == (1.0, pytest.approx(1 / (10 * 0.5)))
    one_more = {**reference, "0": 1.0}
    value, stderr = paired_recovery(one_more, reference)
    assert value == pytest.approx(6 / 5) and stderr >= 1 / (10 * 0.5)
    graded = {k: v * 0.5 + 0.25 for k, v in reference.items()}  # not right/wrong: no floor
    assert paired_recovery(graded, graded) == (1.0, 0.0)


def test_a_changed_task_file_changes_what_the_cached_reference_scores_are_keyed_by(tmp_path: Path) -> None:
    from hubquant.tasks import TaskSettings, resolve_tasks

    copy = write_tasks(tmp_path / "copy")
    settings = TaskSettings((str(copy / "hubquant_mc.yaml"),))
    before = resolve_tasks(settings).digest
    (copy / "unrelated.bin").write_bytes(b"\0" * 1024)  # a folder's other files are not read
    assert resolve_tasks(settings).digest == before
    data = copy / "hubquant_mc.jsonl"
    data.write_text(data.read_text().replace("def", "lambda", 1))
    assert resolve_tasks(settings).digest != before
