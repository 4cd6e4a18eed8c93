"""The runners of GGUF variants: llama-cpp-python on token ids (:class:`GGUFRunner`); on pictures, see
:mod:`hubquant.exporters.gguf_vision`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.exporters.gguf_tools import route_llama_logs
from hubquant.exporters.runner import Runner

if TYPE_CHECKING:
    import numpy as np


class GGUFRunner(Runner):
    """llama-cpp-python with every position's logits kept."""

    def __init__(self, path: Path, *, context_length: int) -> None:
        from llama_cpp import Llama

        route_llama_logs()
        self._llama = Llama(
            model_path=str(path),
            n_ctx=context_length,
            n_batch=min(context_length, 512),
            logits_all=True,
            verbose=False,
            n_threads=os.cpu_count() or 1,
            seed=0,
        )

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        self._llama.reset()
        self._llama.eval(list(ids))
        return np.array(self._llama.scores[: len(ids)], dtype=np.float32, copy=True)

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        self._llama.reset()
        return self._eval_last(ids)

    def step(self, token: int) -> int:
        return self._eval_last([token])

    def _eval_last(self, ids: Sequence[int]) -> int:
        """Evaluate ids asking llama.cpp for the last position's logits only, as generation does.

        The model is loaded with every position's logits kept (for :meth:`logits`); generating with
        that on would also pay the LM head on every prompt token, which no llama.cpp user pays.
        """
        import numpy as np

        llama = self._llama
        keep_all, llama._logits_all = llama._logits_all, False
        try:
            llama.eval(list(ids))
            last = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),))
            return int(np.argmax(last))
        finally:
            llama._logits_all = keep_all

    def close(self) -> None:
        self._llama.close()
