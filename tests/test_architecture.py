"""The shape of the code: formats as plugins, imports that point down the flow, modules and functions
small enough to read, one speed routine for every runtime."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "hubquant"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


# -- imports ----------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """Every hubquant module ``module`` imports when it runs (function-level included; not TYPE_CHECKING)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            stack.append(child)
    targets = set()
    for name in found:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            candidate = ".".join(parts[:end])
            # A module's own parent packages are already being imported when it runs.
            if candidate in known and candidate != module and not module.startswith(candidate + "."):
                targets.add(candidate)
    return targets


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(ast.parse(path.read_text()), name, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path, or None (the package root, which every import runs, is left out)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "hubquant":
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_have_no_cycle() -> None:
    graph = import_graph()
    assert "hubquant.exporters.base" in graph["hubquant.recipe"], "the walker must see module-level imports"
    assert "hubquant.evaluate" in graph["hubquant.pipeline"], "and function-level ones"
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_format_modules_import_nothing_above_them() -> None:
    """An exporter never imports the evaluation, the cards, the Hub or the pipeline."""
    graph = import_graph()
    above = {
        "hubquant.evaluate",
        "hubquant.card",
        "hubquant.hub",
        "hubquant.repos",
        "hubquant.publishing",
        "hubquant.pipeline",
        "hubquant.tracking",
        "hubquant.cli",
        "hubquant.table",
        "hubquant.eval_worker",
    }
    for module, targets in graph.items():
        if module.startswith("hubquant.exporters"):
            assert not targets & above, f"{module} imports {sorted(targets & above)}"


# -- sizes ------------------------------------------------------------------------------------------
def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE.parent)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "\n".join(too_long)


# -- one speed routine --------------------------------------------------------------------------------
class _Clocked:
    """A runner whose primitives take known times on a fake clock."""

    def __init__(self, prefill_seconds: float, step_seconds: float) -> None:
        self.now = 0.0
        self.prefill_seconds, self.step_seconds = prefill_seconds, step_seconds

    def clock(self) -> float:
        return self.now


def test_every_runtime_is_timed_by_the_one_routine() -> None:
    from hubquant.exporters.base import Runner
    from hubquant.exporters.gguf import GGUFRunner
    from hubquant.exporters.mlx import MLXRunner
    from hubquant.exporters.onnx import ONNXRunner
    from hubquant.exporters.openvino import OpenVINORunner
    from hubquant.torch_runner import TorchRunner

    for runner in (GGUFRunner, MLXRunner, ONNXRunner, OpenVINORunner, TorchRunner):
        assert issubclass(runner, Runner)
        assert "measure_speed" not in vars(runner), f"{runner.__name__} must not time itself"
        assert {"prefill", "step", "logits"} <= set(vars(runner))

    timing = _Clocked(prefill_seconds=0.5, step_seconds=0.1)
    calls: list[tuple[str, int]] = []

    class Known(Runner):
        def logits(self, ids):  # noqa: ANN001, ANN201
            raise AssertionError("not used for speed")

        def prefill(self, ids, *, room):  # noqa: ANN001, ANN201
            calls.append(("prefill", len(ids)))
            timing.now += timing.prefill_seconds
            return 7

        def step(self, token):  # noqa: ANN001, ANN201
            calls.append(("step", token))
            timing.now += timing.step_seconds
            return token

    speed = Known().measure_speed(list(range(64)), 10, clock=timing.clock)
    assert speed.prefill_tokens_per_second == pytest.approx(64 / 0.5)
    assert speed.decode_tokens_per_second == pytest.approx(10 / 1.0)
    assert speed.note is None
    assert calls[:3] == [("prefill", 16), ("step", 7), ("step", 7)], "a warm-up comes first, outside the timing"
    assert calls[3] == ("prefill", 64) and len(calls) == 3 + 1 + 10

    timing.prefill_seconds = timing.step_seconds = 0.0
    instant = Known().measure_speed(list(range(8)), 4, clock=timing.clock)
    assert instant.prefill_tokens_per_second is None and instant.decode_tokens_per_second is None
    assert "no measurable time" in (instant.note or ""), "never an invented figure"


# -- a fifth format, as a plugin package ---------------------------------------------------------------
TOY_FORMAT = '''
"""A toy format: the checkpoint with every linear weight rounded to int8 per row (stored as float)."""
from pathlib import Path
import shutil

from pydantic import Field

from hubquant.exporters.base import Exporter, ExporterOptions, Runner


class ToyOptions(ExporterOptions):
    rows: int = Field(1, description="unused; shows that options are declared per format")


class ToyExporter(Exporter):
    name = "toy"
    description = "toy format for the plugin test"
    extra = "toy"
    required_modules = ("torch", "transformers")
    precisions = {"fp32": "as stored", "int8": "int8 per row, stored dequantized"}
    generic_precisions = {"int4": "int8", "int8": "int8", "fp16": "fp32", "fp32": "fp32"}
    full_precisions = ("fp32",)
    Options = ToyOptions
    library_name = "toy-lib"
    display_name = "Toy runtime"
    repo_template = "{model}-toy"
    repo_layout = "folders"

    @classmethod
    def snippets(cls, plan):
        return f"toy-run {plan.repo_id}"

    def export_one(self, source, job, *, shared, progress):
        import torch
        from safetensors.torch import load_file, save_file

        progress(f"toy {job.precision}: writing")
        for item in source.path.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, job.folder / item.name)
        for name in source.weight_files:
            tensors = load_file(source.path / name)
            if job.precision == "int8":
                for key, value in tensors.items():
                    if value.ndim == 2 and "embed" not in key:
                        scale = value.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
                        tensors[key] = (torch.round(value / scale).clamp(-127, 127) * scale).contiguous()
            save_file(tensors, job.folder / name)

    def runner(self, artifact, *, context_length):
        from hubquant.torch_runner import TorchRunner
        from hubquant.source import resolve_source

        return TorchRunner(resolve_source(artifact.path))
'''


@pytest.fixture
def toy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A distribution installed only on sys.path (and PYTHONPATH, for child processes) that registers
    the ``toy`` format through the ``hubquant.exporters`` entry-point group."""
    from hubquant.exporters import load_plugins, unregister_exporter

    site = tmp_path / "site"
    (site / "toyformat").mkdir(parents=True)
    (site / "toyformat" / "__init__.py").write_text(textwrap.dedent(TOY_FORMAT))
    info = site / "toyformat-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyformat\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hubquant.exporters]\ntoy = toyformat:ToyExporter\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    load_plugins(reload=True)
    yield site
    unregister_exporter("toy")
    load_plugins(reload=True)


@pytest.mark.slow
def test_a_fifth_format_is_quantized_evaluated_tracked_carded_and_staged(
    toy_plugin: Path, untrained_phi3: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli("formats", "--json")
    assert code == 0 and "toy" in {entry["format"] for entry in json.loads(out)}, err
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        json.dumps(
            {
                "source": str(untrained_phi3),
                "output": str(tmp_path / "out"),
                "variants": [{"format": "toy", "precision": "int8"}],
                "eval": {"context": 64, "max_windows": 2, "prompt_tokens": 16, "gen_tokens": 4},
                "hub": {"namespace": "ns"},
            }
        )
    )
    code, out, err = run_cli("publish", str(recipe), "--dry-run", "--stage-dir", str(tmp_path / "stage"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["variants"][0]["path"].endswith("toy-int8")
    evaluation = json.loads((tmp_path / "out" / "toy-int8" / "eval.json").read_text())
    assert evaluation["fidelity"]["format"] == "toy" and evaluation["fidelity"]["origin"] == "floor"
    assert not evaluation["fidelity"]["deviates"], "the toy runtime is PyTorch itself"
    assert evaluation["metrics"]["kl_mean"] > 0 and evaluation["metrics"]["quant_kl_mean"] > 0
    staged = tmp_path / "stage" / "ns" / "untrained-phi3-toy"
    card = (staged / "files" / "README.md").read_text()
    assert "library_name: toy-lib" in card and "toy-run ns/untrained-phi3-toy" in card and "Toy runtime" in card
    assert (staged / "files" / "int8" / "model.safetensors").is_file(), "the folders layout the format declared"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`hubquant.format` = 'toy'"
    )
    assert runs and runs[0].info.status == "FINISHED" and "kl_mean_stderr" in runs[0].data.metrics
