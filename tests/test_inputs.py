"""Every bad input: one clear line, exit code 1, no traceback, and no output folder left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hubquant.errors import SourceError, UnsupportedModelError
from hubquant.source import resolve_source

from conftest import run_cli


def _assert_clean_failure(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hubquant: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from hubquant.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['quantize', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'transformers', 'llama_cpp', 'openvino', 'onnxruntime', 'onnxruntime_genai', 'mlx',"
        " 'gguf', 'conversion'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_formats_lists_gguf_precisions_options_and_defaults() -> None:
    code, out, _ = run_cli("formats")
    assert code == 0
    assert "gguf" in out and "Q4_K_M" in out and "IQ2_XS" in out and "int4→Q4_K_M" in out
    assert "imatrix" in out and "pre_tokenizer" in out
    code, out, _ = run_cli("formats", "--json")
    described = json.loads(out)
    gguf = next(d for d in described if d["format"] == "gguf")
    assert gguf["generic_precisions"]["int8"] == "Q8_0"
    assert {o["name"]: o["default"] for o in gguf["options"]}["imatrix_context"] == 512


def test_source_facts(untrained_phi3: Path) -> None:
    source = resolve_source(untrained_phi3)
    assert source.model_type == "phi3" and source.architecture == "Phi3ForCausalLM"
    assert source.tokenizer_style == "sentencepiece"
    assert source.parameter_count > 2_000_000 and source.dtype == "float32"
    assert source.chat_template and "<|user|>" in source.chat_template
    assert source.license == "mit" and source.revision is None
    assert resolve_source(untrained_phi3).fingerprint == source.fingerprint


def test_non_phi_model(model_copy, tmp_path: Path) -> None:
    model = model_copy()
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError):
        resolve_source(model)
    code, _, err = run_cli("quantize", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(code, err, "llama", "Phi3ForCausalLM")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer(model_copy, tmp_path: Path) -> None:
    model = model_copy()
    for name in ("tokenizer.json", "tokenizer.model"):
        (model / name).unlink()
    code, _, err = run_cli("quantize", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(code, err, "no tokenizer", "tokenizer.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(model_copy, tmp_path: Path, damage: str) -> None:
    model = model_copy()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(SourceError):
        resolve_source(model)
    code, _, err = run_cli("quantize", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(code, err, "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_missing_config_and_missing_folder(model_copy, tmp_path: Path) -> None:
    model = model_copy()
    (model / "config.json").unlink()
    code, _, err = run_cli("quantize", str(model), "--output", str(tmp_path / "out"))
    _assert_clean_failure(code, err, "config.json")
    code, _, err = run_cli("quantize", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    _assert_clean_failure(code, err, "nowhere")
    assert not (tmp_path / "out").exists()


def test_unknown_precision_and_option_on_the_cli(untrained_phi3: Path, tmp_path: Path) -> None:
    code, _, err = run_cli("quantize", str(untrained_phi3), "--precision", "Q4_K_XXL", "--output", str(tmp_path / "o"))
    _assert_clean_failure(code, err, "Q4_K_XXL", "Q4_K_M")
    code, _, err = run_cli("quantize", str(untrained_phi3), "--option", "bits=4", "--output", str(tmp_path / "o"))
    _assert_clean_failure(code, err, "bits", "imatrix")
    code, _, err = run_cli("quantize", str(untrained_phi3), "--option", "novalue", "--output", str(tmp_path / "o"))
    _assert_clean_failure(code, err, "KEY=VALUE")
    assert not (tmp_path / "o").exists()


def test_output_path_is_a_file(untrained_phi3: Path, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("keep me")
    code, _, err = run_cli("quantize", str(untrained_phi3), "--precision", "F16", "--output", str(target))
    _assert_clean_failure(code, err, "is a file")
    assert target.read_text() == "keep me"


def test_unwritable_output(untrained_phi3: Path) -> None:
    # /proc refuses new folders even to root, which a chmod'ed folder would not.
    target = Path("/proc/hubquant-test/out")
    code, _, err = run_cli("quantize", str(untrained_phi3), "--precision", "F16", "--output", str(target))
    _assert_clean_failure(code, err, "cannot write output", "--output")
    assert not target.exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {"HUBQUANT_DEBUG": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "hubquant.cli", "quantize", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1 and "Traceback" in result.stderr and "SourceError" in result.stderr


def test_hub_id_resolves_from_the_local_cache(untrained_phi3: Path, tmp_path: Path) -> None:
    """A Hub id goes through snapshot_download; offline, a cached snapshot is used with its commit sha."""
    import os
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(os.environ["HF_HOME"]) / "hub" / "models--microsoft--tiny-phi"
    shutil.copytree(untrained_phi3, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    source = resolve_source("microsoft/tiny-phi")
    assert source.revision == commit and source.name == "tiny-phi"
    assert source.path == (repo / "snapshots" / commit).resolve()
    # GGUF files name where they came from (llama.cpp's general.source.url), at that commit.
    from hubquant.exporters.gguf_tools import gguf_metadata

    assert gguf_metadata(source)["general.source.url"] == f"https://huggingface.co/microsoft/tiny-phi/tree/{commit}"
    assert "general.source.url" not in gguf_metadata(resolve_source(untrained_phi3))
    code, _, err = run_cli("quantize", "microsoft/not-cached", "--output", str(tmp_path / "o"))
    _assert_clean_failure(code, err, "microsoft/not-cached")
    assert not (tmp_path / "o").exists()
