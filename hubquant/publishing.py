"""Publishing a set of artifacts: plan the repos, render the cards, stage or push, record in MLflow.

``hubquant push``, ``hubquant publish`` and the MLflow ``huggingface`` deployment target all go
through :func:`push_artifacts`. The Hub I/O itself is :mod:`hubquant.hub`; which variant goes
where is :mod:`hubquant.repos`; the card is :mod:`hubquant.card`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.errors import RecipeError
from hubquant.records import EVAL_FILE, MANIFEST, evaluation_document
from hubquant.source import HUB_ID_PATTERN

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.exporters.base import Progress
    from hubquant.hub import PushResult
    from hubquant.repos import RepoPlan

log = logging.getLogger(__name__)

CHART = "hubquant-tradeoff.png"


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
    results: list[PushResult]
    dry_run: bool
    reason: str = ""


def draw_chart(artifacts: list[Artifact], folder: Path) -> Path | None:
    """The size-vs-quality chart of every evaluated variant, or None (no evaluation, no matplotlib)."""
    from hubquant.errors import MissingDependencyError
    from hubquant.plot import plot_tradeoff

    rows = []
    for artifact in artifacts:
        evaluation = artifact.evaluation()
        if evaluation is None or evaluation.error:
            continue
        if not rows:
            rows.append(
                evaluation.model_copy(
                    update={"label": "original", "is_reference": True, "metrics": evaluation.reference}
                )
            )
        rows.append(evaluation)
    if len(rows) < 2:
        return None
    try:
        return plot_tradeoff(rows, folder / CHART, title=artifacts[0].manifest.source.name)
    except MissingDependencyError:
        log.info("matplotlib is not installed: the cards carry no chart")
        return None


def render(
    plans: list[RepoPlan],
    *,
    base_model: str | None,
    chart: Path | None = None,
    mlflow_runs: dict[str, str] | None = None,
    ci_run_url: str | None = None,
) -> None:
    """Fill every plan's generated files: README.md (the card), the chart, the records."""
    from hubquant.card import CardContext, build_card
    from hubquant.repos import public_source

    for plan in plans:
        context = CardContext(
            source=public_source(plan.variants[0].manifest),
            base_model=base_model,
            siblings=plans,
            chart_path=CHART if chart else None,
            mlflow_runs=mlflow_runs or {},
            ci_run_url=ci_run_url,
        )
        plan.generated["README.md"] = str(build_card(plan, context)).encode("utf-8")
        if chart:
            plan.generated[CHART] = chart.read_bytes()
        for variant in plan.variants:
            records = f"hubquant/{variant.folder}"
            public = variant.manifest.public().model_dump(mode="json")
            plan.generated[f"{records}/{MANIFEST}"] = (json.dumps(public, indent=2) + "\n").encode()
            evaluation = variant.evaluation
            if evaluation is not None:
                document = evaluation_document(evaluation.model_copy(update={"path": None}))
                document["source"] = public["source"]
                plan.generated[f"{records}/{EVAL_FILE}"] = (json.dumps(document, indent=2) + "\n").encode()


def ci_run_url() -> str | None:
    """The GitHub Actions run this process belongs to (documented GITHUB_* variables only)."""
    import os

    if os.environ.get("GITHUB_ACTIONS") == "true" and os.environ.get("GITHUB_RUN_ID"):
        return (
            f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/"
            f"{os.environ.get('GITHUB_REPOSITORY', '')}/actions/runs/{os.environ['GITHUB_RUN_ID']}"
        )
    return None


def _namespace(settings: PushSettings, *, token: str | None, dry_run: bool) -> str:
    from hubquant import hub
    from hubquant.repos import hub_endpoint

    if settings.namespace is not None:
        return settings.namespace
    if settings.repo_id:
        return settings.repo_id.split("/")[0]
    if dry_run:
        return "your-namespace"
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=hub_endpoint(), token=token).whoami()["name"]
    except Exception as exc:  # noqa: BLE001
        raise hub.translate_error(
            exc, repo_id="your namespace", endpoint=hub_endpoint(), stage_name="checking the token for"
        ) from None


def _base_model(settings: PushSettings, artifacts: list[Artifact]) -> str | None:
    base_model = settings.base_model
    if base_model is not None and (not HUB_ID_PATTERN.match(base_model) or Path(base_model).exists()):
        raise RecipeError(
            f"--base-model '{base_model}' is not a Hub model id",
            key="base_model",
            hint="give the source's id on the Hub, e.g. microsoft/Phi-3.5-mini-instruct",
        )
    source = artifacts[0].manifest.source
    # Only a Hub source (it has a revision) names its base model; a local folder never does.
    if base_model is None and source.revision and HUB_ID_PATTERN.match(source.id or ""):
        base_model = source.id
    return base_model


def _variant_runs(store: str | None, artifacts: list[Artifact]) -> tuple[str | None, dict[str, str]]:
    from hubquant import tracking

    if not store:
        return None, {}
    try:
        by_key = tracking.variant_runs(store, [a.manifest.cache_key for a in artifacts])
    except Exception as exc:  # noqa: BLE001 - provenance is optional, publishing is not
        log.warning("MLflow runs not found in %s (%s): the cards carry no run ids", store, type(exc).__name__)
        return None, {}
    return store, {a.path.name: by_key[a.manifest.cache_key] for a in artifacts if a.manifest.cache_key in by_key}


def _record(store: str, plans: list[RepoPlan], results: list[PushResult], runs: dict[str, str]) -> None:
    """Each published variant's repo, commit and URL as ``hf.*`` tags on its MLflow run."""
    from hubquant import tracking

    by_repo = {r.repo_id: r for r in results}
    for plan in plans:
        result = by_repo[plan.repo_id]
        for variant in plan.variants:
            run_id = runs.get(variant.folder)
            if run_id and (result.commit or result.unchanged):
                url = result.pr_url or result.commit_url or plan.url
                tracking.record_publication(store, run_id, repo_id=plan.repo_id, commit=result.commit, url=url)


def push_artifacts(
    artifacts: list[Artifact], settings: PushSettings, *, token: str | None, progress: Progress | None = None
) -> PushOutcome:
    """Plan the repos, render the cards, then stage them (dry run / no token) or push them.

    Published commits go back to each variant's MLflow run as ``hf.*`` tags when a tracking
    store is there (``MLFLOW_TRACKING_URI``, or ``./mlflow.db``).
    """
    from hubquant import hub, tracking
    from hubquant.repos import plan_repos

    say = progress or (lambda line: None)
    dry_run = settings.dry_run or not token
    reason = "--dry-run" if settings.dry_run else "no token (set HF_TOKEN or run 'hf auth login')" if not token else ""
    namespace = _namespace(settings, token=token, dry_run=dry_run)
    plans = plan_repos(artifacts, namespace=namespace, templates=settings.templates, repo_id=settings.repo_id)
    base_model = _base_model(settings, artifacts)
    store, runs = _variant_runs(tracking.publishing_store() if settings.track else None, artifacts)
    with tempfile.TemporaryDirectory(prefix="hubquant-card-") as scratch:
        say("rendering the model cards")
        render(
            plans,
            base_model=base_model,
            chart=draw_chart(artifacts, Path(scratch)),
            mlflow_runs=runs,
            ci_run_url=ci_run_url(),
        )
        if dry_run:
            say(f"dry run ({reason}): staging under {settings.stage_dir}")
            results = hub.stage(
                plans,
                Path(settings.stage_dir),
                private=settings.private,
                revision=settings.revision,
                create_pr=settings.create_pr,
            )
            return PushOutcome(results=results, dry_run=True, reason=reason)
        title = f"{artifacts[0].manifest.source.name} — every format (hubquant)" if settings.collection else None
        results = hub.push(
            plans,
            token=token or "",
            private=settings.private,
            revision=settings.revision,
            create_pr=settings.create_pr,
            collection=title,
            progress=say,
        )
    if store:
        _record(store, plans, results, runs)
    return PushOutcome(results=results, dry_run=False)


def gated(artifacts: list[Artifact]) -> tuple[list[Artifact], list[tuple[Artifact, str]]]:
    """Split artifacts into those whose ``eval.json`` passed the gate and those held back (with why)."""
    passed, held = [], []
    for artifact in artifacts:
        evaluation = artifact.evaluation()
        if evaluation is None:
            held.append((artifact, "not evaluated"))
        elif evaluation.gate.passed:
            passed.append(artifact)
        else:
            held.append((artifact, "; ".join(evaluation.gate.reasons) or "failed the quality gate"))
    return passed, held


def markdown_summary(
    artifacts: list[Artifact],
    outcome: PushOutcome | None = None,
    *,
    title: str = "hubquant publish",
    failures: list[tuple[str, str]] | None = None,
) -> str:
    """The report a CI job writes to its summary: every variant with its size, the peak disk of its build,
    its figures (±) and gate, the variants that failed to build, then the repos (when pushed)."""
    from hubquant import display

    lines = [
        f"## {title}",
        "",
        "| variant | size | peak disk | perplexity | Δ vs original | KL | runtime floor | gate |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for artifact in artifacts:
        evaluation, size = artifact.evaluation(), display.human_size(artifact.size_bytes)
        peak = artifact.manifest.peak_disk_bytes
        disk = "—" if peak is None else display.human_size(peak)
        if evaluation is None:
            lines.append(f"| {artifact.path.name} | {size} | {disk} | — | — | — | — | not evaluated |")
            continue
        m, gate, floor = evaluation.metrics, evaluation.gate, evaluation.fidelity
        floor_text = (
            "—"
            if floor is None
            else (f"deviates (KL {floor.kl_mean:.2e})" if floor.deviates else f"within rounding ({floor.precision})")
        )
        verdict = "passed" if gate.passed else "held back: " + "; ".join(gate.reasons)
        ppl = display.plus_minus(m.perplexity, m.perplexity_stderr, ".3f")
        lines.append(
            f"| {artifact.path.name} | {size} | {disk} | {ppl} | "
            f"{display.delta_pct(m.ppl_delta_pct, m.ppl_delta_pct_stderr)} | "
            f"{display.scientific(m.kl_mean, m.kl_mean_stderr)} | {floor_text} | {verdict} |"
        )
    for label, message in failures or []:
        reason = " ".join(message.split()).replace("|", "/")  # one table cell: no line breaks, no pipes
        lines.append(f"| {label} | — | — | — | — | — | — | failed: {reason} |")
    lines.append("")
    if any(a.manifest.peak_disk_bytes is not None for a in artifacts):
        lines += ["Peak disk: the most its format's build held at once (intermediates and outputs), measured.", ""]
    if outcome is not None:
        lines += [*_repo_lines(outcome), ""]
    return "\n".join(lines) + "\n"


def _repo_lines(outcome: PushOutcome) -> list[str]:
    lines = ["| repo | result |", "|---|---|"]
    for result in outcome.results:
        if outcome.dry_run:
            what = f"staged {len(result.uploaded)} files (dry run)"
        elif result.commit is None:
            what = "up to date, nothing uploaded"
        else:
            what = f"[{(result.commit or '')[:10]}]({result.pr_url or result.commit_url})"
        lines.append(f"| [{result.repo_id}]({result.url}) | {what} |")
    return lines
