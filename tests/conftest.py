"""Test isolation and the tiny Phi checkpoints every test shares.

- Every test gets its own HF_HOME, hubquant cache and working folder, offline Hub access and no
  MLflow URI from the environment.
- The trained tiny models are built once per session (about a minute each on two cores). Set
  HUBQUANT_TEST_CACHE to a folder to keep them between sessions while developing.
- The reference cache (PyTorch logits per source, text and windows, with each runtime's floor logits
  beside them) is shared by the whole session, as it is shared by a user's runs: it is keyed by the
  source's content, and ``test_runs_agree_and_the_reference_is_cached`` pins that a reused reference
  gives the same figures as a computed one. A test that needs an empty one is marked
  ``fresh_reference``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubquant.tiny import build_tiny_phi


def pytest_configure(config: pytest.Config) -> None:
    """This process builds PyTorch references through transformers' model classes anyway. Holding them
    from the start (after hubquant's import work-arounds) lets an in-process GGUF conversion read the
    model configuration itself instead of through hubquant.exporters.gguf_hparams' child, which costs
    ~8 s per conversion at tiny size (its import chain) and saves nothing in a process that has those
    imports. Fresh processes — every CLI run in a subprocess,
    test_gguf.py::test_converter_hparams_are_read_in_a_child — still go through the child."""
    import transformers.models.auto.modeling_auto  # noqa: F401


@pytest.fixture(scope="session")
def shared_references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("references")


@pytest.fixture(autouse=True)
def isolated_env(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    shared_references: Path,
) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once at import, which may have happened in an earlier test.
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # Beside the test's folder, not in it: tests check that their folder holds only what they wrote.
    cache = tmp_path_factory.mktemp("hubquant-cache")
    monkeypatch.setenv("HUBQUANT_CACHE", str(cache))
    if request.node.get_closest_marker("fresh_reference") is None:
        (cache / "reference").symlink_to(shared_references, target_is_directory=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HUBQUANT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("HUBQUANT_TEST_CACHE")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("models")


def _cached_model(store: Path, name: str, **kwargs: object) -> Path:
    path = store / name
    if not (path / "config.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        build_tiny_phi(path, **kwargs)  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="session")
def tiny_phi3(model_store: Path) -> Path:
    """Trained tiny Phi-3-style model (SentencePiece tokenizer)."""
    return _cached_model(model_store, "tiny-phi3", style="phi3", steps=300)


@pytest.fixture(scope="session")
def tiny_phi4(model_store: Path) -> Path:
    """Trained tiny Phi-4-style model (byte-level BPE tokenizer llama.cpp has never seen)."""
    return _cached_model(model_store, "tiny-phi4", style="phi4", steps=300)


@pytest.fixture(scope="session")
def tiny_phi4mini(model_store: Path) -> Path:
    """Trained tiny Phi-4-mini-style model: BPE, tied embeddings, partial rotary 0.75, long-rope 128k."""
    return _cached_model(
        model_store,
        "tiny-phi4mini",
        style="phi4",
        steps=300,
        tie_embeddings=True,
        partial_rotary_factor=0.75,
        long_rope=True,
    )


@pytest.fixture(scope="session")
def tiny_phi4_vision(model_store: Path, tiny_phi3: Path) -> Path:
    """The trained tiny Phi-3 with a (random) SigLIP2 tower and projector: a tiny ``Phi4ForCausalLMV``."""
    from hubquant.tiny_vision import VISION_BUILDER_VERSION, add_vision_tower

    path = model_store / f"vision-v{VISION_BUILDER_VERSION}" / "tiny-phi4-vision"  # the name files are named by
    if not (path / "config.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        add_vision_tower(tiny_phi3, path)
    return path


@pytest.fixture(scope="session")
def vision_env(model_store: Path) -> Iterator[Path]:
    """The OpenVINO vision environment (transformers 4.53.3), made once per session: where
    ``HUBQUANT_VISION_ENV`` already points (``.ci/run`` makes it ahead), else in the model store."""
    from hubquant.vision_env import ensure_env

    before = os.environ.get("HUBQUANT_VISION_ENV")
    os.environ["HUBQUANT_VISION_ENV"] = before or str(model_store / "openvino-vision-env")
    try:
        yield ensure_env()
    finally:
        if before is None:
            os.environ.pop("HUBQUANT_VISION_ENV", None)


@pytest.fixture(scope="session")
def mlx_vision_env(model_store: Path) -> Iterator[Path]:
    """The MLX vision environment (transformers 5.14.1, mlx-vlm 0.7.10), made once per session: where
    ``HUBQUANT_MLX_VISION_ENV`` already points (``.ci/run`` makes it ahead), else in the model store."""
    from hubquant.vision_env import MLX, ensure_env

    before = os.environ.get(MLX.variable)
    os.environ[MLX.variable] = before or str(model_store / "mlx-vision-env")
    try:
        yield ensure_env(env=MLX)
    finally:
        if before is None:
            os.environ.pop(MLX.variable, None)


@pytest.fixture(scope="session")
def tiny_phi4_multimodal(model_store: Path, tiny_phi3: Path, vision_env: Path) -> Path:
    """The trained tiny Phi-3 with random SigLIP and audio encoders: a tiny native ``Phi4MultimodalForCausalLM``."""
    from hubquant.tiny_multimodal import add_multimodal

    path = model_store / "tiny-phi4-multimodal"
    if not (path / "config.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        add_multimodal(tiny_phi3, path)
    return path


@pytest.fixture(scope="session")
def untrained_phi3(model_store: Path) -> Path:
    """Random-weight tiny Phi-3-style model: enough for shape and error tests."""
    return _cached_model(model_store, "untrained-phi3", style="phi3", steps=0)


@pytest.fixture
def model_copy(tmp_path: Path, untrained_phi3: Path):
    """A private copy of the untrained model that a test may damage."""

    def make(name: str = "broken-model") -> Path:
        target = tmp_path / name
        shutil.copytree(untrained_phi3, target)
        return target

    return make


def wait_for_stage(marker: Path, process) -> None:
    """Until a child paused by ``HUBQUANT_FAULT=pause:STAGE`` has written ``STAGE.reached`` (bounded:
    120 s, or the child ends): signals are sent at a named stage, never after a sleep."""
    import time

    for _ in range(1200):
        if marker.is_file() or process.poll() is not None:
            break
        time.sleep(0.1)
    assert marker.is_file(), f"{marker.stem} never reached: " + process.communicate(timeout=120)[1]


def missing(what: str) -> None:
    """A test's tool is absent: skipped on a developer's machine, a failure in CI (``.ci/run`` sets
    ``HUBQUANT_CI``), where every tool the suite needs is installed and a skip would hide a gap."""
    if os.environ.get("HUBQUANT_CI"):
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)


def publish_dry_run(tmp: Path, shared_references: Path, source: Path, variants: list[dict], experiment: str) -> dict:
    """``hubquant publish --dry-run`` of ``source`` in ``tmp``, with a cache of its own, for a module's fixture
    (which runs before each test's own isolation): its exit code, output and folder."""
    import json

    with pytest.MonkeyPatch.context() as env:
        env.chdir(tmp)
        (tmp / "cache").mkdir()
        (tmp / "cache" / "reference").symlink_to(shared_references, target_is_directory=True)
        env.setenv("HUBQUANT_CACHE", str(tmp / "cache"))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        recipe = {
            "source": str(source),
            "output": str(tmp / "out"),
            "variants": variants,
            "eval": {"context": 64, "max_windows": 3, "prompt_tokens": 16, "gen_tokens": 4},
            "hub": {"namespace": "ns"},
        }
        (tmp / "recipe.yaml").write_text(json.dumps(recipe))
        stage = str(tmp / "stage")
        code, out, err = run_cli(
            "publish", str(tmp / "recipe.yaml"), "--dry-run", "--stage-dir", stage, "--experiment", experiment
        )
    return {"code": code, "out": out, "err": err, "tmp": tmp}


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``hubquant`` in-process through its real entry point; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from hubquant.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1, started once per session and stopped at the end."""
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


def quantize_json(model: Path, out: Path, fmt: str, *precisions: str, options: tuple[str, ...] = ()) -> list[dict]:
    """``hubquant quantize --json`` through the CLI, untracked; asserts success and returns the artifacts."""
    import json

    flags = [f for p in precisions for f in ("--precision", p)]
    code, stdout, err = run_cli(
        "quantize", str(model), "--format", fmt, *flags, *options, "--output", str(out), "--json", "--no-track"
    )
    assert code == 0, err
    return json.loads(stdout)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """The loopback Hub (tests/hub_server.py) as the huggingface_hub client's endpoint, online, no Xet."""
    from huggingface_hub import constants

    from hub_server import HubServer

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HUBQUANT_HUB_RETRY_WAIT", "0.05")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server
