"""A tiny ``Phi4ForCausalLMV`` checkpoint: a trained tiny Phi-3 language model with a SigLIP2 vision tower
and a two-layer projector, in the layout llama.cpp's converter reads (issue 19).

Phi-4 with a SigLIP2 tower is the one Phi vision model llama.cpp converts: the language model to one GGUF,
the tower and projector to an ``mmproj`` GGUF. Its checkpoint holds only a config, a preprocessor config and
tensors — no remote code — so a tiny one is written here offline:

- ``config.json``: the text model's Phi-3 config with ``architectures: [Phi4ForCausalLMV]``, ``model_type:
  phi4-siglip``, the tower's name and the projector keys, as the real checkpoints have them, and a
  ``vision_config`` (SigLIP2: hidden 64, 2 layers, 2 heads, patch 4, an 8×8 grid of position embeddings);
- ``preprocessor_config.json``: the patch size and the smallest and largest number of patches;
- the tensors ``model.vision_tower.vision_tower.vision_model.*`` (the patch embedding a Linear over
  ``patch² × 3`` pixels, as SigLIP2's NaFlex form has it) and ``model.mm_projector.{0,2}.*``.

The vision weights are random (seeded): nothing here is trained to see. They are scaled so the projected
picture is as large as a token embedding, so a picture moves the answer measurably and a quantized
projector or language model changes that answer by a measurable amount.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from hubquant.paths import cache_root

#: SigLIP2 tower of the tiny model: hidden, FFN, layers, heads, patch side, side of the position grid.
HIDDEN, FFN, LAYERS, HEADS, PATCH, GRID = 64, 128, 2, 2, 4, 8
#: Bump when the builder changes what it writes, so caches rebuild.
VISION_BUILDER_VERSION = 3

PREFIX = "model.vision_tower.vision_tower.vision_model."


def _vision_tensors(text_hidden: int, embedding_rms: float, seed: int) -> dict[str, "object"]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.02) -> "np.ndarray":
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix: str) -> dict[str, "np.ndarray"]:
        return {prefix + ".weight": np.ones(HIDDEN, np.float32), prefix + ".bias": np.zeros(HIDDEN, np.float32)}

    tensors = {
        PREFIX + "embeddings.patch_embedding.weight": weight(HIDDEN, PATCH * PATCH * 3, scale=0.2),
        PREFIX + "embeddings.patch_embedding.bias": weight(HIDDEN),
        PREFIX + "embeddings.position_embedding.weight": weight(GRID * GRID, HIDDEN),
        **norm(PREFIX + "post_layernorm"),
    }
    for index in range(LAYERS):
        layer = f"{PREFIX}encoder.layers.{index}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[f"{layer}self_attn.{name}.weight"] = weight(HIDDEN, HIDDEN, scale=HIDDEN**-0.5)
            tensors[f"{layer}self_attn.{name}.bias"] = weight(HIDDEN)
        tensors.update(norm(layer + "layer_norm1"))
        tensors.update(norm(layer + "layer_norm2"))
        tensors[layer + "mlp.fc1.weight"] = weight(FFN, HIDDEN, scale=HIDDEN**-0.5)
        tensors[layer + "mlp.fc1.bias"] = weight(FFN)
        tensors[layer + "mlp.fc2.weight"] = weight(HIDDEN, FFN, scale=FFN**-0.5)
        tensors[layer + "mlp.fc2.bias"] = weight(HIDDEN)
    # Linear, GELU, Linear into the language model's embedding space, at a token embedding's size.
    tensors["model.mm_projector.0.weight"] = weight(text_hidden, HIDDEN, scale=HIDDEN**-0.5)
    tensors["model.mm_projector.0.bias"] = weight(text_hidden)
    tensors["model.mm_projector.2.weight"] = weight(
        text_hidden, text_hidden, scale=embedding_rms * 2 * text_hidden**-0.5
    )
    tensors["model.mm_projector.2.bias"] = weight(text_hidden)
    return tensors


def add_vision_tower(text_model: str | Path, output: str | Path, *, seed: int = 0) -> Path:
    """Write ``output``: the tiny text checkpoint ``text_model`` turned into a ``Phi4ForCausalLMV``.

    Raises:
        FileExistsError: ``output`` exists.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from hubquant.artifact import atomic_folder

    text_model = Path(text_model)
    with atomic_folder(Path(output)) as folder:
        for item in text_model.iterdir():
            if item.is_file():
                shutil.copy2(item, folder / item.name)
        config = json.loads((folder / "config.json").read_text())
        # The real checkpoints' keys, which mlx-vlm's phi4_siglip reads too (a NaFlex tower: pictures as patches).
        config.update(
            architectures=["Phi4ForCausalLMV"],
            model_type="phi4-siglip",
            mm_vision_tower="google/siglip2-so400m-patch16-naflex",
            mm_hidden_size=HIDDEN,
            mm_projector_type="mlp2x_gelu",
            min_num_patches=16,
            max_num_patches=GRID * GRID,
        )
        config["vision_config"] = {
            "model_type": "siglip2_vision_model",
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_channels": 3,
            "patch_size": PATCH,
            "num_patches": GRID * GRID,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        preprocessor = {
            "patch_size": PATCH,
            "min_num_patches": 16,
            "max_num_patches": GRID * GRID,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        tensors = load_file(folder / "model.safetensors")
        embedding = tensors["model.embed_tokens.weight"].astype(np.float32)
        rms = float(np.sqrt((embedding**2).mean(axis=-1)).mean())
        tensors.update(_vision_tensors(int(config["hidden_size"]), rms, seed))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        readme = folder / "README.md"
        if readme.is_file():
            readme.write_text(
                readme.read_text().replace("Phi checkpoint", "Phi-4-with-SigLIP2-shaped vision checkpoint", 1)
                + "\nIts vision tower and projector are random (seeded): they are there to be converted and run.\n"
            )
    return Path(output)


def tiny_phi4_vision(*, seed: int = 0, steps: int = 300) -> Path:
    """Return a cached tiny ``Phi4ForCausalLMV``, built on first use from the cached tiny Phi-3."""
    from hubquant.tiny import BUILDER_VERSION, tiny_phi

    text = tiny_phi("phi3", seed=seed, steps=steps)
    key = hashlib.sha256(f"{text.name}:{seed}:{BUILDER_VERSION}:{VISION_BUILDER_VERSION}".encode()).hexdigest()[:12]
    path = cache_root() / "tiny" / f"tiny-phi4-vision-{key}"
    if not (path / "config.json").is_file():
        if path.exists():
            shutil.rmtree(path)
        try:
            add_vision_tower(text, path, seed=seed)
        except FileExistsError:
            pass  # another process finished it first
    return path
