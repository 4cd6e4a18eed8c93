"""Measuring a variant against its source: one token stream, the same windows for every runtime.

The text is tokenized once with the source's Hugging Face tokenizer and those ids are fed to every
runtime (runtime tokenizers split SentencePiece whitespace differently). The ids are cut into
non-overlapping windows of ``context`` tokens; a window's first token is context only, every later
token is scored. Perplexity is ``exp(mean negative log-likelihood)`` over all scored tokens.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.errors import HubquantError, SourceError

if TYPE_CHECKING:
    import numpy as np

    from hubquant.exporters.base import Runner
    from hubquant.source import SourceModel

BUILTIN_TEXT = "calibration.txt"


class EvaluationError(HubquantError, ValueError):
    """The evaluation cannot run on the given text or artifacts."""


def read_text(path: str | Path | None) -> str:
    """The text at ``path``, or hubquant's built-in text when ``path`` is None.

    Raises:
        EvaluationError: unreadable or empty text.
    """
    if path is None:
        return importlib.resources.files("hubquant.data").joinpath(BUILTIN_TEXT).read_text(encoding="utf-8")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read text {path}: {exc}", hint="pass a readable UTF-8 text file") from None
    if not text.strip():
        raise EvaluationError(f"text {path} is empty", hint="pass a text with at least one window of tokens")
    return text


def token_windows(ids: Sequence[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of exactly ``context`` ids; the remainder shorter than a window is dropped.

    Raises:
        EvaluationError: fewer ids than one window.
    """
    if context < 2:
        raise EvaluationError(f"context length {context} is too small", hint="use a context length of at least 2")
    count = len(ids) // context
    if count == 0:
        raise EvaluationError(f"the text has {len(ids)} tokens, fewer than one window of {context}",
                              hint="use a longer text or a smaller context length")
    return [list(ids[i * context : (i + 1) * context]) for i in range(count)]


def tokenize(source: "SourceModel", text: str) -> list[int]:
    """Token ids of ``text`` from the source's Hugging Face tokenizer (no BOS/EOS added)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load the tokenizer of {source.name}: {exc}", path=source.path,
                          hint="check the tokenizer files of the source") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class TorchRunner:
    """The unquantized source in PyTorch (fp32 on CPU): the reference every variant is compared with."""

    def __init__(self, source: "SourceModel") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        self._model.eval()

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        with self._torch.inference_mode():
            out = self._model(input_ids=self._torch.tensor([list(ids)])).logits[0]
        return out.float().numpy()

    def close(self) -> None:
        del self._model


def log_softmax(logits: "np.ndarray") -> "np.ndarray":
    """Log-probabilities over the vocabulary, in float64 so tiny divergences are not lost to rounding."""
    import numpy as np

    scores = logits.astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: "np.ndarray", window: Sequence[int]) -> "np.ndarray":
    """Negative log-likelihood of tokens 1…n-1 of a window given the logits of positions 0…n-2."""
    import numpy as np

    targets = np.asarray(window[1:])
    return -log_softmax(logits[:-1])[np.arange(len(targets)), targets]


def kl_divergence(reference_logits: "np.ndarray", logits: "np.ndarray") -> "np.ndarray":
    """KL(reference ‖ variant) at every position: how far the variant's next-token distribution moved."""
    import numpy as np

    p, q = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def perplexity(runner: "Runner | TorchRunner", windows: list[list[int]]) -> float:
    """Perplexity of ``runner`` over ``windows`` (see the module docstring for the definition)."""
    import numpy as np

    nll = np.concatenate([window_nll(runner.logits(window), window) for window in windows])
    return float(np.exp(nll.mean()))


def perplexity_table(source: "SourceModel", artifacts: list, *, text_path: str | Path | None = None,
                     context: int = 256) -> list[dict[str, object]]:
    """Perplexity of the reference and of each artifact on the same windows (reference first).

    Each row: ``variant``, ``size`` (bytes), ``perplexity``, ``delta_pct`` (vs the reference).
    """
    from hubquant.exporters import get_exporter

    windows = token_windows(tokenize(source, read_text(text_path)), context)
    reference = TorchRunner(source)
    try:
        base = perplexity(reference, windows)
    finally:
        reference.close()
    weights = sum((source.path / name).stat().st_size for name in source.weight_files)
    rows: list[dict[str, object]] = [{"variant": f"reference ({source.dtype})", "size": weights, "perplexity": base,
                                      "delta_pct": 0.0}]
    for artifact in sorted(artifacts, key=lambda a: -a.size_bytes):
        runner = get_exporter(artifact.format)().runner(artifact, context_length=context)
        try:
            value = perplexity(runner, windows)
        finally:
            runner.close()
        rows.append({"variant": f"{artifact.format} {artifact.precision}", "size": artifact.size_bytes,
                     "perplexity": value, "delta_pct": 100.0 * (value - base) / base})
    return rows
