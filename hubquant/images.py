"""The built-in image prompts of image-conditioned fidelity: project-made pictures, drawn here with numpy
(no file to download, no licence to track), each with a question and the answer the variant is scored on.

Every variant of a vision model reads the same pictures with the same prompts; the answer is fed token
by token (teacher forcing) and the next-token distribution at every answer position is compared with the
same positions of the runtime's unquantized form: KL and top-1 agreement on the answer tokens, with their
standard errors, as the text figures are.

Each prompt is also read once more with another picture of the set, so the card can say how much the
picture moves the answer at all (the *image effect*): a quantization KL far below it changes what the
model reads in the picture far less than the picture itself does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: Side of every picture, in pixels (a runtime resizes it to what its encoder takes).
SIDE = 64


@dataclass(frozen=True)
class ImagePrompt:
    name: str
    question: str
    answer: str
    draw: Callable[[], "np.ndarray"]

    def pixels(self) -> "np.ndarray":
        """The picture: ``SIDE × SIDE × 3`` uint8 RGB, the same bytes on every machine."""
        import numpy as np

        image = self.draw()
        assert image.shape == (SIDE, SIDE, 3) and image.dtype == np.uint8
        return image


def _canvas(value: int = 255) -> "np.ndarray":
    import numpy as np

    return np.full((SIDE, SIDE, 3), value, dtype=np.uint8)


def _red_square() -> "np.ndarray":
    image = _canvas()
    image[16:48, 16:48] = (220, 20, 20)
    return image


def _blue_circle() -> "np.ndarray":
    import numpy as np

    image = _canvas()
    y, x = np.mgrid[:SIDE, :SIDE]
    image[(y - 32) ** 2 + (x - 32) ** 2 <= 20**2] = (20, 40, 210)
    return image


def _checkerboard() -> "np.ndarray":
    import numpy as np

    y, x = np.mgrid[:SIDE, :SIDE]
    black = ((y // 8) + (x // 8)) % 2 == 0
    image = _canvas()
    image[black] = (0, 0, 0)
    return image


def _green_gradient() -> "np.ndarray":
    import numpy as np

    image = _canvas(0)
    image[:, :, 1] = np.linspace(40, 250, SIDE, dtype=np.uint8)[None, :]
    return image


IMAGE_PROMPTS: tuple[ImagePrompt, ...] = (
    ImagePrompt("red-square", "What colour is the square?", "The square in the middle is red.", _red_square),
    ImagePrompt("blue-circle", "What shape is in the picture?", "A blue circle on a white background.", _blue_circle),
    ImagePrompt("checkerboard", "Describe the pattern.", "A black and white checkerboard.", _checkerboard),
    ImagePrompt(
        "green-gradient", "What colour is the image?", "Green, from dark on the left to light.", _green_gradient
    ),
)


def prompt_text(question: str, marker: str) -> str:
    """A Phi chat turn holding the picture's marker and the question, open for the assistant's answer."""
    return f"<|user|>\n{marker}\n{question}<|end|>\n<|assistant|>\n"
