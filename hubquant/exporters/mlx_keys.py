"""What both MLX routes (mlx-lm for text, mlx-vlm for vision: :mod:`hubquant.exporters.mlx_vision`) share:
the precisions and the rope keys MLX's Phi models read."""

from __future__ import annotations

from typing import Any

#: precision → (bits or None for a float dtype, float dtype name, mixed recipe or None)
MLX_PRECISIONS: dict[str, tuple[int | None, str | None, str | None]] = {
    "fp32": (None, "float32", None),
    "fp16": (None, "float16", None),
    "bf16": (None, "bfloat16", None),
    "8bit": (8, None, None),
    "6bit": (6, None, None),
    "5bit": (5, None, None),
    "4bit": (4, None, None),
    "3bit": (3, None, None),
    "2bit": (2, None, None),
    "mixed_2_6": (2, None, "mixed_2_6"),
    "mixed_3_4": (3, None, "mixed_3_4"),
    "mixed_3_6": (3, None, "mixed_3_6"),
    "mixed_4_6": (4, None, "mixed_4_6"),
}


def mlx_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level rope keys mlx-lm's phi3 reads, from a transformers 5 ``rope_parameters``."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    keys: dict[str, Any] = {}
    if "rope_theta" in rope and "rope_theta" not in config:
        keys["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope and "partial_rotary_factor" not in config:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
    kind = rope.get("rope_type") or rope.get("type")
    if kind in ("longrope", "su", "linear"):
        scaling = {"type": kind}
        for name in ("long_factor", "short_factor", "factor", "long_mscale", "short_mscale"):
            if name in rope:
                scaling[name] = rope[name]
        keys["rope_scaling"] = scaling
        if "original_max_position_embeddings" in rope and "original_max_position_embeddings" not in config:
            keys["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    return keys
