"""The quality gate: variants beyond a limit are marked, with every reason, and held back from publishing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hubquant.records import Evaluation, Gate

__all__ = ["GateSettings", "apply_gate"]


@dataclass
class GateSettings:
    """The quality gate: variants beyond a limit are marked and held back from publishing."""

    max_ppl_delta: float | None = None
    max_kl: float | None = None
    #: Hold back every variant of a runtime whose own unquantized KL exceeds this (None: warn only).
    max_runtime_kl: float | None = None

    @classmethod
    def of(cls, section: Any) -> GateSettings:
        """The gate a recipe's ``eval`` section asks for."""
        return cls(max_ppl_delta=section.max_ppl_delta, max_kl=section.max_kl, max_runtime_kl=section.max_runtime_kl)


def apply_gate(row: Evaluation, gate: GateSettings) -> None:
    """Mark a row that fails the quality gate, with every reason."""
    m, reasons = row.metrics, []
    if row.error:
        reasons.append(f"not measured: {row.error}")
    if gate.max_ppl_delta is not None and m.ppl_delta_pct is not None and m.ppl_delta_pct > gate.max_ppl_delta:
        reasons.append(f"Δ perplexity {m.ppl_delta_pct:+.2f}% > {gate.max_ppl_delta}%")
    if gate.max_kl is not None and m.kl_mean is not None and m.kl_mean > gate.max_kl:
        reasons.append(f"KL {m.kl_mean:.4g} > {gate.max_kl}")
    if gate.max_runtime_kl is not None and row.fidelity is not None and row.fidelity.kl_mean > gate.max_runtime_kl:
        reasons.append(
            f"{row.fidelity.format}'s unquantized KL {row.fidelity.kl_mean:.4g} > {gate.max_runtime_kl} "
            "(the runtime computes this model differently)"
        )
    row.gate = Gate(
        passed=not reasons,
        reasons=reasons,
        max_ppl_delta_pct=gate.max_ppl_delta,
        max_kl=gate.max_kl,
        max_runtime_kl=gate.max_runtime_kl,
    )
