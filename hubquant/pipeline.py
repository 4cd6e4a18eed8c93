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
from typing import TYPE_CHECKING

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
from hubquant.exporters.base import Exporter, ExportJob, Progress
from hubquant.recipe import Recipe, VariantSpec
from hubquant.source import SourceModel, resolve_source

if TYPE_CHECKING:
    from hubquant.evaluate import EvalSettings, EvalText
    from hubquant.tracking import Tracker

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


def _as_export_error(exc: BaseException, spec: VariantSpec) -> HubquantError:
    if isinstance(exc, HubquantError):
        return exc
    return ExportError(f"{spec.format} {spec.precision} failed: {type(exc).__name__}: {exc}", format=spec.format,
                       precision=spec.precision, hint="run with HUBQUANT_DEBUG=1 for the full log")


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
    return TrackingSummary(uri=tracker.uri, experiment=tracker.experiment_name, parent_run_id=tracker.parent_id,
                           where=tracker.parent_url)


def quantize(recipe: Recipe, *, force: bool = False, progress: Progress | None = None,
             tracking: TrackingSettings | None = None) -> QuantizeResult:
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
    source = resolve_source(recipe.source, revision=recipe.revision)
    exporters = {spec.format: get_exporter(spec.format)() for spec in recipe.variants}
    for exporter in exporters.values():
        exporter.check_installed()
    output = Path(recipe.output)
    tracker = _open_tracker(source, tracking, recipe.experiment)
    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(tracker)
        if recipe.scratch is not None:
            prepare_output_root(Path(recipe.scratch), what="scratch")
        created = prepare_output_root(output)
        result = _quantize(source, exporters, recipe, output, force=force, progress=progress, tracker=tracker)
        result.tracking = _summary(tracker)
    if created and not result.artifacts:
        # Nothing was produced: leave no empty output folder behind.
        with contextlib.suppress(OSError):
            shutil.rmtree(output) if not any(output.iterdir()) else None
    return result


def _quantize(source: SourceModel, exporters: dict[str, Exporter], recipe: Recipe, output: Path, *, force: bool,
              progress: Progress | None, tracker: Tracker | None) -> QuantizeResult:
    from hubquant.tracking import LogCapture

    capture = LogCapture()
    say_user = progress or (lambda line: None)

    def say(line: str) -> None:
        capture.progress(line)
        say_user(line)

    remove_stale_temporaries(output)
    result = QuantizeResult(source=source, output=output)
    outcomes: dict[int, VariantResult] = {}
    runs: dict[int, str] = {}

    # The formats with the largest temporaries first (stable for equal ones: recipe order).
    for fmt, exporter in sorted(exporters.items(), key=lambda item: -item[1].scratch_share):
        tools = exporter.tool_versions()
        jobs: list[tuple[int, VariantSpec, ExportJob, Path, str]] = []
        for index, spec in enumerate(recipe.variants):
            if spec.format != fmt:
                continue
            target = output / exporter.folder_name(source, spec.precision, spec.options)
            key = cache_key(source_fingerprint=source.fingerprint, spec=spec.model_dump(mode="json"), tools=tools)
            if tracker is not None:
                runs[index] = tracker.variant_run(spec, key=key, name=target.name)
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
            scratch = Path(recipe.scratch) if recipe.scratch is not None else output
            with tempfile.TemporaryDirectory(prefix=".hubquant-tmp-work-", dir=scratch) as work_dir, capture:
                if recipe.scratch is not None:
                    say(f"{fmt}: intermediates in {work_dir}")
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
                                          shared_seconds=job.shared_seconds, warnings=job.warnings,
                                          settings=job.settings)
                commit_staging_folder(job.folder, target)
                outcomes[index] = VariantResult(spec=spec, artifact=Artifact(path=target, manifest=manifest,
                                                                             warnings=list(job.warnings)))
        finally:
            for _, _, job, _, _ in jobs:
                if job.folder.exists():
                    discard_staging_folder(job.folder)

    result.variants = [outcomes[i] for i in sorted(outcomes)]
    if tracker is not None:
        for index, outcome in outcomes.items():
            if outcome.artifact is not None:
                tracker.log_artifact_files(runs[index], outcome.artifact, log_text=capture.text())
                tracker.finish_variant(runs[index])
            else:
                tracker.fail_variant(runs[index], outcome.error)
    return result


@dataclass
class EvalResult:
    rows: list
    tracking: TrackingSummary | None = None
    plot: Path | None = None


def evaluate_artifacts(artifacts: list[Artifact], source: SourceModel, *, text: "EvalText", settings: "EvalSettings",
                       max_ppl_delta: float | None = None, max_kl: float | None = None, plot: Path | None = None,
                       progress: Progress | None = None, tracking: TrackingSettings | None = None,
                       reuse: bool = False) -> EvalResult:
    """Measure artifacts, draw the chart, and record everything on each variant's MLflow run.

    Raises:
        TrackingError: the tracking server is unreachable (checked before measuring).
        ArtifactError, EvaluationError: see :func:`hubquant.evaluate.evaluate`.
    """
    from hubquant.evaluate import evaluate
    from hubquant.recipe import VariantSpec
    from hubquant.tracking import LogCapture

    tracker = _open_tracker(source, tracking, None)
    capture = LogCapture()
    say_user = progress or (lambda line: None)

    def say(line: str) -> None:
        capture.progress(line)
        say_user(line)

    with contextlib.ExitStack() as stack:
        if tracker is not None:
            stack.enter_context(tracker)
        with capture:
            rows = evaluate(artifacts, source, text=text, settings=settings, max_ppl_delta=max_ppl_delta,
                            max_kl=max_kl, progress=say, reuse=reuse)
        if plot is not None:
            from hubquant.plot import plot_tradeoff

            plot = plot_tradeoff(rows, plot, title=source.name)
        if tracker is not None:
            by_path = {str(a.path): a for a in artifacts}
            for row in rows[1:]:
                artifact = by_path[row.path]
                variant = artifact.manifest["variant"]
                spec = VariantSpec(format=variant["format"], precision=variant["precision"],
                                   options=variant["options"])
                run_id = tracker.variant_run(spec, key=artifact.manifest["cache_key"], name=artifact.path.name)
                tracker.log_artifact_files(run_id, artifact)
                tracker.log_evaluation(run_id, row, eval_json=artifact.path / "eval.json", model_name=artifact.path.name)
                tracker.client.log_text(run_id, capture.text(), "logs/eval.log")
                tracker.finish_variant(run_id)
            tracker.log_comparison(rows, plot=plot)
        return EvalResult(rows=rows, tracking=_summary(tracker), plot=plot)


@dataclass
class PushSettings:
    """How ``hubquant push`` publishes: where, to whom, and whether for real."""

    namespace: str | None = None
    repo_id: str | None = None
    templates: dict[str, str] = field(default_factory=dict)
    private: bool = False
    create_pr: bool = False
    revision: str | None = None
    dry_run: bool = False
    stage_dir: Path = Path("hubquant-hub-staging")
    base_model: str | None = None
    collection: bool = True
    track: bool = True


@dataclass
class PushOutcome:
    results: list
    dry_run: bool
    reason: str = ""


def push_artifacts(artifacts: list[Artifact], settings: PushSettings, *, token: str | None,
                   progress: Progress | None = None) -> PushOutcome:
    """Plan the repos, render the cards, then stage them (dry run / no token) or push them.

    Published commits go back to each variant's MLflow run as ``hf.*`` tags when a tracking
    store is there (``MLFLOW_TRACKING_URI``, or ``./mlflow.db``).
    """
    from hubquant import hub, tracking

    say = progress or (lambda line: None)
    dry_run = settings.dry_run or not token
    reason = "--dry-run" if settings.dry_run else "no token (set HF_TOKEN or run 'hf auth login')" if not token else ""
    namespace = settings.namespace
    if namespace is None and settings.repo_id:
        namespace = settings.repo_id.split("/")[0]
    if namespace is None and not dry_run:
        from huggingface_hub import HfApi

        try:
            namespace = HfApi(endpoint=hub.hub_endpoint(), token=token).whoami()["name"]
        except Exception as exc:  # noqa: BLE001
            raise hub._translate(exc, repo_id="your namespace", endpoint=hub.hub_endpoint(),
                                 stage_name="checking the token for") from None
    namespace = namespace or "your-namespace"
    plans = hub.plan_repos(artifacts, namespace=namespace, templates=settings.templates, repo_id=settings.repo_id)
    source = artifacts[0].manifest.get("source", {})
    base_model = settings.base_model
    if base_model is not None and (not hub.HUB_ID_PATTERN.match(base_model) or Path(base_model).exists()):
        from hubquant.errors import RecipeError

        raise RecipeError(f"--base-model '{base_model}' is not a Hub model id", key="base_model",
                          hint="give the source's id on the Hub, e.g. microsoft/Phi-3.5-mini-instruct")
    # Only a Hub source (it has a revision) names its base model; a local folder never does.
    if base_model is None and source.get("revision") and hub.HUB_ID_PATTERN.match(source.get("id") or ""):
        base_model = source["id"]

    store = tracking.publishing_store() if settings.track else None
    runs: dict[str, str] = {}
    if store:
        try:
            by_key = tracking.variant_runs(store, [a.manifest.get("cache_key", "") for a in artifacts])
            runs = {a.path.name: by_key[a.manifest.get("cache_key", "")] for a in artifacts
                    if a.manifest.get("cache_key", "") in by_key}
        except Exception as exc:  # noqa: BLE001 - provenance is optional, publishing is not
            log.warning("MLflow runs not found in %s (%s): the cards carry no run ids", store, type(exc).__name__)
            store = None
    with tempfile.TemporaryDirectory(prefix="hubquant-card-") as scratch:
        say("rendering the model cards")
        chart = hub.draw_chart(artifacts, Path(scratch))
        hub.render(plans, base_model=base_model, chart=chart, mlflow_runs=runs)
        if dry_run:
            say(f"dry run ({reason}): staging under {settings.stage_dir}")
            results = hub.stage(plans, Path(settings.stage_dir), private=settings.private,
                                revision=settings.revision, create_pr=settings.create_pr)
            return PushOutcome(results=results, dry_run=True, reason=reason)
        title = f"{source.get('name', 'model')} — every format (hubquant)" if settings.collection else None
        results = hub.push(plans, token=token or "", private=settings.private, revision=settings.revision,
                           create_pr=settings.create_pr, collection=title, progress=say)
    if store:
        by_repo = {r.repo_id: r for r in results}
        for plan in plans:
            result = by_repo[plan.repo_id]
            for variant in plan.variants:
                run_id = runs.get(variant.folder)
                if run_id and (result.commit or result.unchanged):
                    tracking.record_publication(store, run_id, repo_id=plan.repo_id, commit=result.commit,
                                                url=result.pr_url or result.commit_url or plan.url)
    return PushOutcome(results=results, dry_run=False)


def gated(artifacts: list[Artifact]) -> tuple[list[Artifact], list[tuple[Artifact, str]]]:
    """Split artifacts into those whose ``eval.json`` passed the gate and those held back (with why)."""
    import json

    passed, held = [], []
    for artifact in artifacts:
        path = artifact.path / "eval.json"
        if not path.is_file():
            held.append((artifact, "not evaluated"))
            continue
        gate = json.loads(path.read_text(encoding="utf-8")).get("gate") or {"passed": True}
        if gate.get("passed", True):
            passed.append(artifact)
        else:
            held.append((artifact, "; ".join(gate.get("reasons", [])) or "failed the quality gate"))
    return passed, held


@dataclass
class PublishResult:
    quantized: QuantizeResult
    evaluation: EvalResult | None = None
    pushed: PushOutcome | None = None
    held_back: list[tuple[Artifact, str]] = field(default_factory=list)


def publish(recipe: Recipe, *, push: PushSettings | None, token: str | None, tracking: TrackingSettings | None,
            progress: Progress | None = None, plot: Path | None = None) -> PublishResult:
    """The whole flow: export every variant → evaluate → log to MLflow → gate → push what passed.

    Re-running after a failure resumes: finished artifacts are reused (cache key), evaluations too
    (same artifact, text and settings), and files the Hub already holds are not uploaded again.
    ``push=None`` stops after the gate (a GitHub Actions matrix job; the publish job pushes).
    """
    from hubquant.evaluate import EvalSettings, eval_text

    say = progress or (lambda line: None)
    quantized = quantize(recipe, progress=say, tracking=tracking)
    result = PublishResult(quantized=quantized)
    if not quantized.artifacts:
        return result
    section = recipe.eval
    settings = EvalSettings(context=section.context, max_windows=section.max_windows,
                            prompt_tokens=section.prompt_tokens, gen_tokens=section.gen_tokens,
                            reference_weights=section.reference_weights)
    result.evaluation = evaluate_artifacts(quantized.artifacts, quantized.source, text=eval_text(text_path=section.text),
                                           settings=settings, max_ppl_delta=section.max_ppl_delta,
                                           max_kl=section.max_kl, plot=plot, progress=say, tracking=tracking,
                                           reuse=True)
    passed, result.held_back = gated(quantized.artifacts)
    for artifact, why in result.held_back:
        say(f"{artifact.path.name}: not published ({why})")
    if push is not None and passed:
        result.pushed = push_artifacts(passed, push, token=token, progress=say)
    return result
