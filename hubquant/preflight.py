"""Disk a run will need, estimated before any work, and a refusal when the filesystems cannot hold it.

The estimate follows the order the pipeline builds in: formats with the largest temporaries first
(GGUF's F16 file, OpenVINO's full-precision IR, ONNX's prequantized checkpoint), each temporary
deleted before the next format starts, while finished variants accumulate in the output. So the
peak is the largest, over that order, of (outputs finished so far + this format's outputs + this
format's temporary), counted per filesystem when ``--scratch`` puts the temporaries on another one.
Sizes come from the source's weight bytes, each precision's bits and the format's measured overhead
(:mod:`hubquant.planner`, which also estimates memory: :func:`check_resources` runs both checks); a run
is refused only when the estimate exceeds the free space; ``HUBQUANT_SKIP_DISK_CHECK=1`` skips the check.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.display import human_size
from hubquant.errors import OutputError
from hubquant.exporters import get_exporter
from hubquant.planner import build_order, peak_disk

if TYPE_CHECKING:
    from hubquant.exporters.base import Exporter
    from hubquant.recipe import VariantSpec
    from hubquant.source import SourceModel

SKIP_ENV = "HUBQUANT_SKIP_DISK_CHECK"


def variant_bytes(source: SourceModel, exporter: Exporter, spec: VariantSpec) -> int:
    """A variant's own size on disk (:func:`hubquant.planner.output_bytes`)."""
    from hubquant.planner import output_bytes

    return output_bytes(half_precision_bytes(source), spec.format, spec.precision)


def temporary_bytes(source: SourceModel, exporter: Exporter) -> int:
    """The format's largest temporary: ``scratch_share`` of a 16-bit copy (GGUF F16, the OpenVINO IR)."""
    return int(half_precision_bytes(source) * exporter.scratch_share)


def half_precision_bytes(source: SourceModel) -> int:
    """The source's weights at 16 bits each (its own bytes for bf16/f16, half of them for float32)."""
    stored = sum((source.path / name).stat().st_size for name in source.weight_files)
    return stored // 2 if source.dtype == "float32" else stored


@dataclass
class DiskPlan:
    """The run's estimated peak disk: on the output's filesystem and, when apart, on the scratch's."""

    output_peak: int
    scratch_peak: int
    same_filesystem: bool

    def describe(self) -> str:
        if self.same_filesystem:
            return f"about {human_size(self.output_peak + self.scratch_peak)} at their peak"
        return f"about {human_size(self.output_peak)} (outputs) and {human_size(self.scratch_peak)} (intermediates)"


def pending(source: SourceModel, specs: list[VariantSpec], output: Path) -> list[VariantSpec]:
    """The variants not already in ``output`` (the ones a run will build)."""
    return [
        spec
        for spec in specs
        if not (output / get_exporter(spec.format)().folder_name(source, spec.precision, spec.options)).exists()
    ]


def plan_disk(source: SourceModel, specs: list[VariantSpec], output: Path, scratch: Path | None) -> DiskPlan:
    """The peak disk of building ``specs`` (those not already in ``output``) in the pipeline's order."""
    from hubquant.artifact import existing_parent

    formats: dict[str, list[VariantSpec]] = {}
    for spec in pending(source, specs, output):
        formats.setdefault(spec.format, []).append(spec)
    order = build_order(formats)
    same = scratch is None or os.stat(existing_parent(scratch)).st_dev == os.stat(existing_parent(output)).st_dev
    groups = []
    for fmt in order:
        exporter = get_exporter(fmt)()
        outputs = sum(variant_bytes(source, exporter, spec) for spec in formats[fmt])
        groups.append((outputs, temporary_bytes(source, exporter)))
    peaks = peak_disk(groups)
    if same:
        return DiskPlan(output_peak=peaks.together, scratch_peak=0, same_filesystem=True)
    return DiskPlan(output_peak=peaks.outputs, scratch_peak=peaks.scratch, same_filesystem=False)


def check_disk(source: SourceModel, specs: list[VariantSpec], output: Path, scratch: Path | None) -> DiskPlan | None:
    """Refuse, before anything is created, a run whose estimated peak exceeds the free space.

    Raises:
        OutputError: naming both numbers, per filesystem.
    """
    from hubquant.artifact import existing_parent

    if os.environ.get(SKIP_ENV) == "1":
        return None
    plan = plan_disk(source, specs, output, scratch)
    needs = [(output, plan.output_peak)] + ([] if plan.same_filesystem else [(scratch, plan.scratch_peak)])
    for where, need in needs:
        usage = shutil.disk_usage(existing_parent(where))
        if usage.total == 0:
            continue  # not a disk (/proc, some FUSE mounts): the write itself will say what is wrong
        free = usage.free
        if need > free:
            what = "the outputs and intermediates" if plan.same_filesystem else "this part of the run"
            raise OutputError(
                f"not enough disk for this run: {where} has {human_size(free)} free, {what} need {plan.describe()}",
                path=where,
                hint="free space, put the intermediates on another disk with --scratch DIR (or --output on a "
                f"larger one), or build fewer variants at once; {SKIP_ENV}=1 skips this estimate",
            )
    return plan


def check_resources(source: SourceModel, specs: list[VariantSpec], output: Path, scratch: Path | None) -> list[str]:
    """The run's disk and memory preflight, before any heavy work; the lines to tell the user.

    Raises:
        OutputError: the disk cannot hold the run (see :func:`check_disk`).
        ResourceError: a variant needs more memory than is available (:func:`hubquant.planner.check_memory`).
    """
    from hubquant.planner import Shape, check_memory, estimate_run
    from hubquant.torch_runner import available_memory

    lines = []
    todo = pending(source, specs, output)
    if todo:
        run = estimate_run(Shape.of_source(source), todo)
        check_memory(run, available_memory())
        if run.variants:
            lines.append(
                f"memory: the largest variant needs about {human_size(run.memory)} (estimated, {run.time_class} "
                "to build them all here; `hubquant plan` shows each)"
            )
    plan = check_disk(source, specs, output, scratch)
    if plan is not None:
        lines.append(f"disk: this run needs {plan.describe()} (estimated; checked against the free space)")
    return lines
