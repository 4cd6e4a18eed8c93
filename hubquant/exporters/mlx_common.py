"""What both MLX routes (mlx-lm for text, mlx-vlm for vision: :mod:`hubquant.exporters.mlx_vision`) share:
the precisions, the rope keys MLX's Phi models read, and the runner that feeds a model token ids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.exporters.runner import Runner

if TYPE_CHECKING:
    import numpy as np

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


class MLXRunner(Runner):
    """mlx-lm's model, fed token ids directly (mlx-vlm's language model: ``MLXVisionRunner``)."""

    def __init__(self, path: Path) -> None:
        import mlx.core as mx
        from mlx_lm import load

        self._mx = mx
        self.model, self.tokenizer = load(str(path))
        self._cache: Any = None

    def _forward(self, ids: Any, cache: Any) -> Any:
        """The logits ``[1, n, vocab]`` after ``ids`` ``[1, n]`` (on top of ``cache`` when given)."""
        return self.model(ids, cache=cache)

    def _new_cache(self) -> Any:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        mx = self._mx
        out = self._forward(mx.array([list(ids)]), None)[0].astype(mx.float32)
        mx.eval(out)
        return np.array(out, dtype=np.float32)

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        self._cache = self._new_cache()
        return self._next(self._mx.array([list(ids)]))

    def step(self, token: int) -> int:
        return self._next(self._mx.array([[token]]))

    def _next(self, ids: Any) -> int:
        token = self._mx.argmax(self._forward(ids, self._cache)[0, -1])
        self._mx.eval(token)
        return int(token.item())

    def close(self) -> None:
        del self.model
