"""Texts and their token ids: what evaluation scores and what calibration learns from.

Evaluation and calibration (importance matrices, AWQ) both read texts here, and never share a
default: the built-in evaluation text and the built-in calibration text are different files, so no
variant is scored on the words it was calibrated with. Every runtime is fed token ids made once by
the source's Hugging Face tokenizer (runtime tokenizers split SentencePiece whitespace
differently), cut into non-overlapping windows.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.errors import EvaluationError, MissingDependencyError, SourceError

if TYPE_CHECKING:
    from hubquant.source import SourceModel

BUILTIN_TEXT = "eval.txt"
#: Calibration uses a different built-in text, so no variant is scored on its calibration words.
BUILTIN_CALIBRATION_TEXT = "calibration.txt"
#: The standard corpus for real models (llama.cpp's published perplexities use its test split).
STANDARD_DATASET = "wikitext:wikitext-2-raw-v1:test"
#: How a text's origin reads in cards: the built-in texts are hubquant's, and said to be.
BUILTIN_LABEL = (
    "hubquant's built-in text (an offline stand-in: its perplexities are not comparable with published ones)"
)


@dataclass(frozen=True)
class EvalText:
    """A text to score: its name (``builtin``, a path or ``dataset:…``) and content."""

    name: str
    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()

    @property
    def builtin(self) -> bool:
        return self.name == "builtin"

    def describe(self) -> str:
        """How cards and tables name the text."""
        if self.builtin:
            return BUILTIN_LABEL
        if self.name.startswith("dataset:"):
            return self.name.removeprefix("dataset:")
        return Path(self.name).name


def read_text(path: str | Path | None, *, builtin: str = BUILTIN_TEXT) -> str:
    """The text at ``path``, or the built-in text ``builtin`` when ``path`` is None.

    Raises:
        EvaluationError: unreadable or empty text.
    """
    if path is None:
        return importlib.resources.files("hubquant.data").joinpath(builtin).read_text(encoding="utf-8")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read text {path}: {exc}", hint="pass a readable UTF-8 text file") from None
    if not text.strip():
        raise EvaluationError(f"text {path} is empty", hint="pass a text with at least one window of tokens")
    return text


def load_dataset_text(spec: str, *, max_chars: int = 2_000_000) -> str:
    """Join the text column of a ``datasets`` dataset given as ``NAME[:CONFIG[:SPLIT]]``.

    Raises:
        MissingDependencyError: ``datasets`` is not installed.
        EvaluationError: the dataset cannot be loaded (offline, unknown) or has no text column.
    """
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("--dataset needs the 'datasets' library", extra="datasets") from None
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types
        raise EvaluationError(
            f"cannot load dataset {spec}: {type(exc).__name__}: {exc}",
            hint="check the name and that the Hub is reachable, or pass --text FILE",
        ) from None
    strings = ("Value('string')", "Value(dtype='string', id=None)")
    column = (
        "text"
        if "text" in data.column_names
        else next((c for c in data.column_names if str(data.features[c]) in strings), None)
    )
    if column is None:
        raise EvaluationError(
            f"dataset {spec} has no text column ({', '.join(data.column_names)})",
            hint="pick a dataset with a 'text' column",
        )
    parts, total = [], 0
    for row in data[column]:
        parts.append(row)
        total += len(row)
        if total >= max_chars:
            break
    return "\n".join(parts)


def eval_text(*, text_path: str | Path | None = None, dataset: str | None = None, fallback: bool = False) -> EvalText:
    """The text to evaluate on: a file, a dataset, or the built-in default.

    With ``fallback`` a dataset that cannot be loaded (no Hub, no ``datasets``) gives way to the
    built-in text, whose name says so; without it the failure is an error.
    """
    if text_path is not None and dataset is not None:
        raise EvaluationError("--text and --dataset cannot be combined", hint="choose one source of text")
    if dataset is not None:
        try:
            return EvalText(name=f"dataset:{dataset}", content=load_dataset_text(dataset))
        except (EvaluationError, MissingDependencyError):
            if not fallback:
                raise
            return EvalText(name="builtin", content=read_text(None))
    if text_path is not None:
        return EvalText(name=str(text_path), content=read_text(text_path))
    return EvalText(name="builtin", content=read_text(None))


def token_windows(ids: Sequence[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of exactly ``context`` ids; the remainder shorter than a window is dropped.

    Raises:
        EvaluationError: fewer ids than one window.
    """
    if context < 2:
        raise EvaluationError(f"context length {context} is too small", hint="use a context length of at least 2")
    count = len(ids) // context
    if count == 0:
        raise EvaluationError(
            f"the text has {len(ids)} tokens, fewer than one window of {context}",
            hint="use a longer text or a smaller --context",
        )
    return [list(ids[i * context : (i + 1) * context]) for i in range(count)]


def tokenize(source: SourceModel, text: str) -> list[int]:
    """Token ids of ``text`` from the source's Hugging Face tokenizer (no BOS/EOS added)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"cannot load the tokenizer of {source.name}: {exc}",
            path=source.path,
            hint="check the tokenizer files of the source",
        ) from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def calibration_windows(source_path: str | Path, text_path: str | None, context: int) -> list[list[int]]:
    """Token windows of a calibration text (the built-in calibration text when ``text_path`` is None)."""
    from transformers import AutoTokenizer

    text = read_text(text_path, builtin=BUILTIN_CALIBRATION_TEXT)
    tokenizer = AutoTokenizer.from_pretrained(str(source_path))
    return token_windows(tokenizer(text, add_special_tokens=False).input_ids, context)
