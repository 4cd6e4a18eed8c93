"""Runs the flow for a recipe; the only module that knows the order of the stages.

quantize: resolve the source → validate the output → for each format (largest temporaries first),
reuse the variants whose inputs are unchanged and export the others (all variants of a format in
one call, so intermediates are shared) → write each manifest and move each finished folder into
place. evaluate: build the full-precision form of any runtime the run has none of (its fidelity
floor; deleted after) → measure everything → record. publish: quantize → evaluate → gate → push.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.artifact import (
    Artifact,
    cache_key,
    commit_staging_folder,
    discard_staging_folder,
    disk_full_error,
    free_bytes,
    is_disk_full,
    new_staging_folder,
    output_lock,
    prepare_output_root,
    remove_stale_temporaries,
    reusable_artifact,
    temp_prefix,
    write_manifest,
)
from hubquant.diskmeter import DiskMeter
from hubquant.errors import ExportError, HubquantError
from hubquant.exporters import get_exporter
from hubquant.exporters.base import Exporter, ExportJob, Progress
from hubquant.follow import Digests, FollowHasher
from hubquant.planner import build_order
from hubquant.preflight import check_resources, temporary_bytes, variant_bytes
from hubquant.recipe import Recipe, VariantSpec
from hubquant.source import SourceModel, resolve_source

if TYPE_CHECKING:
    from hubquant.evaluate import EvalSettings, GateSettings
    from hubquant.fidelity import FloorPlan
    from hubquant.publishing import PushOutcome, PushSettings
    from hubquant.records import Evaluation
    from hubquant.text import EvalText
    from hubquant.tracking import LogCapture, Tracker

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    """One variant's outcome: an artifact (built or reused) or the error that stopped it."""

    spec: VariantSpec
    artifact: Artifact | None = None
    error: HubquantError | None = None


@dataclass
class TrackingSettings:
    """Whether and how to record runs in MLflow (None in place of this object: no tracking)."""

    experiment: str | None = None
    new_run: bool = False


@dataclass
class TrackingSummary:
    uri: str
    experiment: str
    parent_run_id: str
    where: str
    experiment_id: str | None = None


@dataclass
class QuantizeResult:
    source: SourceModel
    output: Path
    variants: list[VariantResult] = field(default_factory=list)
    tracking: TrackingSummary | None = None

    @property
    def artifacts(self) -> list[Artifact]:
        return [v.artifact for v in self.variants if v.artifact is not None]

    @property
    def failures(self) -> list[VariantResult]:
        return [v for v in self.variants if v.error is not None]


def _as_export_error(exc: BaseException, spec: VariantSpec, *, where: Path, need: int | None = None) -> HubquantError:
    if is_disk_full(exc, where):
        return disk_full_error(where, need=need)
    if isinstance(exc, HubquantError):
        return exc
    return ExportError(
        f"{spec.format} {spec.precision} failed: {type(exc).__name__}: {exc}",
        format=spec.format,
        precision=spec.precision,
        hint="run with HUBQUANT_DEBUG=1 for the full log",
    )


def _open_tracker(source: SourceModel, tracking: TrackingSettings | None, experiment: str | None) -> Tracker | None:
    if tracking is None:
        return None
    from hubquant.tracking import open_tracker

    tracker = open_tracker(source, experiment=tracking.experiment or experiment, new_run=tracking.new_run)
    tracker.start_parent()
    return tracker


def _summary(tracker: Tracker | None) -> TrackingSummary | None:
    if tracker is None or tracker.parent_id is None:
        return None
    return TrackingSummary(
        uri=tracker.uri,
        experiment=tracker.experiment_name,
        parent_run_id=tracker.parent_id,
        where=tracker.parent_url,
        experiment_id=tracker.experiment_id,
    )


def _progress(capture: LogCapture, progress: Progress | None) -> Progress:
    say_user = progress or (lambda line: None)

    def say(line: str) -> None:
        capture.progress(line)
        say_user(line)

    return say


def quantize(
    recipe: Recipe, *, force: bool = False, progress: Progress | None = None, tracking: TrackingSettings | None = None
) -> QuantizeResult:
    """Build (or reuse) every variant of an already validated recipe.

    Args:
        recipe: a recipe from :func:`hubquant.recipe.build_recipe` / :func:`load_recipe`.
        force: rebuild even when a matching artifact exists.
        progress: receives one line per step.
        tracking: record a parent run and one child run per variant in MLflow.

    Returns:
        Every variant's outcome; a failed variant does not stop the others.

    Raises:
        SourceError, UnsupportedModelError, OutputError, MissingDependencyError, TrackingError:
            before any work.
    """
    from hubquant.weights import check_finite

    say = progress or (lambda line: None)
    source = resolve_source(recipe.source, revision=recipe.revision)
    for spec in recipe.variants:
        get_exporter(spec.format).check_installed()
    output = Path(recipe.output)
    for line in check_resources(source, recipe.variants, output, recipe.scratch):  # before reading any weight
        say(line)
    if check_finite(source):
        say(f"source: no NaN or infinite weights in {len(source.weight_files)} file(s) (checked once per source)")
    tracker = _open_tracker(source, tracking, recipe.experiment)
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(tracker)
        if recipe.scratch is not None:
            prepare_output_root(Path(recipe.scratch), what="scratch")
        created = prepare_output_root(output)
        stack.enter_context(output_lock(output, progress=say))
        result = build_variants(
            source, recipe.variants, output, scratch=recipe.scratch, force=force, progress=progress, tracker=tracker
        )
        result.tracking = _summary(tracker)
    if created and not result.artifacts:
        # Nothing was produced: leave no empty output folder behind.
        with contextlib.suppress(OSError):
            shutil.rmtree(output) if not any(output.iterdir()) else None
    return result


@dataclass
class _Job:
    index: int
    spec: VariantSpec
    job: ExportJob
    target: Path
    key: str


def build_variants(
    source: SourceModel,
    specs: list[VariantSpec],
    output: Path,
    *,
    scratch: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    tracker: Tracker | None = None,
) -> QuantizeResult:
    """Export (or reuse) ``specs`` into ``output``, format by format, the largest temporaries first."""
    from hubquant.tracking import LogCapture

    capture = LogCapture()
    say = _progress(capture, progress)
    remove_stale_temporaries(output)
    outcomes: dict[int, VariantResult] = {}
    runs: dict[int, str] = {}
    exporters = {spec.format: get_exporter(spec.format)() for spec in specs}
    for fmt in build_order(exporters):
        exporter = exporters[fmt]
        tools = exporter.tool_versions()
        jobs: list[_Job] = []
        for index, spec in enumerate(specs):
            if spec.format != fmt:
                continue
            target = output / exporter.folder_name(source, spec.precision, spec.options)
            key = cache_key(source_fingerprint=source.fingerprint, spec=spec.model_dump(mode="json"), tools=tools)
            if tracker is not None:
                runs[index] = tracker.variant_run(spec, key=key, name=target.name)
            refused = exporter.refusal(source)
            if refused is not None:  # this format cannot carry this source: the variant fails, the others go on
                say(f"{spec.label}: refused — {refused.message}")
                outcomes[index] = VariantResult(spec=spec, error=refused)
                continue
            reused = None if force else reusable_artifact(target, key)
            if reused is not None:
                say(f"{spec.label}: reusing {target} (inputs unchanged; --force rebuilds)")
                outcomes[index] = VariantResult(spec=spec, artifact=reused)
                continue
            job = ExportJob(precision=spec.precision, options=dict(spec.options), folder=new_staging_folder(target))
            jobs.append(_Job(index, spec, job, target, key))
        if jobs:
            with capture:
                _export_format(source, exporter, jobs, tools, scratch=scratch or output, say=say, outcomes=outcomes)
    result = QuantizeResult(source=source, output=output, variants=[outcomes[i] for i in sorted(outcomes)])
    if tracker is not None:
        for index, outcome in outcomes.items():
            if outcome.artifact is not None:
                tracker.log_artifact_files(runs[index], outcome.artifact, log_text=capture.text())
                tracker.finish_variant(runs[index])
            else:
                tracker.fail_variant(runs[index], outcome.error)
    return result


def _export_format(
    source: SourceModel,
    exporter: Exporter,
    jobs: list[_Job],
    tools: dict[str, str],
    *,
    scratch: Path,
    say: Progress,
    outcomes: dict[int, VariantResult],
) -> None:
    """One format's variants in one export call; each finished folder gets its manifest and moves into place."""
    try:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("work"), dir=scratch) as work_dir:
            if scratch.resolve() != Path(jobs[0].target).parent.resolve():
                say(f"{exporter.name}: intermediates in {work_dir}")
            # The format's intermediates and the variants being written: its peak disk, measured.
            variants = [j.job.folder for j in jobs]
            # Hashed while written when the format's writer allows it; else the manifest reads them back.
            follow = FollowHasher(variants if exporter.writes_in_order else [])
            with DiskMeter([Path(work_dir), *variants]) as meter, follow:
                progress = meter.wrap(say)
                errors = exporter.export(source, [j.job for j in jobs], work_dir=Path(work_dir), progress=progress)
        known = follow.digests()
        for item in jobs:
            spec, job = item.spec, item.job
            error = errors.get(job.name, ExportError(f"{spec.label} was not built", format=exporter.name))
            if error is None:
                say(f"{spec.label}: hashing and writing the manifest")
                try:
                    outcomes[item.index] = _finish(item, source, tools, peak_disk=meter.peak, known=known)
                    continue
                except OSError as exc:
                    error = exc
            discard_staging_folder(job.folder)
            need = variant_bytes(source, exporter, spec) + temporary_bytes(source, exporter)
            need -= free_bytes(item.target.parent)
            outcomes[item.index] = VariantResult(
                spec=spec, error=_as_export_error(error, spec, where=item.target.parent, need=need)
            )
            log.debug("%s failed", spec.label, exc_info=error)
    finally:
        for item in jobs:
            if item.job.folder.exists():
                discard_staging_folder(item.job.folder)


def _finish(item: _Job, source: SourceModel, tools: dict[str, str], *, peak_disk: int, known: Digests) -> VariantResult:
    """Hash a built variant (``known``: digests taken while it was written), write its manifest, move it into place."""
    job = item.job
    manifest = write_manifest(
        job.folder,
        variant=item.spec.model_dump(mode="json"),
        source=source.facts(),
        tools=tools,
        key=item.key,
        export_seconds=job.seconds,
        shared_seconds=job.shared_seconds,
        warnings=job.warnings,
        settings=job.settings,
        roles=job.roles,
        peak_disk_bytes=peak_disk,
        known=known,
    )
    commit_staging_folder(job.folder, item.target)
    return VariantResult(
        spec=item.spec, artifact=Artifact(path=item.target, manifest=manifest, warnings=list(job.warnings))
    )


@dataclass
class EvalResult:
    rows: list[Evaluation]
    tracking: TrackingSummary | None = None
    plot: Path | None = None

    @property
    def failures(self) -> list[Evaluation]:
        """Variants that could not be measured."""
        return [row for row in self.rows if row.error]


@dataclass
class FloorBuilder:
    """Builds the full-precision form of a runtime the run has none of, only when its floor logits are
    not cached — one at a time, deleted as soon as it is measured (at Phi-3.5-mini size the GGUF F16,
    ONNX fp32 and OpenVINO fp16 forms are 7.6, 15.3 and 7.6 GB: never all on disk at once)."""

    source: SourceModel
    where: Path
    scratch: Path | None
    progress: Progress

    @contextlib.contextmanager
    def __call__(self, plan: FloorPlan) -> Iterator[Artifact | None]:
        self.progress(
            f"{plan.format} floor: building {plan.precision} (unquantized) to measure the runtime itself; deleted after"
        )
        with tempfile.TemporaryDirectory(prefix=temp_prefix("floor"), dir=self.where) as tmp:
            spec = VariantSpec.model_validate(plan.spec())
            built = build_variants(self.source, [spec], Path(tmp), scratch=self.scratch, progress=self.progress)
            for failure in built.failures:
                message = failure.error.message if failure.error else ""
                self.progress(
                    f"{plan.format} floor: not built ({message}); its variants get no quantization-only figures"
                )
            yield built.artifacts[0] if built.artifacts else None


def evaluate_artifacts(
    artifacts: list[Artifact],
    source: SourceModel,
    *,
    text: EvalText,
    settings: EvalSettings,
    gate: GateSettings | None = None,
    plot: Path | None = None,
    progress: Progress | None = None,
    tracking: TrackingSettings | None = None,
    reuse: bool = False,
    scratch: Path | None = None,
    experiment: str | None = None,
) -> EvalResult:
    """Measure artifacts (and their runtimes' floors), draw the chart, and record each variant's MLflow run.

    Raises:
        TrackingError: the tracking server is unreachable (checked before measuring).
        ArtifactError, EvaluationError: see :func:`hubquant.evaluate.evaluate`.
    """
    from hubquant.evaluate import evaluate
    from hubquant.tracking import LogCapture

    tracker = _open_tracker(source, tracking, experiment)
    capture = LogCapture()
    say = _progress(capture, progress)
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(tracker)
        with capture:
            rows = evaluate(
                artifacts,
                source,
                text=text,
                settings=settings,
                gate=gate,
                progress=say,
                reuse=reuse,
                build_floor=FloorBuilder(source, scratch or artifacts[0].path.parent, scratch, say),
            )
        if plot is not None:
            from hubquant.plot import plot_tradeoff

            plot = plot_tradeoff([r for r in rows if not r.error], plot, title=source.name)
        if tracker is not None:
            _record_evaluation(tracker, artifacts, rows, capture, plot)
        return EvalResult(rows=rows, tracking=_summary(tracker), plot=plot)


def _record_evaluation(
    tracker: Tracker, artifacts: list[Artifact], rows: list[Evaluation], capture: LogCapture, plot: Path | None
) -> None:
    from hubquant.errors import EvaluationError

    by_path = {str(a.path): a for a in artifacts}
    for row in rows[1:]:
        artifact = by_path[str(row.path)]
        spec = VariantSpec(format=artifact.format, precision=artifact.precision, options=artifact.options)
        run_id = tracker.variant_run(spec, key=artifact.manifest.cache_key, name=artifact.path.name)
        tracker.log_artifact_files(run_id, artifact)
        tracker.log_evaluation(run_id, row, eval_json=artifact.path / "eval.json", model_name=artifact.path.name)
        tracker.client.log_text(run_id, capture.text(), "logs/eval.log")
        if row.error:
            tracker.fail_variant(run_id, EvaluationError(row.error))
        else:
            tracker.finish_variant(run_id)
    tracker.log_comparison(rows, plot=plot)


@dataclass
class PublishResult:
    quantized: QuantizeResult
    evaluation: EvalResult | None = None
    pushed: PushOutcome | None = None
    held_back: list[tuple[Artifact, str]] = field(default_factory=list)


def publish(
    recipe: Recipe,
    *,
    push: PushSettings | None,
    token: str | None,
    tracking: TrackingSettings | None,
    progress: Progress | None = None,
    plot: Path | None = None,
) -> PublishResult:
    """The whole flow: export every variant → evaluate → log to MLflow → gate → push what passed.

    Re-running after a failure resumes: finished artifacts are reused (cache key), evaluations too
    (same artifact, text and settings), and files the Hub already holds are not uploaded again.
    ``push=None`` stops after the gate (a GitHub Actions matrix job; the publish job pushes).
    """
    from hubquant.evaluate import EvalSettings, GateSettings
    from hubquant.publishing import gated, push_artifacts
    from hubquant.text import eval_text

    say = progress or (lambda line: None)
    quantized = quantize(recipe, progress=say, tracking=tracking)
    result = PublishResult(quantized=quantized)
    if not quantized.artifacts:
        return result
    section = recipe.eval
    text = eval_text(text_path=section.text, dataset=section.dataset, fallback=True)
    if section.dataset and text.builtin:
        say(f"evaluation: {section.dataset} cannot be loaded here (offline?); scoring the built-in text instead")
    result.evaluation = evaluate_artifacts(
        quantized.artifacts,
        quantized.source,
        text=text,
        settings=EvalSettings.of(section),
        gate=GateSettings.of(section),
        plot=plot,
        progress=say,
        tracking=tracking,
        reuse=True,
        scratch=recipe.scratch,
        experiment=recipe.experiment,  # the same runs the builds were recorded in
    )
    passed, result.held_back = gated(quantized.artifacts)
    for artifact, why in result.held_back:
        say(f"{artifact.path.name}: not published ({why})")
    for row in result.evaluation.rows:
        if row.fidelity is not None and row.fidelity.deviates and row.gate.passed:
            say(
                f"{row.label}: published with a runtime finding on its card ({row.fidelity.format} deviates "
                "unquantized; set eval.max_runtime_kl to hold such variants back)"
            )
    if push is not None and passed:
        result.pushed = push_artifacts(passed, push, token=token, progress=say)
    return result
