"""A tiny native Phi-4-multimodal (transformers' ``Phi4MultimodalForCausalLM``): the trained tiny Phi-3
language model with a random SigLIP tower, projector and audio encoder (issue 19).

It is written by transformers 4.53.3 in the vision environment (``python -m hubquant.tiny_multimodal TEXT
OUT``), the version optimum-intel exports it with, so the checkpoint is what a real one looks like to the
exporter. The tower keeps the real model's picture geometry (448-pixel crops of 14-pixel patches: the
processor's token count and optimum-intel's dummy inputs assume it) at a tiny width (hidden 64, 2 layers).
The tokenizer gains ``<|image|>`` and ``<|audio|>`` (ids 2011 and 2012, inside the 2048-row vocabulary).
The language model's weights are the tiny Phi-3's, bit for bit; the rest is seeded random.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

#: Bump when the builder changes what it writes, so caches rebuild.
MULTIMODAL_BUILDER_VERSION = 1
#: The language model's config keys carried over from the tiny Phi-3.
TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "sliding_window",
)


def build(text_model: Path, output: Path, *, seed: int = 0) -> None:
    """Write the checkpoint (run in the vision environment: transformers 4.53.3)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Phi4MultimodalConfig, Phi4MultimodalForCausalLM
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import (
        Phi4MultimodalAudioConfig,
        Phi4MultimodalVisionConfig,
    )

    from hubquant.artifact import atomic_folder

    text = json.loads((text_model / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(text_model, extra_special_tokens={})  # 5.x writes a list there
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|audio|>"]}, False)
    image_id, audio_id = tokenizer.convert_tokens_to_ids(["<|image|>", "<|audio|>"])
    vision = Phi4MultimodalVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_token_id=image_id
    )
    audio = Phi4MultimodalAudioConfig(
        hidden_size=64,
        intermediate_size=128,
        num_blocks=2,
        num_attention_heads=2,
        nemo_conv_channels=64,
        depthwise_seperable_out_channel=64,
        ext_pw_out_channel=64,
        depthwise_multiplier=1,
        kernel_size=3,
        audio_token_id=audio_id,
    )
    rope = text.get("rope_parameters") or {}
    config = Phi4MultimodalConfig(
        **{key: text[key] for key in TEXT_KEYS if key in text},
        rope_theta=rope.get("rope_theta", text.get("rope_theta", 10000.0)),
        partial_rotary_factor=rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)),
        rope_scaling=None,
        vision_config=vision,
        audio_config=audio,
    )
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(config).eval()
    missing, _ = model.load_state_dict(load_file(text_model / "model.safetensors"), strict=False)
    if any(not name.startswith("model.embed_tokens_extend.") for name in missing):
        raise RuntimeError(f"the tiny Phi-3's weights do not cover the language model: {missing[:3]}")
    with atomic_folder(output) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name in ("LICENSE", "README.md"):
            if (text_model / name).is_file():
                shutil.copy2(text_model / name, folder / name)


def add_multimodal(text_model: Path, output: Path, *, seed: int = 0) -> Path:
    """Write ``output`` from the tiny text checkpoint, in the vision environment (created on first need)."""
    from hubquant.child import run_child
    from hubquant.errors import SourceError
    from hubquant.vision_env import ensure_env

    python = ensure_env()
    command = [str(python), "-m", "hubquant.tiny_multimodal", str(text_model), str(output), str(seed)]
    child = run_child(command, name="tiny multimodal")
    if child.returncode != 0:
        raise SourceError(f"could not build the tiny Phi-4-multimodal: {child.reason()}", path=output)
    return output


if __name__ == "__main__":
    import hubquant  # noqa: F401 - hides a torchvision that cannot load beside this torch

    build(Path(sys.argv[1]), Path(sys.argv[2]), seed=int(sys.argv[3]) if len(sys.argv) > 3 else 0)
