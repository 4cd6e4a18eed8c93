"""The inputs Phi-4-multimodal reads a built-in picture from, made the same way for every runtime (issue 19).

transformers' ``Phi4MultimodalProcessor`` cannot run here (its only image processor needs torchvision), so
hubquant makes the model's inputs itself, with numpy and the checkpoint's ``tokenizer.json``, and hands the
very same ids and pixels to the PyTorch reference (in the vision environment) and to the OpenVINO
variants. What it makes is what the processor makes for a picture whose sides are one crop (448 pixels):

- the 64-pixel picture is enlarged 7× by repeating pixels (exact, no resampling; the processor would resize
  it bicubically), scaled to [-1, 1] (mean 0.5, std 0.5);
- ``image_pixel_values`` ``[1, 2, 3, 448, 448]``: the global view and the one crop, the same pixels;
- ``image_attention_mask`` all ones ``[1, 2, 32, 32]`` (no padding), ``image_sizes`` ``[[448, 448]]``;
- the picture's place in the prompt holds 545 image tokens: 256 + 1 + 256 + 16 + 16, the processor's
  count for one crop (the global view's 16×16 features with a separator per row, one global separator,
  the crop's 16×16 with its row separators).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.images import SIDE, prompt_text

if TYPE_CHECKING:
    import numpy as np

#: Side of the crop the SigLIP encoder reads, and of its patches.
CROP, PATCH = 448, 14
#: Image tokens of a one-crop picture (see the module text).
IMAGE_TOKENS = 256 + 1 + 256 + 16 + 16
#: The marker the picture's tokens replace.
MARKER = "<|image|>"


def pixel_values(pixels: np.ndarray) -> np.ndarray:
    """``[1, 2, 3, 448, 448]`` float32: the picture enlarged to one crop, as the global view and the crop."""
    import numpy as np

    if pixels.shape != (SIDE, SIDE, 3) or CROP % SIDE:
        raise ValueError(f"a {pixels.shape} picture is not one {CROP}-pixel crop when enlarged")
    big = np.repeat(np.repeat(pixels, CROP // SIDE, axis=0), CROP // SIDE, axis=1)
    view = ((big.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return np.stack([view, view])[None].astype(np.float32)


def image_attention_mask() -> np.ndarray:
    import numpy as np

    return np.ones((1, 2, CROP // PATCH, CROP // PATCH), dtype=bool)


def image_sizes() -> np.ndarray:
    import numpy as np

    return np.array([[CROP, CROP]], dtype=np.int64)


class PromptIds:
    """Token ids of a picture prompt and its answer, from the checkpoint's ``tokenizer.json``."""

    def __init__(self, folder: Path, image_token_id: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.image_token_id = image_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def __call__(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(the prompt with the picture's tokens in place of its marker, the answer)."""
        before, _, after = prompt_text(question, MARKER).partition(MARKER)
        head = self._encode(before) + [self.image_token_id] * IMAGE_TOKENS + self._encode(after)
        return head, self._encode(answer)
