"""MLX on the Linux CPU through mlx[cpu]: build, load, generate, and numbers that are right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hubquant.artifact import load_artifact, sha256_file
from hubquant.exporters.mlx import MLXRunner
from hubquant.source import resolve_source
from hubquant.stats import kl_divergence
from hubquant.stats import runner_perplexity as perplexity
from hubquant.text import read_text, token_windows, tokenize
from hubquant.torch_runner import TorchRunner

from conftest import quantize_json, run_cli

pytestmark = pytest.mark.slow
CONTEXT = 256


def _build(model: Path, out: Path, *precisions: str, options: tuple[str, ...] = ()) -> list[dict]:
    return quantize_json(model, out, "mlx", *precisions, options=options)


def _compare(model: Path, artifact_dir: Path) -> tuple[float, float, float]:
    """(reference perplexity, MLX perplexity, mean KL) on the built-in text."""
    source = resolve_source(model)
    windows = token_windows(tokenize(source, read_text(None)), CONTEXT)
    reference = TorchRunner(source)
    runner = MLXRunner(artifact_dir)
    ref_logits = [reference.logits(w) for w in windows]
    kl = float(
        np.concatenate([kl_divergence(r, runner.logits(w)) for r, w in zip(ref_logits, windows, strict=False)]).mean()
    )
    return perplexity(reference, windows), perplexity(runner, windows), kl


def _generates(artifact_dir: Path) -> str:
    from mlx_lm import generate, load

    model, tokenizer = load(str(artifact_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a list?"}], add_generation_prompt=True, tokenize=False
    )
    text = generate(model, tokenizer, prompt=prompt, max_tokens=8, verbose=False)
    assert isinstance(text, str) and text
    return text


@pytest.mark.parametrize("style", ["phi3", "phi4"])
def test_both_tokenizer_styles_build_load_and_generate(
    style: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = request.getfixturevalue(f"tiny_{style}")
    built = _build(model, tmp_path / "out", "int4", "int8", "fp16")
    assert [a["precision"] for a in built] == ["4bit", "8bit", "fp16"]
    paths = {a["precision"]: Path(a["path"]) for a in built}
    assert paths["4bit"].name == "mlx-4bit-g64" and paths["fp16"].name == "mlx-fp16"
    config = json.loads((paths["4bit"] / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert built[0]["size"] < built[1]["size"] < built[2]["size"]
    for path in paths.values():
        # Hashed while mlx wrote them (hubquant.follow), the manifest's digests are the files' own.
        for entry in load_artifact(path).files:
            assert sha256_file(path / entry.path) == entry.sha256, entry.path
        assert (path / "tokenizer.json").is_file() and "chat_template" in (
            (path / "tokenizer_config.json").read_text() + "".join(p.name for p in path.iterdir())
        )
        _generates(path)
    if style == "phi3":
        ref, fp16, kl = _compare(model, paths["fp16"])
        assert abs(fp16 - ref) / ref < 0.005, (ref, fp16)
        assert kl < 1e-4


def test_phi4_mini_rope_is_right(tiny_phi4mini: Path, tmp_path: Path) -> None:
    source_config = (tiny_phi4mini / "config.json").read_text()
    built = _build(tiny_phi4mini, tmp_path / "long", "fp16", "4bit", "8bit")
    for artifact in built[1:]:
        _generates(Path(artifact["path"]))
    long_dir = Path(built[0]["path"])
    config = json.loads((long_dir / "config.json").read_text())
    # The keys mlx-lm reads are written into the artifact, never into the source.
    assert config["partial_rotary_factor"] == 0.75 and config["rope_scaling"]["type"] == "longrope"
    assert (tiny_phi4mini / "config.json").read_text() == source_config
    _generates(long_dir)

    # Without those keys mlx-lm silently computes a different model.
    raw = tmp_path / "raw"
    raw.mkdir()
    for item in long_dir.iterdir():
        (raw / item.name).write_bytes(item.read_bytes())
    stripped = {
        k: v
        for k, v in config.items()
        if k not in ("partial_rotary_factor", "rope_scaling", "rope_theta", "original_max_position_embeddings")
    }
    (raw / "config.json").write_text(json.dumps(stripped))
    _, _, kl_raw = _compare(tiny_phi4mini, raw)

    # Below 4096 tokens the original uses the short factors: rope_factors=short is exact there.
    built = _build(tiny_phi4mini, tmp_path / "short", "fp16", options=("--option", "rope_factors=short"))
    short_dir = Path(built[0]["path"])
    assert short_dir.name == "mlx-fp16-short-rope"
    ref, fp16_short, kl_short = _compare(tiny_phi4mini, short_dir)
    assert abs(fp16_short - ref) / ref < 0.03, (ref, fp16_short)
    assert kl_short < 1e-4 < kl_raw, (kl_short, kl_raw)
    _, _, kl_long = _compare(tiny_phi4mini, long_dir)
    assert kl_short < kl_long  # the default is right for long contexts, not for this short text
    # The evaluation names the runtime's own deviation, with its cause, in the table and eval.json.
    code, out, err = run_cli(
        "eval",
        str(long_dir),
        "--context",
        "64",
        "--max-windows",
        "1",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--no-track",
    )
    assert code == 0, err
    assert "! finding: MLX computes this model differently" in out and "long-rope factors at every length" in out
    fidelity = json.loads((long_dir / "eval.json").read_text())["fidelity"]
    assert fidelity["deviates"] and fidelity["origin"] == "floor" and fidelity["precision"] == "fp32"


def test_bad_options_and_missing_mlx(untrained_phi3: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "mlx",
        "--precision",
        "fp16",
        "--option",
        "group_size=32",
        "--output",
        str(tmp_path / "o"),
        "--no-track",
    )
    assert code == 1 and "group_size has no effect" in err
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "mlx",
        "--precision",
        "4bit",
        "--option",
        "group_size=48",
        "--output",
        str(tmp_path / "o"),
        "--no-track",
    )
    assert code == 1 and "group_size" in err and "Traceback" not in err
    # A machine where mlx cannot be imported gets the extra to install, before any work.
    block = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx' or name.startswith(('mlx.', 'mlx_lm')):\n"
        "            raise ImportError('mlx is not available on this platform')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from hubquant.cli import main\n"
        f"main(['quantize', {str(untrained_phi3)!r}, '--format', 'mlx', '--precision', 'int4', "
        f"'--output', {str(tmp_path / 'o')!r}, '--no-track'])\n"
    )
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert 'pip install "hubquant[mlx]"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_eval_table_includes_mlx(tiny_phi3: Path, tmp_path: Path) -> None:
    built = _build(tiny_phi3, tmp_path / "out", "int4", "fp16")
    # mlx[cpu] has no fast quantized kernels (a 4-bit forward pass is ~35x slower than fp16 here),
    # so this check scores two short windows.
    code, out, err = run_cli(
        "eval",
        *(a["path"] for a in built),
        "--context",
        "64",
        "--max-windows",
        "2",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--json",
        "--no-track",
    )
    assert code == 0, err
    rows = {r["variant"]["precision"]: r["metrics"] for r in json.loads(out)["rows"]}
    assert rows["fp16"]["kl_mean"] < rows["4bit"]["kl_mean"]
    assert rows["4bit"]["decode_tokens_per_second"] > 0
    assert load_artifact(built[0]["path"]).format == "mlx"
