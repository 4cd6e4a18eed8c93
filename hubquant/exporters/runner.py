"""What a loaded artifact offers the evaluation: logits for given ids, and two generation primitives
that the one speed routine (:meth:`Runner.measure_speed`) times the same way for every runtime."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    import numpy as np


# -- runners --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """Greedy generation speed; a figure that could not be measured is None with the reason."""

    prefill_tokens_per_second: float | None
    decode_tokens_per_second: float | None
    note: str | None = None


class Runner(ABC):
    """A loaded artifact: next-token logits for given ids, and the two generation primitives.

    Runtimes implement :meth:`logits`, :meth:`prefill` and :meth:`step`; speed is measured for
    every runtime by the one routine :meth:`measure_speed`, so a figure means the same in every row.
    """

    @abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits of shape ``[len(ids), vocab]`` from an empty state: row i scores the token after ``ids[: i + 1]``."""

    @abstractmethod
    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        """Start from an empty state, process ``ids`` and return the greedy next token.

        ``room`` is how many :meth:`step` calls will follow (a runtime may size its cache by it).
        """

    @abstractmethod
    def step(self, token: int) -> int:
        """Feed ``token`` after everything processed so far; return the greedy next token."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the runtime's memory."""

    @final
    def measure_speed(
        self, prompt: Sequence[int], new_tokens: int, *, clock: Callable[[], float] = time.perf_counter
    ) -> Speed:
        """Prefill and decode speed, greedy, after a short warm-up, on one clock for every runtime.

        Prefill covers processing ``prompt`` up to the first new token; decode covers the
        ``new_tokens`` tokens after it, one step each.
        """
        prompt = [int(t) for t in prompt]
        warm = prompt[: max(2, len(prompt) // 4)]
        token = self.prefill(warm, room=2)  # warm-up: caches, thread pools, lazy compilation
        for _ in range(2):
            token = self.step(token)
        started = clock()
        token = self.prefill(prompt, room=new_tokens)
        prefilled = clock()
        for _ in range(new_tokens):
            token = self.step(token)
        finished = clock()
        prefill, decode = prefilled - started, finished - prefilled
        notes = []
        if prefill <= 0:
            notes.append("prefill took no measurable time")
        if new_tokens and decode <= 0:
            notes.append("decode took no measurable time")
        return Speed(
            prefill_tokens_per_second=len(prompt) / prefill if prefill > 0 else None,
            decode_tokens_per_second=new_tokens / decode if decode > 0 and new_tokens else None,
            note="; ".join(notes) or None,
        )
