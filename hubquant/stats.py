"""The quality figures and their standard errors, from per-token values (numpy only).

Every figure is a mean over the N scored tokens, and its standard error comes from those same
per-token values, as llama.cpp's ``llama-perplexity`` computes its ± figures:

- perplexity ``exp(mean NLL)``: delta method, ``se = ppl · sd(NLL) / √N``;
- perplexity change against a baseline scored on the *same* ids: from the paired per-token
  differences ``d = NLL_variant − NLL_base``: ``ratio = exp(mean d)``, change ``100 (ratio − 1)`` %,
  ``se = 100 · ratio · sd(d) / √N`` — far tighter than two independent perplexity errors, because
  most of each token's difficulty cancels;
- mean KL divergence: ``sd(KL) / √N``; top-1 agreement (a share p): ``√(p (1 − p) / N)``.

These treat tokens as independent; tokens of one window are not quite, which a bootstrap over
windows checks (the test suite compares both on a tiny model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A figure and its standard error (None when fewer than two values were scored)."""

    value: float
    stderr: float | None

    def pair(self) -> list[float | None]:
        return [self.value, self.stderr]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the vocabulary, in float64 so tiny divergences are not lost to rounding."""
    import numpy as np

    scores = logits.astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, window: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of tokens 1…n-1 of a window given the logits of positions 0…n-2."""
    import numpy as np

    targets = np.asarray(window[1:])
    return -log_softmax(logits[:-1])[np.arange(len(targets)), targets]


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference ‖ variant) at every position: how far the variant's next-token distribution moved."""
    import numpy as np

    p, q = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def mean(values: np.ndarray) -> Estimate:
    """The mean and its standard error ``sd / √N``."""
    n = int(values.size)
    value = float(values.mean())
    return Estimate(value, float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else None)


def perplexity(nll: np.ndarray) -> Estimate:
    """``exp(mean NLL)`` with its delta-method standard error."""
    m = mean(nll)
    value = math.exp(m.value)
    return Estimate(value, None if m.stderr is None else value * m.stderr)


def perplexity_change_pct(nll: np.ndarray, base_nll: np.ndarray) -> Estimate:
    """Perplexity change in % against a baseline scored on the same token ids (paired)."""
    d = mean(nll - base_nll)
    ratio = math.exp(d.value)
    return Estimate(100.0 * (ratio - 1.0), None if d.stderr is None else 100.0 * ratio * d.stderr)


def proportion(flags: np.ndarray) -> Estimate:
    """A share of positions with its binomial standard error."""
    n = int(flags.size)
    p = float(flags.mean())
    return Estimate(p, math.sqrt(p * (1.0 - p) / n) if n > 1 else None)


def ratio_of_means(values: np.ndarray, base: np.ndarray) -> Estimate | None:
    """``mean(values) / mean(base)`` over paired examples, with its delta-method standard error
    ``sd(values - R·base) / (√N · mean(base))``; None when the base's mean is zero."""
    import numpy as np

    values, base = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    n, base_mean = int(values.size), float(base.mean()) if base.size else 0.0
    if n == 0 or base_mean == 0.0:
        return None
    ratio = float(values.mean()) / base_mean
    spread = float((values - ratio * base).std(ddof=1)) if n > 1 else None
    return Estimate(ratio, None if spread is None else spread / (math.sqrt(n) * abs(base_mean)))


def percentile(values: np.ndarray, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


@dataclass(frozen=True)
class Comparison:
    """A runtime's logits scored against a baseline's on the same ids."""

    ppl_change_pct: Estimate
    kl_mean: Estimate
    kl_p99: float
    top1: Estimate

    def as_dict(self) -> dict[str, list[float | None] | float]:
        return {
            "ppl_change_pct": self.ppl_change_pct.pair(),
            "kl_mean": self.kl_mean.pair(),
            "kl_p99": self.kl_p99,
            "top1": self.top1.pair(),
        }


def compare(nll: np.ndarray, kl: np.ndarray, agree: np.ndarray, base_nll: np.ndarray) -> Comparison:
    """Every comparison figure from the per-token values (see the module docstring)."""
    return Comparison(
        ppl_change_pct=perplexity_change_pct(nll, base_nll),
        kl_mean=mean(kl),
        kl_p99=percentile(kl, 99),
        top1=proportion(agree),
    )


def runner_perplexity(runner: object, windows: list[list[int]]) -> float:
    """Perplexity of a runner (anything with ``logits(ids)``) over token windows."""
    import numpy as np

    nll = np.concatenate([window_nll(runner.logits(window), window) for window in windows])  # type: ignore[attr-defined]
    return float(np.exp(nll.mean()))
