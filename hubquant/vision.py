"""Phi vision models: recognised, their parts counted, built in the formats whose tools carry them with
their picture encoder, and refused elsewhere with what each format's tools can do with them (issue 19).

``Phi4ForCausalLMV`` is built as GGUF: its language model is a Phi-3, and llama.cpp's converter writes it as
a language-model GGUF plus an ``mmproj`` GGUF that llama.cpp's ``mtmd`` runs on pictures
(:mod:`hubquant.exporters.gguf_vision`); and as MLX, converted and read by mlx-vlm in an environment of its
own (:mod:`hubquant.exporters.mlx_vision`). transformers' native ``Phi4MultimodalForCausalLM`` is built as
OpenVINO, exported by optimum-intel in an environment of its own (:mod:`hubquant.exporters.openvino_vision`).
Each is refused per variant by the formats that cannot carry it, saying why. The remote-code vision
architectures (``phi3_v``, ``phi4mm``) are refused before any work, with their parts and the route per format.

A vision checkpoint is a Phi language model plus a vision encoder and a projector into the language
model's embeddings (Phi-4-multimodal adds an audio encoder and LoRA adapters). hubquant names each
part with its parameter count, from the safetensors headers alone, so the user sees what they hold
and what to run instead, before any weight is read.

The parts come from the tensor names the checkpoints use:

- ``Phi3VForCausalLM`` (``phi3_v``, remote code): ``model.vision_embed_tokens.img_processor.*``
  (CLIP ViT-L/14), ``model.vision_embed_tokens.img_projection.*`` and the ``glb_GN``/``sub_GN``
  separators (projector);
- ``Phi4MMForCausalLM`` (``phi4mm``, remote code) and transformers' ``Phi4MultimodalForCausalLM``
  (``phi4_multimodal``): ``model.embed_tokens_extend.image_embed.*`` (SigLIP encoder; projection
  ``img_projection*`` and the ``*_img_feature_extensor`` separators), ``model.embed_tokens_extend.audio_embed.*``
  (conformer encoder; projection ``audio_projection.*``, natively ``{up,down}_proj_for_*``), ``lora_A``/``lora_B``
  (the vision and speech LoRA adapters on the language model);
- ``Phi4ForCausalLMV`` (Phi-4 with a SigLIP2 tower, which llama.cpp's converter writes as a language
  model plus an ``mmproj``): ``model.vision_tower.vision_tower.*`` and ``model.mm_projector.{0,2}.*``,
  the names the converter's ``Phi4VisionMmprojModel`` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hubquant.display import count
from hubquant.errors import UnsupportedModelError

#: architecture → (what users call it, its model_type).
VISION_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Phi3VForCausalLM": ("Phi-3/3.5-vision", "phi3_v"),
    "Phi4MMForCausalLM": ("Phi-4-multimodal (remote code)", "phi4mm"),
    "Phi4MultimodalForCausalLM": ("Phi-4-multimodal (transformers)", "phi4_multimodal"),
    "Phi4ForCausalLMV": ("Phi-4 with a SigLIP2 vision tower", "phi4-siglip"),
}
VISION_MODEL_TYPES = {model_type: arch for arch, (_, model_type) in VISION_ARCHITECTURES.items()}
#: The vision architectures hubquant builds (each in the formats whose ``vision_architectures`` name it).
BUILT_VISION = ("Phi4ForCausalLMV", "Phi4MultimodalForCausalLM")
#: Why each format cannot carry a built vision architecture with its picture encoder, and what to use.
FORMAT_SUPPORT: dict[str, str] = {
    "gguf": "llama.cpp's converter has no class for {architecture} (its vision models include Phi4ForCausalLMV)",
    "onnx": "onnxruntime-genai's builder makes the text decoder only, without the vision encoder and embedding "
    "models that onnxruntime_genai.MultiModalProcessor needs",
    "openvino": "optimum-intel 2.2 exports phi3_v, phi4mm and phi4_multimodal for image-text-to-text, not "
    "{architecture}",
    "mlx": "mlx-vlm has no model for {architecture} (it runs phi3_v and phi4mm from their remote code, and "
    "phi4-siglip)",
}
#: Where one architecture's reason differs from its format's.
ARCHITECTURE_SUPPORT: dict[tuple[str, str], str] = {}

#: The parts, in the order they are reported.
PARTS = ("language model", "LoRA adapters", "vision encoder", "vision projector", "audio encoder", "audio projector")


def vision_architecture(config: Mapping[str, Any]) -> str | None:
    """The vision architecture a config declares (by architecture, else by model_type), or None."""
    for architecture in config.get("architectures") or []:
        if architecture in VISION_ARCHITECTURES:
            return str(architecture)
    return VISION_MODEL_TYPES.get(str(config.get("model_type")))


def part_of(name: str) -> str:
    """Which part a tensor belongs to, by its name (see the module text)."""
    if ".lora_A." in name or ".lora_B." in name:
        return "LoRA adapters"
    if "audio_embed" in name:
        return "audio projector" if "projection" in name or "_proj_for_" in name else "audio encoder"
    vision = ("vision_embed_tokens", "image_embed", "vision_tower", "vision_model", "img_processor")
    projector = ("img_projection", "projector", "glb_GN", "sub_GN", "img_feature_extensor")
    if any(key in name for key in projector) and (any(key in name for key in vision) or "projector" in name):
        return "vision projector"
    if any(key in name for key in vision):
        return "vision encoder"
    return "language model"


def parts(headers: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Parameter count of each part present, from safetensors headers, in :data:`PARTS` order."""
    totals: dict[str, int] = {}
    for header in headers:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in info.get("shape", []):
                numel *= int(dim)
            totals[part_of(name)] = totals.get(part_of(name), 0) + numel
    return {part: totals[part] for part in PARTS if part in totals}


def _routes(architecture: str) -> str:
    """What to run instead of hubquant for a refused (remote-code) vision model, per format, as the installed
    tools stand: their code cannot be fetched offline, so hubquant has never run it."""
    return "; ".join(
        (
            "GGUF: llama.cpp's converter has no support for it",
            "OpenVINO: optimum-cli export openvino --task image-text-to-text --trust-remote-code (optimum-intel 2.2 "
            "needs transformers<=4.53.3 for it: an environment of its own), run by openvino-genai's VLMPipeline",
            "MLX: mlx-vlm's convert (in an environment of its own)",
            "ONNX: onnxruntime-genai's builder makes the text decoder only; Microsoft's *-onnx repos ship "
            "the vision model set",
        )
    )


def format_refusal(fmt: str, name: str, architecture: str, carriers: list[str]) -> UnsupportedModelError:
    """The error of a variant whose format cannot carry a vision model with its picture encoder;
    ``carriers`` are the formats that can."""
    default = FORMAT_SUPPORT.get(fmt, f"hubquant's {fmt} exporter builds text models only")
    why = ARCHITECTURE_SUPPORT.get((fmt, architecture), default).format(architecture=architecture)
    return UnsupportedModelError(
        f"{fmt} cannot carry {name} ({architecture}) with its vision encoder: {why}",
        path=name,
        hint=f"build this model as {' or '.join(carriers) or 'a text model'}, and leave {fmt} out of the recipe",
    )


def vision_refusal(name: str, config: Mapping[str, Any], headers: Iterable[Mapping[str, Any]]) -> UnsupportedModelError:
    """The error for a vision checkpoint: what it is, its parts with their sizes, and where to build it."""
    architecture = vision_architecture(config) or "?"
    label, model_type = VISION_ARCHITECTURES.get(architecture, (architecture, str(config.get("model_type"))))
    sizes = ", ".join(f"{part} {count(n)}" for part, n in parts(headers).items())
    return UnsupportedModelError(
        f"{name} is a {label} model ({architecture}, '{config.get('model_type') or model_type}'; parameters: "
        f"{sizes}); of the vision models, hubquant builds Phi-4 with a SigLIP2 tower (Phi4ForCausalLMV, as GGUF "
        "and MLX) and transformers' Phi-4-multimodal (Phi4MultimodalForCausalLM, as OpenVINO) so far",
        path=name,
        hint=_routes(architecture),
    )
