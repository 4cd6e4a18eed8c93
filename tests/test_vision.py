"""Phi vision checkpoints: recognised by architecture, their parts counted from the headers, and
refused before any weight is read with what to run instead (issue 19's first step).

The checkpoints here are headers-true, not runnable: the real tensor names of each architecture at a
tiny size, so the part counts can be checked exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubquant.vision import BUILT_VISION, PARTS, part_of, parts

from conftest import publish_dry_run, run_cli

#: architecture → (model_type, {tensor name: shape}) with each checkpoint's real names.
CHECKPOINTS = {
    "Phi3VForCausalLM": (
        "phi3_v",
        {
            "model.embed_tokens.weight": (64, 8),
            "model.layers.0.self_attn.qkv_proj.weight": (24, 8),
            "lm_head.weight": (64, 8),
            "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight": (4, 3, 2, 2),
            "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight": (6, 4),
            "model.vision_embed_tokens.img_projection.0.weight": (8, 16),
            "model.vision_embed_tokens.glb_GN": (1, 1, 16),
            "model.vision_embed_tokens.sub_GN": (1, 1, 1, 16),
        },
    ),
    "Phi4MMForCausalLM": (
        "phi4mm",
        {
            "model.embed_tokens.weight": (64, 8),
            "model.layers.0.self_attn.qkv_proj.base_layer.weight": (24, 8),
            "model.layers.0.self_attn.qkv_proj.lora_A.vision.weight": (2, 8),
            "model.layers.0.self_attn.qkv_proj.lora_B.speech.weight": (24, 2),
            "model.embed_tokens_extend.image_embed.img_processor.encoder.layers.0.mlp.fc1.weight": (6, 4),
            "model.embed_tokens_extend.image_embed.img_projection.0.weight": (8, 16),
            "model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_in.net.0.linear.weight": (10, 5),
            "model.embed_tokens_extend.audio_embed.audio_projection.speech.0.weight": (8, 5),
        },
    ),
    "Phi4MultimodalForCausalLM": (
        "phi4_multimodal",
        {
            # transformers' native names (a tiny Phi4MultimodalForCausalLM saved by transformers 4.53.3).
            "model.embed_tokens.weight": (64, 8),
            "model.layers.0.self_attn.qkv_proj.weight": (24, 8),
            "model.embed_tokens_extend.image_embed.img_processor.embeddings.patch_embedding.weight": (4, 3, 2, 2),
            "model.embed_tokens_extend.image_embed.img_projection_up.weight": (8, 16),
            "model.embed_tokens_extend.image_embed.global_img_feature_extensor": (1, 1, 4),
            "model.embed_tokens_extend.audio_embed.encoder.embed.conv.0.weight": (4, 1, 3, 3),
            "model.embed_tokens_extend.audio_embed.up_proj_for_speech.weight": (8, 4),
        },
    ),
    "Phi4ForCausalLMV": (
        "phi4-siglip",
        {
            "model.embed_tokens.weight": (64, 8),
            "lm_head.weight": (64, 8),
            # The names llama.cpp's Phi4VisionMmprojModel reads: the SigLIP2 tower under
            # model.vision_tower.vision_tower, a two-layer projector (Linear, GELU, Linear) as mm_projector.
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": (4, 12),
            "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (16, 4),
            "model.mm_projector.0.weight": (8, 4),
            "model.mm_projector.2.weight": (8, 8),
        },
    ),
}


def _checkpoint(folder: Path, architecture: str) -> Path:
    model_type, tensors = CHECKPOINTS[architecture]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
    weights = {name: np.zeros(shape, dtype=np.float16) for name, shape in tensors.items()}
    save_file(weights, folder / "model.safetensors")
    return folder


def test_each_tensor_goes_to_its_part() -> None:
    expected = {
        "Phi3VForCausalLM": {"language model": 64 * 8 * 2 + 24 * 8, "vision encoder": 48 + 24, "vision projector": 160},
        "Phi4MMForCausalLM": {
            "language model": 64 * 8 + 24 * 8,
            "LoRA adapters": 16 + 48,
            "vision encoder": 24,
            "vision projector": 128,
            "audio encoder": 50,
            "audio projector": 40,
        },
        "Phi4MultimodalForCausalLM": {
            "language model": 64 * 8 + 24 * 8,
            "vision encoder": 48,
            "vision projector": 128 + 4,
            "audio encoder": 36,
            "audio projector": 32,
        },
        "Phi4ForCausalLMV": {"language model": 1024, "vision encoder": 48 + 64, "vision projector": 32 + 64},
    }
    for architecture, (_, tensors) in CHECKPOINTS.items():
        header = {name: {"shape": list(shape)} for name, shape in tensors.items()}
        counted = parts([header])
        assert counted == expected[architecture], architecture
        assert list(counted) == [part for part in PARTS if part in counted], "reported in PARTS order"
    assert part_of("model.layers.3.mlp.gate_up_proj.weight") == "language model"


@pytest.mark.parametrize("architecture", sorted(set(CHECKPOINTS) - set(BUILT_VISION)))
def test_a_vision_checkpoint_is_refused_with_its_parts_and_the_route_per_format(
    architecture: str, tmp_path: Path
) -> None:
    model = _checkpoint(tmp_path / "vision-model", architecture)
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", str(model), "--precision", "int4", "--output", str(out), "--no-track")
    assert code == 1 and "Traceback" not in err, err
    assert "vision-model is a " in err and f"({architecture}, " in err, err
    assert "language model" in err and "vision encoder" in err and "vision projector" in err
    if architecture == "Phi3VForCausalLM":
        assert "parameters: language model 1,216, vision encoder 72, vision projector 160)" in err, err
        assert "--task image-text-to-text --trust-remote-code" in err and "run by openvino-genai's VLMPipeline" in err
    assert "hubquant builds Phi-4 with a SigLIP2 tower (Phi4ForCausalLMV, as GGUF and MLX) and transformers' " in err
    assert "supports the Microsoft Phi family only" not in err
    assert "VLMPipeline" in err and "mlx-vlm" in err
    assert "onnxruntime-genai's builder makes the text decoder only" in err
    assert "llama.cpp's converter has no support for it" in err
    assert not out.exists(), "refused before anything was written"


def test_publish_dry_run_refuses_a_vision_source_the_same_way(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "phi-3.5-vision", "Phi3VForCausalLM")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "source": str(model),
                "output": str(tmp_path / "out"),
                "variants": [{"format": "gguf", "precision": "Q4_K_M"}],
                "hub": {"namespace": "ns"},
            }
        )
    )
    code, _, err = run_cli("publish", str(recipe), "--dry-run", "--stage-dir", str(tmp_path / "stage"))
    assert code == 1 and "Phi-3/3.5-vision model (Phi3VForCausalLM, 'phi3_v'" in err, err
    assert not (tmp_path / "stage").exists() and not (tmp_path / "out").exists()


# -- Phi4ForCausalLMV through GGUF: the language model plus its mmproj, read by llama.cpp's mtmd ------------------
@pytest.fixture(scope="module")
def vision_publish(
    tiny_phi4_vision: Path, tmp_path_factory: pytest.TempPathFactory, shared_references: Path, mlx_vision_env: Path
) -> dict:
    """One dry-run publish of the tiny Phi4ForCausalLMV: two GGUF variants and one of each other format."""
    variants = [
        {"format": "gguf", "precision": "Q4_K_M"},
        {"format": "gguf", "precision": "F16"},
        {"format": "onnx", "precision": "int4"},
        {"format": "openvino", "precision": "int8"},
        {"format": "mlx", "precision": "4bit"},
    ]
    tmp = tmp_path_factory.mktemp("vision-publish")
    return publish_dry_run(tmp, shared_references, tiny_phi4_vision, variants, "vision")


def test_a_phi4_vision_source_is_read_with_its_parts(tiny_phi4_vision: Path) -> None:
    from hubquant.source import resolve_source

    source = resolve_source(tiny_phi4_vision)
    assert source.architecture == "Phi4ForCausalLMV" and source.model_type == "phi3"
    assert source.vision_parts is not None and list(source.vision_parts) == [
        "language model",
        "vision encoder",
        "vision projector",
    ]
    assert source.language_parameters == source.vision_parts["language model"] < source.parameter_count
    assert source.facts()["vision_parts"] == source.vision_parts


def test_gguf_and_mlx_carry_the_picture_encoder_and_the_other_formats_refuse(vision_publish: dict) -> None:
    code, err, out = vision_publish["code"], vision_publish["err"], vision_publish["tmp"] / "out"
    assert code == 1 and "Traceback" not in err, err  # the refused variants are failures; the rest is published
    for fmt, why in (("onnx", "builder makes the text decoder only"), ("openvino", "not Phi4ForCausalLMV")):
        assert f"{fmt} cannot carry tiny-phi4-vision (Phi4ForCausalLMV) with its vision encoder" in err, err
        assert why in err, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["gguf-F16", "gguf-Q4_K_M", "mlx-4bit-g64"]
    manifest = json.loads((out / "gguf-Q4_K_M" / "manifest.json").read_text())
    roles = {entry["path"]: entry["role"] for entry in manifest["files"]}
    assert roles == {
        "tiny-phi4-vision-Q4_K_M.gguf": "model",
        "mmproj-tiny-phi4-vision-F16.gguf": "vision projector",
        "mmproj-tiny-phi4-vision-Q8_0.gguf": "vision projector",
    }
    assert manifest["settings"]["mmproj"] == {
        "F16": "mmproj-tiny-phi4-vision-F16.gguf",
        "Q8_0": "mmproj-tiny-phi4-vision-Q8_0.gguf",
    }
    assert manifest["source"]["vision_parts"]["vision encoder"] > 0
    # Both variants carry the same projector bytes (built once per run).
    digests = {
        folder: {e["path"]: e["sha256"] for e in json.loads((out / folder / "manifest.json").read_text())["files"]}
        for folder in ("gguf-F16", "gguf-Q4_K_M")
    }
    for name in ("mmproj-tiny-phi4-vision-F16.gguf", "mmproj-tiny-phi4-vision-Q8_0.gguf"):
        assert digests["gguf-F16"][name] == digests["gguf-Q4_K_M"][name]


def test_each_variant_reads_the_pictures_in_llama_cpp(vision_publish: dict) -> None:
    import numpy as np

    from hubquant.artifact import load_artifact
    from hubquant.exporters import get_exporter
    from hubquant.images import IMAGE_PROMPTS
    from hubquant.stats import kl_divergence

    artifact = load_artifact(vision_publish["tmp"] / "out" / "gguf-Q4_K_M")
    exporter = get_exporter("gguf")()
    assert exporter.image_projectors(artifact) == ["F16", "Q8_0"]
    reader = exporter.image_reader(artifact, "F16")
    try:
        first, second = IMAGE_PROMPTS[0], IMAGE_PROMPTS[1]
        answer = reader.answer_logits(first.question, first.answer, first.pixels())
        again = reader.answer_logits(first.question, first.answer, first.pixels())
        other = reader.answer_logits(first.question, first.answer, second.pixels())
    finally:
        reader.close()
    assert answer.ndim == 2 and answer.shape[0] >= 5 and np.isfinite(answer).all()
    assert np.array_equal(answer, again), "the same picture and prompt give the same logits"
    assert kl_divergence(answer, other).mean() > 1e-5, "the picture moves the answer"


def test_the_picture_figures_are_measured_tracked_and_carded(vision_publish: dict) -> None:
    tmp = vision_publish["tmp"]
    q4 = json.loads((tmp / "out" / "gguf-Q4_K_M" / "eval.json").read_text())
    f16 = json.loads((tmp / "out" / "gguf-F16" / "eval.json").read_text())
    assert q4["metrics"]["kl_mean"] > 0 and q4["fidelity"]["origin"] == "variant", "F16 is the floor"
    scores = {s["projector"]: s for s in q4["image"]["scores"]}
    floor = {s["projector"]: s for s in f16["image"]["scores"]}
    assert q4["image"]["prompts"] == 4 and set(scores) == {"F16", "Q8_0"}
    assert "transformers has no class for Phi4ForCausalLMV" in q4["image"]["baseline"]
    for score in scores.values():
        assert score["quant_kl_mean"] > 0 and 0 < score["quant_kl_mean_stderr"] < score["quant_kl_mean"]
        assert 0.5 < score["quant_top1_agreement"] <= 1 and score["image_effect_kl"] > 0
    assert floor["F16"]["quant_kl_mean"] is None, "the floor itself"
    # The Q8_0 projector alone moves the answers far less than 4-bit language-model weights do.
    assert 0 < floor["Q8_0"]["quant_kl_mean"] < scores["F16"]["quant_kl_mean"] / 10
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vision")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`hubquant.format` = 'gguf'")
    metrics = {run.data.tags.get("hubquant.precision"): run.data.metrics for run in runs}
    assert metrics["Q4_K_M"]["image.F16.quant_kl_mean"] == pytest.approx(scores["F16"]["quant_kl_mean"])
    failed = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert {run.data.tags.get("hubquant.format") for run in failed} == {"onnx", "openvino"}
    staged = tmp / "stage" / "ns" / "tiny-phi4-vision-GGUF" / "files"
    assert sorted(p.name for p in staged.glob("*.gguf")) == [
        "mmproj-tiny-phi4-vision-F16.gguf",
        "mmproj-tiny-phi4-vision-Q8_0.gguf",
        "tiny-phi4-vision-F16.gguf",
        "tiny-phi4-vision-Q4_K_M.gguf",
    ]
    card = (staged / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "- vision" in card
    assert "### Reading pictures" in card and "| Q4_K_M | Q8_0 |" in card
    assert "--mmproj mmproj-tiny-phi4-vision-F16.gguf --image" in card and "llama-mtmd-cli" in card
    assert "vision encoder 74,304" in card
    assert not (tmp / "stage" / "ns" / "tiny-phi4-vision-ONNX").exists()


# -- Phi4ForCausalLMV through MLX: converted and read by mlx-vlm in the mlx-vision environment ------------------
def test_mlx_builds_the_vision_model_with_mlx_vlm_and_scores_its_pictures(vision_publish: dict) -> None:
    tmp = vision_publish["tmp"]
    folder = tmp / "out" / "mlx-4bit-g64"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["vision_weights"] == "fp16", "mlx-vlm keeps the tower unquantized, at 16 bits"
    assert any("keeps the vision tower and projector unquantized (fp16)" in w for w in manifest["warnings"])
    config = json.loads((folder / "config.json").read_text())
    # the staged config mlx-vlm converted from: the language model's own keys, the rope base it reads
    assert config["text_config"]["num_hidden_layers"] == 2 and config["text_config"]["rope_theta"] == 10000.0
    evaluation = json.loads((folder / "eval.json").read_text())
    assert evaluation["fidelity"]["kl_mean"] < 1e-6, "MLX's fp32 floor computes the original's text logits"
    (score,) = evaluation["image"]["scores"]
    assert score["projector"] == "fp16" and evaluation["image"]["prompts"] == 4
    assert 0 < score["quant_kl_mean_stderr"] < score["quant_kl_mean"] and score["image_effect_kl"] > 0
    assert 0.5 < score["quant_top1_agreement"] <= 1
    assert "MLX's own unquantized form (fp32 with the fp32 picture encoder)" in evaluation["image"]["baseline"]
    card = (tmp / "stage" / "ns" / "tiny-phi4-vision-4bit" / "files" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "mlx_vlm.generate --model ns/tiny-phi4-vision-4bit" in card
    assert "### Reading pictures" in card


def test_the_mlx_variant_answers_about_a_picture_in_mlx_vlm(vision_publish: dict, mlx_vision_env: Path) -> None:
    script = """
import sys
from pathlib import Path
from hubquant.exporters.mlx_vision import MLXVisionReader
from hubquant.images import IMAGE_PROMPTS
from hubquant.stats import kl_divergence
reader = MLXVisionReader(Path(sys.argv[1]))
first, second = IMAGE_PROMPTS[0], IMAGE_PROMPTS[1]
answer = reader.answer_logits(first.question, first.answer, first.pixels())
other = reader.answer_logits(first.question, first.answer, second.pixels())
assert answer.ndim == 2 and answer.shape[0] >= 5 and (answer == answer).all(), answer.shape
assert kl_divergence(answer, other).mean() > 1e-5, "the picture moves the answer"
print("ok")
"""
    folder = vision_publish["tmp"] / "out" / "mlx-4bit-g64"
    done = subprocess.run([str(mlx_vision_env), "-c", script, str(folder)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_mlx_vlm_converts_a_completed_copy_of_the_config(tmp_path: Path) -> None:
    from hubquant.errors import ExportError
    from hubquant.exporters.mlx_vision import staged_source

    source = tmp_path / "source"
    source.mkdir()
    config = {
        "model_type": "phi4-siglip",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    }
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes(b"weights")
    staged = staged_source(source, tmp_path / "staged")
    written = json.loads((staged / "config.json").read_text())
    assert written["text_config"] == {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "rope_theta": 10000.0,
        "model_type": "phi4-siglip",
    }, "mlx-vlm rebuilds the language model from text_config alone"
    assert (staged / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((source / "config.json").read_text()) == config, "the user's folder is never written"
    config["rope_parameters"] = {"rope_type": "longrope", "long_factor": [2.0], "short_factor": [1.0]}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="applies no longrope rope scaling"):
        staged_source(source, tmp_path / "again")


def test_hubquant_tiny_builds_a_vision_checkpoint(tmp_path: Path) -> None:
    code, out, err = run_cli("tiny", str(tmp_path / "tiny-vision"), "--vision", "--steps", "0")
    assert code == 0, err
    folder = Path(out.strip())
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Phi4ForCausalLMV"] and config["vision_config"]["patch_size"] == 4
    assert json.loads((folder / "preprocessor_config.json").read_text())["max_num_patches"] == 64
    code, _, err = run_cli("tiny", str(tmp_path / "other"), "--vision", "--style", "phi4")
    assert code == 1 and "--vision builds on the phi3 style" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()
