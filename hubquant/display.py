"""How figures are written for people: sizes, counts, and every estimate with its uncertainty.

One place for the table, the cards, the CI summary and the CLI, so a figure reads the same
everywhere. A difference within two standard errors of zero reads "within noise" — never "better
than the original".
"""

from __future__ import annotations

from typing import Any

#: A difference is told from noise when it is more than this many standard errors from zero.
NOISE_SIGMAS = 2.0


def human_size(size: int | float | None, *, unit: str = " ") -> str:
    """``1.8 MB``, ``2.40 GB`` (powers of 1000, as the Hub shows sizes)."""
    if size is None:
        return "—"
    value = float(size)
    for name in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or name == "TB":
            if name == "B":
                return f"{int(value)}{unit}B"
            return f"{value:.2f}{unit}{name}" if name in ("GB", "TB") else f"{value:.1f}{unit}{name}"
        value /= 1000
    return f"{size}{unit}B"


def count(n: int) -> str:
    """``3.82B``, ``11.2M``, ``1,216`` (a parameter count; below 100k exactly)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def fmt(value: Any, spec: str, suffix: str = "") -> str:
    """A figure, or ``—`` when it was not measured."""
    return "—" if value is None else format(value, spec) + suffix


def within_noise(value: float | None, stderr: float | None) -> bool:
    """Whether a difference cannot be told from zero (|value| ≤ 2 standard errors)."""
    return value is not None and stderr is not None and abs(value) <= NOISE_SIGMAS * stderr


def plus_minus(
    value: float | None,
    stderr: float | None,
    spec: str,
    *,
    suffix: str = "",
    err_spec: str | None = None,
    sep: str = " ± ",
) -> str:
    """``12.345 ± 0.120``; just the value when no error is known."""
    if value is None:
        return "—"
    text = format(value, spec) + suffix
    if stderr is None:
        return text
    return f"{text}{sep}{format(stderr, err_spec or spec.lstrip('+'))}{suffix}"


def delta_pct(value: float | None, stderr: float | None, *, compact: bool = False) -> str:
    """A perplexity change in percent with its error: ``+0.42% ± 0.60% (within noise)``."""
    if value is None:
        return "—"
    if compact:
        text = plus_minus(value, stderr, "+.2f", sep="±") + "%"
        return f"~{text}" if within_noise(value, stderr) else text
    text = plus_minus(value, stderr, "+.2f", suffix="%")
    return f"{text} (within noise)" if within_noise(value, stderr) else text


def percent(share: float | None, stderr: float | None, *, compact: bool = False) -> str:
    """A share as a percentage with its error: ``97.2% ± 0.7%``."""
    if share is None:
        return "—"
    if compact:
        return f"{100 * share:.1f}%"
    return plus_minus(100 * share, None if stderr is None else 100 * stderr, ".1f", suffix="%")


def scientific(value: float | None, stderr: float | None, *, compact: bool = False) -> str:
    """A small positive figure (KL): ``1.05e-03 ± 2.1e-05``."""
    if value is None:
        return "—"
    if compact or stderr is None:
        return f"{value:.2e}"
    return f"{value:.2e} ± {stderr:.1e}"


def task_rows(rows: list[Any], *, original: str | None = None) -> list[dict[str, str]]:
    """The task scores of evaluation rows, one line per (task metric, row), for the table and the cards.

    Only metrics that come with a standard error are shown (lm-eval gives none for perplexity-like
    ones; they stay in eval.json). With ``original``, each metric starts with a line of that label
    from the reference's score the variants carry (the cards have no reference row). Keys:
    ``task``, ``label``, ``score``, ``recovery``, ``samples``.
    """
    keys: dict[tuple[str, str, str], None] = {}
    by_row: list[tuple[Any, dict[tuple[str, str, str], Any]]] = []
    for row in rows:
        if row.tasks is None:
            continue
        scores = {(s.task, s.metric, s.filter): s for s in row.tasks.scores if s.stderr is not None}
        keys.update(dict.fromkeys(scores))
        by_row.append((row, scores))
    lines = []
    for key in keys:
        task, metric, filter_name = key
        name = f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")
        first = next(scores[key] for _, scores in by_row if key in scores)
        if original is not None:
            lines.append(
                {
                    "task": name,
                    "label": original,
                    "score": plus_minus(first.reference, first.reference_stderr, ".3f"),
                    "recovery": "—",
                    "samples": str(first.samples),
                }
            )
        for row, scores in by_row:
            score = scores.get(key)
            if score is None:
                continue
            recovery = (
                "—"
                if row.is_reference
                else plus_minus(score.recovery, score.recovery_stderr, ".3f")
                if score.recovery is not None
                else "n/a (ref. 0)"
            )
            lines.append(
                {
                    "task": name,
                    "label": row.label,
                    "score": plus_minus(score.value, score.stderr, ".3f"),
                    "recovery": recovery,
                    "samples": str(score.samples),
                }
            )
    return lines
