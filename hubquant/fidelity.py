"""Runtime fidelity floors: how far each runtime computes the model from the reference before quantizing.

For every format in a comparison, its *unquantized* form is scored like a variant: the run's own
full-precision variant of that format when it has one (the most faithful first), otherwise the
format's :meth:`~hubquant.exporters.base.Exporter.floor_precision`, built only for this and deleted
after (:class:`hubquant.pipeline.FloorBuilder`). Its logits are kept beside the reference's, so
every variant of that runtime is also scored against them: the deviation due to quantization alone.

A floor above :data:`FLOOR_MAX_KL` — or with top-1 agreement significantly below
:data:`FLOOR_MIN_TOP1` — is a *finding*: the runtime computes this model differently, named with the
causes its exporter knows (:meth:`~hubquant.exporters.base.Exporter.deviation_causes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hubquant.errors import HubquantError
from hubquant.records import Fidelity

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.source import SourceModel


#: A runtime whose unquantized form scores a mean KL above this (nats) computes the model differently…
FLOOR_MAX_KL = 1e-4


#: …and so does one whose unquantized form picks the reference's most likely next token less often than
#: this, by more than two standard errors (fp16 rounding flips a near-tie now and then: 99.4% ± 0.3% on
#: 508 tokens of a tiny model is rounding, 51.8% ± 2.2% is not).
FLOOR_MIN_TOP1 = 0.99


# -- fidelity floors -------------------------------------------------------------------------------
@dataclass
class FloorPlan:
    """The full-precision form of one runtime that some variants are compared with."""

    format: str
    precision: str
    options: dict[str, Any]
    key: str
    #: The run's own full-precision variant serving as the floor (None: build one, or use cached logits).
    artifact: Artifact | None
    variants: list[Artifact] = field(default_factory=list)

    def spec(self) -> dict[str, Any]:
        return {"format": self.format, "precision": self.precision, "options": self.options}


def plan_floors(artifacts: list[Artifact], source: SourceModel) -> list[FloorPlan]:
    """Which full-precision form each variant's runtime is measured by: one of the run's own variants
    when it has a matching one (most faithful first), else the format's floor precision, to build."""
    from hubquant.artifact import cache_key
    from hubquant.exporters import get_exporter

    plans: dict[tuple[str, str], FloorPlan] = {}
    for artifact in artifacts:
        exporter = get_exporter(artifact.format)
        precision = exporter.floor_precision(source)
        if precision is None:
            continue
        options = exporter.floor_options(artifact.options, precision=precision)
        group = (artifact.format, json.dumps(options, sort_keys=True))
        if group not in plans:
            own = [
                a
                for a in artifacts
                if a.format == artifact.format
                and a.precision in exporter.full_precisions
                and exporter.floor_options(a.options, precision=precision) == options
                and _runnable(a)
            ]
            own.sort(key=lambda a: exporter.full_precisions.index(a.precision))
            spec = {"format": artifact.format, "precision": precision, "options": options}
            key = (
                own[0].manifest.cache_key
                if own
                else cache_key(source_fingerprint=source.fingerprint, spec=spec, tools=exporter.tool_versions())
            )
            plans[group] = FloorPlan(
                format=artifact.format,
                precision=own[0].precision if own else precision,
                options=options,
                key=key,
                artifact=own[0] if own else None,
            )
        plans[group].variants.append(artifact)
    return list(plans.values())


def _runnable(artifact: Artifact) -> bool:
    from hubquant.exporters import get_exporter

    try:
        get_exporter(artifact.format).check_runnable(artifact)
    except HubquantError:
        return False
    return True


def fidelity_record(plan: FloorPlan, result: dict[str, Any], source: SourceModel) -> Fidelity:
    from hubquant import display
    from hubquant.display import NOISE_SIGMAS
    from hubquant.exporters import get_exporter

    exporter = get_exporter(plan.format)
    r = result["reference"]
    kl, top1, delta = r["kl_mean"], r["top1"], r["ppl_change_pct"]
    deviates = kl[0] > FLOOR_MAX_KL or top1[0] + NOISE_SIGMAS * (top1[1] or 0.0) < FLOOR_MIN_TOP1
    finding = None
    if deviates:
        finding = (
            f"{exporter.display_name} computes this model differently from the reference: its unquantized form "
            f"({plan.precision}) scores KL {display.scientific(kl[0], kl[1])}, top-1 "
            f"{display.percent(top1[0], top1[1])}, perplexity {display.delta_pct(delta[0], delta[1])}."
        )
        causes = exporter.deviation_causes(source, plan.options)
        if causes:
            finding += " Known cause: " + " ".join(causes)
    return Fidelity(
        format=plan.format,
        precision=plan.precision,
        origin="variant" if plan.artifact else "floor",
        kl_mean=kl[0],
        kl_mean_stderr=kl[1] or 0.0,
        top1_agreement=top1[0],
        top1_agreement_stderr=top1[1] or 0.0,
        ppl_delta_pct=delta[0],
        ppl_delta_pct_stderr=delta[1] or 0.0,
        max_kl=FLOOR_MAX_KL,
        min_top1=FLOOR_MIN_TOP1,
        deviates=deviates,
        finding=finding,
    )


def memory_shortfall(plan: FloorPlan, source: SourceModel) -> str | None:
    """Why measuring a floor would not fit in the memory available now, or None when it fits.

    The need is the format's measured ``floor_bytes_per_parameter`` × parameters (at Phi-3.5-mini
    size: OpenVINO's fp32 form took 23.4 GB to load and run at f32, ONNX's fp32 14.8 GB, llama.cpp's
    F16 7.5 GB); a floor that cannot fit is skipped and said to be, never estimated.
    """
    from hubquant.display import human_size
    from hubquant.exporters import get_exporter
    from hubquant.torch_runner import available_memory

    need = int(get_exporter(plan.format).floor_bytes_per_parameter * source.parameter_count)
    free = available_memory()
    if free is None or need <= free:
        return None
    return (
        f"its {plan.precision} form needs about {human_size(need)} of memory, {human_size(free)} is available "
        "(run the evaluation on a larger machine for the runtime's floor)"
    )
