"""OpenVINO: optimum-intel's exporter and NNCF run for real; every artifact loads in optimum-intel
and in openvino-genai and generates."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hubquant.artifact import load_artifact, sha256_file
from hubquant.exporters.openvino import OpenVINOExporter, OpenVINORunner
from hubquant.exporters.openvino_compress import without_node_numbers
from hubquant.source import resolve_source
from hubquant.stats import kl_divergence
from hubquant.stats import runner_perplexity as perplexity
from hubquant.text import BUILTIN_CALIBRATION_TEXT, read_text, token_windows, tokenize
from hubquant.torch_runner import TorchRunner

from conftest import run_cli

CONTEXT = 256

#: The issue's variants, plus plain int4 and GPTQ at the group size of the data-aware ones.
VARIANTS = [
    {"format": "openvino", "precision": "int4", "options": {"sym": True, "group_size": 64}},
    {"format": "openvino", "precision": "int4", "options": {"group_size": 128, "ratio": 0.8}},
    {"format": "openvino", "precision": "int4", "options": {"group_size": 64, "awq": True, "scale_estimation": True}},
    {"format": "openvino", "precision": "int4", "options": {"group_size": 64}},
    {"format": "openvino", "precision": "int4", "options": {"group_size": 64, "gptq": True}},
    {"format": "openvino", "precision": "int8"},
    {"format": "openvino", "precision": "fp16"},
    {"format": "openvino", "precision": "fp32"},
]


def _build(model: Path, out: Path, variants: list[dict], tmp_path: Path) -> dict[str, Path]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"source": str(model), "output": str(out), "variants": variants}))
    code, stdout, err = run_cli("quantize", "--recipe", str(recipe), "--json", "--no-track")
    assert code == 0, err
    return {Path(a["path"]).name: Path(a["path"]) for a in json.loads(stdout)}


def _settings(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["settings"]


def _generate_both(path: Path) -> None:
    import openvino_genai
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = OVModelForCausalLM.from_pretrained(path)
    inputs = tokenizer("A list keeps items", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    pipe = openvino_genai.LLMPipeline(str(path), "CPU")
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = 6
    text = pipe.generate("A list keeps items", config)
    assert isinstance(text, str) and text


def _scores(model: Path, artifacts: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """(perplexity, mean KL vs PyTorch) per artifact, plus the reference's perplexity under 'reference'."""
    source = resolve_source(model)
    windows = token_windows(tokenize(source, read_text(None)), CONTEXT)
    reference = TorchRunner(source)
    ref_logits = [reference.logits(w) for w in windows]
    scores = {"reference": (perplexity(reference, windows), 0.0)}
    for name, path in artifacts.items():
        runner = OpenVINORunner(path)
        kl = float(
            np.concatenate(
                [kl_divergence(r, runner.logits(w)) for r, w in zip(ref_logits, windows, strict=False)]
            ).mean()
        )
        scores[name] = (perplexity(runner, windows), kl)
        runner.close()
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("style", ["phi3", "phi4"])
def test_variants_load_generate_and_score(style: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model = request.getfixturevalue(f"tiny_{style}")
    built = _build(model, tmp_path / "out", VARIANTS, tmp_path)
    assert set(built) == {
        "openvino-int4-sym-g64",
        "openvino-int4-g128-r0.8",
        "openvino-int4-g64-awq-se",
        "openvino-int4-g64",
        "openvino-int4-g64-gptq",
        "openvino-int8",
        "openvino-fp16",
        "openvino-fp32",
    }
    for path in built.values():
        files = {p.name for p in path.iterdir()}
        assert {
            "openvino_model.xml",
            "openvino_model.bin",
            "openvino_tokenizer.xml",
            "openvino_detokenizer.xml",
            "config.json",
            "chat_template.jinja",
        } <= files, files
        # Hashed while the worker wrote them (hubquant.follow), the manifest's digests are the files' own.
        for entry in load_artifact(path).files:
            assert sha256_file(path / entry.path) == entry.sha256, (path.name, entry.path)
        _generate_both(path)
    # What NNCF was asked to do is what the artifact records.
    settings = _settings(built["openvino-int4-g64-awq-se"])
    assert settings["group_size"] == 64 and settings["quant_method"] == "awq" and settings["scale_estimation"] is True
    assert settings["dataset"] == "hubquant built-in calibration text" and settings["num_samples"] >= 8
    # The calibration identity a card names: the text's sha256, the samples and their length.
    expected = hashlib.sha256(read_text(None, builtin=BUILTIN_CALIBRATION_TEXT).encode()).hexdigest()
    assert settings["sha256"] == expected and settings["sample_tokens"] > 0
    (note,) = OpenVINOExporter.variant_notes(load_artifact(built["openvino-int4-g64-awq-se"]))
    assert f"{settings['num_samples']} samples of {settings['sample_tokens']} tokens" in note and expected[:12] in note
    assert _settings(built["openvino-int4-g128-r0.8"])["ratio"] == 0.8
    assert str(tmp_path) not in (built["openvino-int4-g64-awq-se"] / "openvino_config.json").read_text()

    scores = _scores(model, built)
    ref = scores["reference"][0]
    for name in ("openvino-fp32", "openvino-fp16"):
        assert abs(scores[name][0] - ref) / ref < 0.001, (name, scores[name], ref)
    assert scores["openvino-fp32"][1] < scores["openvino-fp16"][1] < scores["openvino-int8"][1]
    assert scores["openvino-int8"][1] < scores["openvino-int4-g64"][1]
    # Data-aware int4 (GPTQ on the built-in calibration text) beats plain int4 at the same group size.
    assert scores["openvino-int4-g64-gptq"][1] < scores["openvino-int4-g64"][1], scores


@pytest.mark.slow
def test_model_defaults_from_optimum_intel_table(untrained_phi3: Path, tmp_path: Path) -> None:
    """A folder named like a Phi model in optimum-intel's table gets its recommended int4 settings."""
    model = tmp_path / "Phi-3-mini-4k-instruct"
    shutil.copytree(untrained_phi3, model)
    built = _build(model, tmp_path / "out", [{"format": "openvino", "precision": "int4"}], tmp_path)
    artifact = built["openvino-int4"]
    quant = _settings(artifact)
    assert quant["group_size"] == 64 and quant["scale_estimation"] is True and quant["sym"] is False
    warnings = json.loads((artifact / "manifest.json").read_text())["warnings"]
    assert any("recommended int4 settings" in w for w in warnings), warnings
    assert any("calibrated on hubquant's built-in text" in w for w in warnings), warnings
    # defaults=none: optimum-intel's generic default (group 128) instead.
    built = _build(
        model,
        tmp_path / "out",
        [{"format": "openvino", "precision": "int4", "options": {"defaults": "none"}}],
        tmp_path,
    )
    quant = _settings(built["openvino-int4-no-defaults"])
    assert quant["group_size"] == 128 and not quant.get("scale_estimation")


@pytest.mark.slow
def test_torch_free_compression_writes_what_optimum_cli_writes(untrained_phi3: Path, tmp_path: Path) -> None:
    """Data-free int4 is compressed in a child without torch (hubquant.exporters.openvino_compress); its
    output is optimum-cli's: the same weights and files, the XML differing only in unnamed nodes' numbers."""
    options = {"sym": True, "group_size": 64, "ratio": 0.8}
    built = _build(
        untrained_phi3, tmp_path / "out", [{"format": "openvino", "precision": "int4", "options": options}], tmp_path
    )
    ours = built["openvino-int4-sym-g64-r0.8"]
    raw = tmp_path / "raw"
    command = [sys.executable, "-m", "hubquant._launch", "optimum.commands.optimum_cli", "export", "openvino"]
    command += ["--model", str(untrained_phi3), "--task", "text-generation-with-past", "--weight-format", "int4"]
    subprocess.run(
        [*command, "--sym", "--group-size", "64", "--ratio", "0.8", str(raw)], check=True, capture_output=True
    )
    raw_files = sorted(p.name for p in raw.iterdir())
    assert raw_files == sorted(p.name for p in ours.iterdir() if p.name != "manifest.json")
    for name in raw_files:
        theirs, mine = raw / name, ours / name
        if name == "openvino_model.xml":
            assert without_node_numbers(theirs.read_text()) == without_node_numbers(mine.read_text())
        elif name == "openvino_config.json":  # hubquant drops the local path of the tokenizer NNCF was given
            raw_config, our_config = json.loads(theirs.read_text()), json.loads(mine.read_text())
            assert raw_config["quantization_config"].pop("tokenizer") == str(untrained_phi3)
            assert our_config["quantization_config"].pop("tokenizer") is None
            assert raw_config == our_config
        else:
            assert theirs.read_bytes() == mine.read_bytes(), name
    # Nothing hubquant imports on the way to NNCF brings torch into the compressor.
    spec, result = tmp_path / "spec.pkl", tmp_path / "result.json"
    spec.write_bytes(pickle.dumps({"ir": str(tmp_path / "no-ir"), "jobs": []}))
    subprocess.run([sys.executable, "-m", "hubquant.exporters.openvino_compress", str(spec), str(result)], check=True)
    assert json.loads(result.read_text()) == {"variants": {}, "torch_imported": False}


@pytest.mark.parametrize(
    ("precision", "option", "message"),
    [
        ("fp16", "group_size=64", "only applies to int4/int8"),
        ("int8", "ratio=0.8", "only applies to int4"),
        ("int4", "backup_precision=int8_sym", "only matters with ratio below 1"),
        ("int4", "group_size=48", "group_size"),
        ("int4", "ratio=1.5", "ratio"),
        ("int4", "awq_mode=1", "has no option 'awq_mode'"),
        ("int4", "dataset=no-such-dataset", "neither a text file nor a dataset"),
    ],
)
def test_bad_options_are_refused_before_any_work(
    untrained_phi3: Path, tmp_path: Path, precision: str, option: str, message: str
) -> None:
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--format",
        "openvino",
        "--precision",
        precision,
        "--option",
        option,
        "--output",
        str(tmp_path / "out"),
        "--no-track",
    )
    assert code == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_nncf_failure_is_one_clear_error_and_leaves_nothing(untrained_phi3: Path, tmp_path: Path) -> None:
    """A calibration dataset that cannot be fetched (no network here) fails that variant only."""
    variants = [
        {"format": "openvino", "precision": "int4", "options": {"awq": True, "dataset": "wikitext2"}},
        {"format": "openvino", "precision": "int8"},
    ]
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"source": str(untrained_phi3), "output": str(out), "variants": variants}))
    code, _, err = run_cli("quantize", "--recipe", str(recipe), "--no-track")
    assert code == 1 and "Traceback" not in err, err
    assert "openvino-int4" in err and ("datasets" in err or "wikitext" in err), err
    assert sorted(p.name for p in out.iterdir()) == ["openvino-int8"]
