"""transformers' native Phi-4-multimodal through OpenVINO (issue 19): exported by optimum-intel in the vision
environment (transformers 4.53.3), its language model compressed by NNCF, read on pictures through the
OpenVINO runtime and scored against PyTorch on the same ids and pixels; the other formats refuse it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import publish_dry_run, run_cli


@pytest.fixture(scope="module")
def multimodal_publish(
    tiny_phi4_multimodal: Path, tmp_path_factory: pytest.TempPathFactory, shared_references: Path
) -> dict:
    """One dry-run publish: OpenVINO int4 (cookbook settings) and fp32, and a GGUF and an MLX variant to refuse."""
    variants = [
        {"format": "openvino", "precision": "int4"},
        {"format": "openvino", "precision": "fp32"},
        {"format": "gguf", "precision": "Q4_K_M"},
        {"format": "mlx", "precision": "4bit"},
    ]
    tmp = tmp_path_factory.mktemp("multimodal-publish")
    return publish_dry_run(tmp, shared_references, tiny_phi4_multimodal, variants, "multimodal")


def test_a_native_phi4_multimodal_source_is_read_with_its_parts(tiny_phi4_multimodal: Path) -> None:
    from hubquant.source import resolve_source

    source = resolve_source(tiny_phi4_multimodal)
    assert source.architecture == "Phi4MultimodalForCausalLM" and source.model_type == "phi3"
    assert source.vision_parts is not None and list(source.vision_parts) == [
        "language model",
        "vision encoder",
        "vision projector",
        "audio encoder",
        "audio projector",
    ]
    assert source.language_parameters == source.vision_parts["language model"] < source.parameter_count


def test_openvino_builds_the_model_set_and_the_other_formats_refuse(multimodal_publish: dict) -> None:
    code, out = multimodal_publish["code"], multimodal_publish["tmp"] / "out"
    err = " ".join((multimodal_publish["err"] + multimodal_publish["out"]).split())  # long lines wrap
    assert code == 1 and "Traceback" not in err, err  # the refused variants are failures; the rest is published
    assert "gguf cannot carry tiny-phi4-multimodal (Phi4MultimodalForCausalLM)" in err, err
    assert "llama.cpp's converter has no class for Phi4MultimodalForCausalLM" in err
    assert "mlx-vlm has no model for Phi4MultimodalForCausalLM" in err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["openvino-fp32", "openvino-int4"]
    manifest = json.loads((out / "openvino-int4" / "manifest.json").read_text())
    assert manifest["settings"] == {"bits": 4, "sym": True, "group_size": 64, "ratio": 0.6, "vision_weights": "int8"}
    roles = {entry["path"]: entry["role"] for entry in manifest["files"]}
    assert roles["openvino_language_model.bin"] == roles["openvino_text_embeddings_model.bin"] == "model"
    assert (
        roles["openvino_vision_embeddings_model.bin"]
        == roles["openvino_vision_projection_model.xml"]
        == ("vision encoder")
    )
    assert roles["openvino_audio_encoder_model.bin"] == "audio encoder"
    assert {"openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= set(roles)
    # NNCF compressed the language model to 4 bits (and the encoders to 8); fp32 keeps float weights.
    language = (out / "openvino-int4" / "openvino_language_model.xml").read_text()
    assert 'element_type="i4"' in language or 'element_type="u4"' in language
    vision = (out / "openvino-int4" / "openvino_vision_embeddings_model.xml").read_text()
    assert 'element_type="u8"' in vision
    assert 'element_type="i4"' not in (out / "openvino-fp32" / "openvino_language_model.xml").read_text()
    size = sum(entry["size"] for entry in manifest["files"] if entry["role"] == "model")
    assert size < (out / "openvino-fp32" / "openvino_language_model.bin").stat().st_size / 3


def test_vision_weights_unquantized_leaves_the_encoders_in_float(multimodal_publish: dict, tmp_path: Path) -> None:
    import shutil

    from hubquant.exporters.openvino_vision_worker import compress_folder, settings_of

    folder = tmp_path / "variant"
    shutil.copytree(multimodal_publish["tmp"] / "out" / "openvino-fp32", folder)
    settings = settings_of("int4", {"vision_weights": "unquantized"})
    assert settings == {"bits": 4, "sym": True, "group_size": 64, "ratio": 0.6, "vision_weights": "unquantized"}
    compress_folder(folder, settings)
    text = {xml.stem: xml.read_text() for xml in folder.glob("openvino_*_model.xml")}
    assert 'element_type="i4"' in text["openvino_language_model"]
    assert 'element_type="u8"' in text["openvino_text_embeddings_model"], "the token embeddings follow optimum-intel"
    encoders = ("openvino_vision_embeddings_model", "openvino_vision_projection_model", "openvino_audio_encoder_model")
    for name in encoders:
        assert 'element_type="u8"' not in text[name] and 'element_type="i4"' not in text[name], name
    with pytest.raises(ValueError, match="option awq is not built for vision models"):
        settings_of("int4", {"awq": True})


def test_hubquants_reader_gives_optimum_intels_logits(multimodal_publish: dict, vision_env: Path) -> None:
    """The picture reader feeds the IRs as OVModelForVisualCausalLM does: the same logits, to rounding."""
    from hubquant.exporters.openvino_vision import OpenVINOVisionReader
    from hubquant.images import IMAGE_PROMPTS
    from hubquant.stats import kl_divergence

    folder = multimodal_publish["tmp"] / "out" / "openvino-int4"
    first, second = IMAGE_PROMPTS[0], IMAGE_PROMPTS[1]
    reader = OpenVINOVisionReader(folder)
    try:
        ours = reader.answer_logits(first.question, first.answer, first.pixels())
        other = reader.answer_logits(first.question, first.answer, second.pixels())
    finally:
        reader.close()
    script = f"""
import hubquant, numpy as np, torch
from pathlib import Path
from optimum.intel import OVModelForVisualCausalLM
from hubquant.images import IMAGE_PROMPTS
from hubquant.phi4mm_inputs import PromptIds, image_attention_mask, image_sizes, pixel_values
folder = Path({str(folder)!r})
model = OVModelForVisualCausalLM.from_pretrained(folder, ov_config={{"INFERENCE_PRECISION_HINT": "f32"}})
prompt = IMAGE_PROMPTS[0]
head, answer = PromptIds(folder, model.config.vision_config.image_token_id)(prompt.question, prompt.answer)
ids = torch.tensor([head + answer])
pixels = torch.from_numpy(pixel_values(prompt.pixels()))
sizes, mask = torch.from_numpy(image_sizes()), torch.from_numpy(image_attention_mask())
out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_sizes=sizes,
            image_attention_mask=mask)
np.save(folder.parent / "optimum-logits.npy", torch.as_tensor(out.logits)[0, len(head) - 1 : -1].numpy())
"""
    done = subprocess.run([str(vision_env), "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(folder.parent / "optimum-logits.npy")
    assert ours.shape == theirs.shape and ours.shape[0] >= 5
    assert np.abs(ours - theirs).max() < 1e-4
    assert kl_divergence(ours, other).mean() > 1e-4, "the picture moves the answer"


def test_the_picture_figures_compare_with_pytorch_and_are_tracked_and_carded(multimodal_publish: dict) -> None:
    tmp = multimodal_publish["tmp"]
    int4 = json.loads((tmp / "out" / "openvino-int4" / "eval.json").read_text())
    fp32 = json.loads((tmp / "out" / "openvino-fp32" / "eval.json").read_text())
    (score,) = int4["image"]["scores"]
    (floor,) = fp32["image"]["scores"]
    assert score["projector"] == "int8" and floor["projector"] == "fp32" and int4["image"]["prompts"] == 4
    assert "PyTorch's Phi4MultimodalForCausalLM (transformers 4.53.3, eager attention)" in int4["image"]["baseline"]
    # The runtime alone (fp32 IR against PyTorch on the same inputs) is within rounding; the int4 variant is not.
    assert floor["quant_kl_mean"] is None and 0 <= floor["ref_kl_mean"] < 1e-8
    assert 0 < score["quant_kl_mean_stderr"] < score["quant_kl_mean"] < score["image_effect_kl"]
    assert score["ref_kl_mean"] == pytest.approx(score["quant_kl_mean"], rel=0.05)
    assert 0.5 < score["ref_top1_agreement"] <= 1
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("multimodal")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`hubquant.format` = 'openvino'")
    metrics = {run.data.tags.get("hubquant.precision"): run.data.metrics for run in runs}
    assert metrics["int4"]["image.int8.ref_kl_mean"] == pytest.approx(score["ref_kl_mean"])
    failed = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert {run.data.tags.get("hubquant.format") for run in failed} == {"gguf", "mlx"}
    staged = tmp / "stage" / "ns" / "tiny-phi4-multimodal-int4-ov" / "files"
    card = (staged / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "- vision" in card
    assert "KL from the original ± s.e." in card and "| int4 | int8 |" in card
    assert 'OVModelForVisualCausalLM.from_pretrained("ns/tiny-phi4-multimodal-int4-ov")' in card
    assert (staged / "openvino_vision_embeddings_model.bin").is_file()


def test_tiny_multimodal_options_are_checked_before_any_work(tmp_path: Path) -> None:
    code, _, err = run_cli("tiny", str(tmp_path / "a"), "--multimodal", "--vision")
    assert code == 1 and "--vision and --multimodal are two models" in err and "Traceback" not in err
    code, _, err = run_cli("tiny", str(tmp_path / "b"), "--multimodal", "--style", "phi4")
    assert code == 1 and "--multimodal builds on the phi3 style" in err
    assert not any(tmp_path.iterdir())


def test_a_failed_environment_creation_says_why_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubquant import vision_env
    from hubquant.errors import MissingDependencyError

    monkeypatch.setenv("HUBQUANT_VISION_ENV", str(tmp_path / "env"))
    broken = vision_env.Environment("openvino-vision", (str(tmp_path / "no-such-package"),), "HUBQUANT_VISION_ENV")
    with pytest.raises(MissingDependencyError) as caught:
        vision_env.ensure_env(env=broken)
    assert "could not create the openvino-vision environment: pip install" in caught.value.message
    assert "HUBQUANT_VISION_ENV" in (caught.value.hint or "")
    assert list(tmp_path.iterdir()) == [], "the half-made environment is removed"


def test_an_environment_made_by_one_name_of_the_interpreter_serves_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m pytest`` runs ``bin/python``, the ``hubquant`` script ``bin/python3.11``: one interpreter,
    so an environment one made is not made again by the other."""
    import sys

    from hubquant import vision_env

    real = Path(sys.executable).resolve()
    alias = tmp_path / "python-alias"
    alias.symlink_to(real)
    folder = tmp_path / "env"
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").symlink_to(real)
    monkeypatch.setattr(sys, "executable", str(real))
    marker = {"pins": list(vision_env.MLX.pins), "python": vision_env._interpreter()}
    (folder / vision_env.MARKER).write_text(json.dumps(marker))
    monkeypatch.setattr(sys, "executable", str(alias))
    monkeypatch.setenv(vision_env.MLX.variable, str(folder))
    assert vision_env.ensure_env(env=vision_env.MLX) == folder / "bin" / "python"
    marker["pins"] = ["transformers==0.0.1"]
    (folder / vision_env.MARKER).write_text(json.dumps(marker))
    assert not vision_env._ready(folder, vision_env.MLX), "other pins: made again"


def test_vision_weights_is_refused_for_a_text_model(tiny_phi3: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "quantize",
        str(tiny_phi3),
        "--format",
        "openvino",
        "--precision",
        "int4",
        "--option",
        "vision_weights=unquantized",
        "--output",
        str(tmp_path / "out"),
        "--no-track",
    )
    assert code == 1 and "vision_weights applies to vision models only" in err and "Traceback" not in err
