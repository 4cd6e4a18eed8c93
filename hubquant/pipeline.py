"""Runs the flow for a recipe; the only module that knows the order of the stages.

For now the flow is: resolve the source → validate the output → for each format, reuse the
variants whose inputs are unchanged and export the others (all variants of a format in one call,
so intermediates are shared) → write each manifest and move each finished folder into place.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hubquant.artifact import (
    Artifact,
    cache_key,
    commit_staging_folder,
    discard_staging_folder,
    new_staging_folder,
    prepare_output_root,
    remove_stale_temporaries,
    reusable_artifact,
    write_manifest,
)
from hubquant.errors import ExportError, HubquantError
from hubquant.exporters import get_exporter
from hubquant.exporters.base import ExportJob, Progress
from hubquant.recipe import Recipe, VariantSpec
from hubquant.source import SourceModel, resolve_source

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    """One variant's outcome: an artifact (built or reused) or the error that stopped it."""

    spec: VariantSpec
    artifact: Artifact | None = None
    error: HubquantError | None = None


@dataclass
class QuantizeResult:
    source: SourceModel
    output: Path
    variants: list[VariantResult] = field(default_factory=list)

    @property
    def artifacts(self) -> list[Artifact]:
        return [v.artifact for v in self.variants if v.artifact is not None]

    @property
    def failures(self) -> list[VariantResult]:
        return [v for v in self.variants if v.error is not None]


def _as_export_error(exc: BaseException, spec: VariantSpec) -> HubquantError:
    if isinstance(exc, HubquantError):
        return exc
    return ExportError(f"{spec.format} {spec.precision} failed: {type(exc).__name__}: {exc}", format=spec.format,
                       precision=spec.precision, hint="run with HUBQUANT_DEBUG=1 for the full log")


def quantize(recipe: Recipe, *, force: bool = False, progress: Progress | None = None) -> QuantizeResult:
    """Build (or reuse) every variant of an already validated recipe.

    Args:
        recipe: a recipe from :func:`hubquant.recipe.build_recipe` / :func:`load_recipe`.
        force: rebuild even when a matching artifact exists.
        progress: receives one line per step.

    Returns:
        Every variant's outcome; a failed variant does not stop the others.

    Raises:
        SourceError, UnsupportedModelError, OutputError, MissingDependencyError: before any work.
    """
    say = progress or (lambda line: None)
    source = resolve_source(recipe.source, revision=recipe.revision)
    exporters = {spec.format: get_exporter(spec.format)() for spec in recipe.variants}
    for exporter in exporters.values():
        exporter.check_installed()
    output = Path(recipe.output)
    created = prepare_output_root(output)
    remove_stale_temporaries(output)
    result = QuantizeResult(source=source, output=output)
    outcomes: dict[int, VariantResult] = {}

    for fmt, exporter in exporters.items():
        tools = exporter.tool_versions()
        jobs: list[tuple[int, VariantSpec, ExportJob, Path, str]] = []
        for index, spec in enumerate(recipe.variants):
            if spec.format != fmt:
                continue
            target = output / exporter.folder_name(source, spec.precision, spec.options)
            key = cache_key(source_fingerprint=source.fingerprint, spec=spec.model_dump(mode="json"), tools=tools)
            reused = None if force else reusable_artifact(target, key)
            if reused is not None:
                say(f"{spec.label}: reusing {target} (inputs unchanged; --force rebuilds)")
                outcomes[index] = VariantResult(spec=spec, artifact=reused)
                continue
            staging = new_staging_folder(target)
            jobs.append((index, spec, ExportJob(precision=spec.precision, options=dict(spec.options), folder=staging,
                                                warnings=[]), target, key))
        if not jobs:
            continue
        try:
            with tempfile.TemporaryDirectory(prefix=".hubquant-tmp-work-", dir=output) as work_dir:
                errors = exporter.export(source, [job for _, _, job, _, _ in jobs], work_dir=Path(work_dir),
                                         progress=say)
            for index, spec, job, target, key in jobs:
                error = errors.get(job.folder.name, ExportError(f"{spec.label} was not built", format=fmt))
                if error is not None:
                    discard_staging_folder(job.folder)
                    outcomes[index] = VariantResult(spec=spec, error=_as_export_error(error, spec))
                    log.debug("%s failed", spec.label, exc_info=error)
                    continue
                say(f"{spec.label}: hashing and writing the manifest")
                manifest = write_manifest(job.folder, variant=spec.model_dump(mode="json"), source=source.facts(),
                                          tools=tools, key=key, export_seconds=job.seconds,
                                          shared_seconds=job.shared_seconds, warnings=job.warnings)
                commit_staging_folder(job.folder, target)
                outcomes[index] = VariantResult(spec=spec, artifact=Artifact(path=target, manifest=manifest,
                                                                             warnings=list(job.warnings)))
        finally:
            for _, _, job, _, _ in jobs:
                if job.folder.exists():
                    discard_staging_folder(job.folder)

    result.variants = [outcomes[i] for i in sorted(outcomes)]
    if created and not result.artifacts:
        # Nothing was produced: leave no empty output folder behind.
        with contextlib.suppress(OSError):
            shutil.rmtree(output) if not any(output.iterdir()) else None
    return result
