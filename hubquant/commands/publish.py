"""``hubquant publish``, ``plan`` and ``push``: the whole flow, its CI matrix, and the Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hubquant.commands.common import Progress, has_module, tracking, tracking_options
from hubquant.display import human_size
from hubquant.errors import RecipeError


def _push_settings(hub: Any, namespace: str | None, *, dry_run: bool, stage_dir: str, track: bool) -> Any:
    from hubquant.publishing import PushSettings

    return PushSettings(
        namespace=namespace or hub.namespace,
        templates=hub.repo_names,
        private=hub.private,
        create_pr=hub.create_pr,
        revision=hub.revision,
        dry_run=dry_run,
        stage_dir=Path(stage_dir),
        base_model=hub.base_model,
        collection=hub.collection,
        track=track,
    )


def _summary(result: Any) -> dict[str, Any]:
    """What ``publish --json`` prints."""
    evaluation, pushed = result.evaluation, result.pushed
    return {
        "variants": [
            {
                "label": v.spec.label,
                "path": str(v.artifact.path) if v.artifact else None,
                "error": v.error.message if v.error else None,
            }
            for v in result.quantized.variants
        ],
        "held_back": [{"path": str(a.path), "reason": why} for a, why in result.held_back],
        "mlflow": evaluation.tracking.where if evaluation and evaluation.tracking else None,
        "hub": {"dry_run": pushed.dry_run, "repos": [r.summary() for r in pushed.results]} if pushed else None,
    }


#: ``publish`` and ``push`` both append their report to a CI job's summary.
summary_option = click.option(
    "--summary",
    "summary_file",
    type=click.Path(dir_okay=False),
    help="Append a Markdown report (each variant's size, peak disk, figures and gate; the repos when pushed) "
    "to this file, e.g. $GITHUB_STEP_SUMMARY.",
)


def _append_summary(path: str, report: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(report)


def _write_summary(path: str, result: Any, formats: tuple[str, ...]) -> None:
    from hubquant.publishing import markdown_summary

    quantized = result.quantized
    title = "hubquant publish" + (f" — {', '.join(formats)}" if formats else "")
    failures = [(v.spec.label, v.error.message if v.error else "failed") for v in quantized.failures]
    _append_summary(path, markdown_summary(quantized.artifacts, result.pushed, title=title, failures=failures))


def _print_outcome(result: Any, summary: dict[str, Any]) -> None:
    from hubquant.table import render_table

    if result.evaluation is not None:
        click.echo(render_table(result.evaluation.rows))
    for variant in result.quantized.failures:
        click.echo(f"✗ {variant.spec.label}: {variant.error.message if variant.error else 'failed'}")
    for artifact, why in result.held_back:
        click.echo(f"held back: {artifact.path.name} ({why})")
    if summary["mlflow"]:
        click.echo(f"mlflow: {summary['mlflow']}")
    pushed = result.pushed
    for repo in pushed.results if pushed else []:
        where = repo.staged if pushed.dry_run else (repo.pr_url or repo.commit_url or f"{repo.url} (up to date)")
        click.echo(f"hub: {repo.repo_id}  {where}")
    if pushed and pushed.dry_run:
        click.echo(f"hub: dry run ({pushed.reason}) — nothing uploaded")


@click.command()
@click.argument("recipe_file", required=False, metavar="[RECIPE]")
@click.option("--source", help="Source model (instead of, or overriding, the recipe's).")
@click.option("--revision", help="Hub branch, tag or commit of the source.")
@click.option(
    "--profile",
    type=click.Choice(["mobile", "ai-pc", "all"]),
    help="Add a device profile's variants: mobile = INT4 of every format, ai-pc = INT8 + FP16, all = both.",
)
@click.option("--format", "formats", multiple=True, help="Only this format's variants (repeatable; a CI matrix job).")
@click.option("--variant", "variants", multiple=True, type=int, help="Only the recipe's variant number N (repeatable).")
@click.option(
    "--namespace", help="Hub user or organisation (default: the recipe's hub.namespace, else the token's user)."
)
@click.option("--dry-run", is_flag=True, help="Stage the repos under --stage-dir instead of uploading.")
@click.option("--output", type=click.Path(file_okay=False), help="Folder for the variants (overrides the recipe's).")
@click.option(
    "--scratch",
    type=click.Path(file_okay=False),
    help="Folder for intermediates (overrides the recipe's scratch; default: inside the output).",
)
@click.option(
    "--skip-push", is_flag=True, help="Stop after the quality gate (a matrix job; 'hubquant push --gated' publishes)."
)
@click.option("--stage-dir", type=click.Path(file_okay=False), default="hubquant-hub-staging", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@summary_option
@tracking_options
def publish(
    recipe_file: str | None,
    source: str | None,
    revision: str | None,
    profile: str | None,
    formats: tuple[str, ...],
    variants: tuple[int, ...],
    namespace: str | None,
    dry_run: bool,
    output: str | None,
    scratch: str | None,
    skip_push: bool,
    stage_dir: str,
    as_json: bool,
    summary_file: str | None,
    no_track: bool,
    experiment: str | None,
    new_run: bool,
) -> None:
    """Export every variant, evaluate, log to MLflow, apply the gate, push what passed.

    Re-running resumes: finished artifacts, evaluations and uploads are reused. Exit code 1 when
    a variant failed to build, 2 when the quality gate held one back.

    \b
    Examples:
      hubquant publish phi35.yaml
      hubquant publish --source microsoft/Phi-3.5-mini-instruct --profile mobile --dry-run
    """
    from huggingface_hub import get_token

    from hubquant.pipeline import publish as run_publish
    from hubquant.recipe import publish_recipe

    recipe = publish_recipe(
        recipe_file, source=source, profile=profile, formats=formats, variants=variants, revision=revision
    )
    updates = {"output": Path(output) if output else None, "scratch": Path(scratch) if scratch else None}
    recipe = recipe.model_copy(update={k: v for k, v in updates.items() if v is not None})
    push = (
        None
        if skip_push
        else _push_settings(recipe.hub, namespace, dry_run=dry_run, stage_dir=stage_dir, track=not no_track)
    )
    result = run_publish(
        recipe,
        push=push,
        token=get_token(),
        tracking=tracking(no_track, experiment, new_run),
        progress=Progress(),
        plot=Path(recipe.output) / "tradeoff.png" if has_module("matplotlib") else None,
    )
    _report(result, as_json=as_json, summary_file=summary_file, formats=formats)


def _report(result: Any, *, as_json: bool, summary_file: str | None, formats: tuple[str, ...]) -> None:
    """Print the outcome (and append the job summary); exit 1 for a failed build, 2 for a held-back variant."""
    summary = _summary(result)
    if summary_file:
        _write_summary(summary_file, result, formats)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_outcome(result, summary)
    if result.quantized.failures:
        raise SystemExit(1)
    if result.held_back:
        raise SystemExit(2)


@click.command()
@click.argument("recipe_file", required=False, metavar="[RECIPE]")
@click.option("--source", help="Source model (instead of, or overriding, the recipe's).")
@click.option("--revision", help="Hub branch, tag or commit of the source.")
@click.option("--profile", type=click.Choice(["mobile", "ai-pc", "all"]), help="Add a device profile's variants.")
@click.option("--github-matrix", is_flag=True, help="Print a GitHub Actions matrix (JSON) instead of a table.")
@click.option("--per-variant", is_flag=True, help="One matrix job per variant instead of one per format.")
def plan(
    recipe_file: str | None,
    source: str | None,
    revision: str | None,
    profile: str | None,
    github_matrix: bool,
    per_variant: bool,
) -> None:
    """Show the variants a recipe builds and what each costs (memory, disk, time); --github-matrix prints
    them as a GitHub Actions matrix, each job on a runner from the recipe's `runners` that holds it."""
    from hubquant.recipe import publish_recipe

    recipe = publish_recipe(recipe_file, source=source, profile=profile, revision=revision)
    if github_matrix:
        click.echo(json.dumps({"include": _matrix(recipe, per_variant=per_variant)}, separators=(",", ":")))
        return
    _print_plan(recipe)


def _matrix(recipe: Any, *, per_variant: bool) -> list[dict[str, Any]]:
    """The matrix's jobs (one per format, or per variant), each with its ``runner`` label."""
    from hubquant.exporters import get_exporter
    from hubquant.planner import choose_runner, estimate_run, source_shape

    shape = source_shape(recipe.source, recipe.revision) if recipe.runners else None

    def extra(fmt: str) -> str:  # a job that scores lm-eval tasks installs them too
        return get_exporter(fmt).extra + (",tasks" if recipe.eval.tasks else "")

    def runner(specs: list[Any]) -> str:
        if shape is None:
            return "ubuntu-latest"
        return choose_runner(estimate_run(shape, specs), recipe.runners, shape.weight_bytes)

    if per_variant:
        return [
            {"name": s.label, "format": s.format, "extra": extra(s.format), "variant": i, "runner": runner([s])}
            for i, s in enumerate(recipe.variants)
        ]
    formats = list(dict.fromkeys(spec.format for spec in recipe.variants))
    return [
        {
            "name": fmt,
            "format": fmt,
            "extra": extra(fmt),
            "variants": sum(1 for s in recipe.variants if s.format == fmt),
            "runner": runner([s for s in recipe.variants if s.format == fmt]),
        }
        for fmt in formats
    ]


def _refusals(recipe: Any) -> dict[str, str]:
    """Formats that would refuse a local source (a vision model's picture encoder they cannot carry), and why."""
    from hubquant.exporters import get_exporter
    from hubquant.source import resolve_source

    if not Path(recipe.source).exists():
        return {}  # a Hub source: its config is read when the run downloads it
    source = resolve_source(recipe.source)
    refused = {fmt: get_exporter(fmt).refusal(source) for fmt in dict.fromkeys(s.format for s in recipe.variants)}
    return {fmt: error.message for fmt, error in refused.items() if error is not None}


def _print_plan(recipe: Any) -> None:
    """The variants, each with its estimated peak memory, extra disk and time class, against this machine."""
    import os
    import shutil

    from hubquant.artifact import existing_parent
    from hubquant.planner import MEMORY_MARGIN, estimate, estimate_run, source_shape
    from hubquant.torch_runner import available_memory

    margin = 1 + MEMORY_MARGIN
    shape = source_shape(recipe.source, recipe.revision)
    free_memory = available_memory()
    free_disk = shutil.disk_usage(existing_parent(Path(recipe.scratch or recipe.output))).free
    click.echo(
        f"source: {recipe.source} ({shape.describe()}); here: {os.cpu_count()} cores, "
        f"{human_size(free_memory)} memory available, {human_size(free_disk)} disk free"
    )
    click.echo(f"{'#':>3}  {'format':<9} {'precision':<10} {'memory':>10} {'with mapped':>12} {'disk':>10}  time")
    refusals = _refusals(recipe)
    for index, spec in enumerate(recipe.variants):
        if spec.format in refusals:
            click.echo(f"{index:>3}  {spec.format:<9} {spec.precision:<10} refused: {refusals[spec.format]}")
            continue
        found = estimate(shape, spec)
        options = " ".join(f"{k}={v}" for k, v in spec.options.items() if v not in (None, False))
        if found is None:
            click.echo(f"{index:>3}  {spec.format:<9} {spec.precision:<10} {'(no measured figures)':>34}  {options}")
            continue
        over = "  ← more memory than is available here" if free_memory and found.memory * margin > free_memory else ""
        click.echo(
            f"{index:>3}  {spec.format:<9} {spec.precision:<10} {human_size(found.memory):>10} "
            f"{human_size(found.rss):>12} {human_size(found.disk):>10}  {found.time_class}  {options}{over}"
        )
    run = estimate_run(shape, [spec for spec in recipe.variants if spec.format not in refusals])
    click.echo(
        f"run: peak memory {human_size(run.memory)} (with mapped weights {human_size(run.rss)}), peak extra disk "
        f"{human_size(run.disk)} (formats with the largest intermediates first), {run.time_class}"
        + ("; more disk than is free here" if run.disk > free_disk else "")
    )


@click.command()
@click.argument("artifacts", nargs=-1)
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    metavar="RUN_ID",
    help="Publish the variant an MLflow run logged (repeatable; MLFLOW_TRACKING_URI or ./mlflow.db).",
)
@click.option("--namespace", help="User or organisation to publish under (default: the token's user).")
@click.option("--repo-id", help="One repo for every artifact given (same format), instead of the conventional names.")
@click.option(
    "--repo-name",
    "repo_names",
    multiple=True,
    metavar="FORMAT=TEMPLATE",
    help="Repo name template per format, e.g. gguf={model}-GGUF (fields: model, format, precision, variant).",
)
@click.option("--private", is_flag=True, help="Create new repos as private.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--revision", help="Branch to commit to (default: main).")
@click.option("--base-model", help="Hub id of the source, for the card's base_model (default: the source's Hub id).")
@click.option("--dry-run", is_flag=True, help="Stage what would be uploaded under --stage-dir; upload nothing.")
@click.option(
    "--stage-dir",
    type=click.Path(file_okay=False),
    default="hubquant-hub-staging",
    show_default=True,
    help="Where a dry run (or a run without a token) stages the repos.",
)
@click.option("--no-collection", is_flag=True, help="Do not group the repos in a Hub collection.")
@click.option("--no-track", is_flag=True, help="Do not look up or tag the variants' MLflow runs.")
@click.option("--gated", is_flag=True, help="Publish only variants whose eval.json passed the quality gate.")
@summary_option
@click.option("--json", "as_json", is_flag=True, help="Print what was published (or staged) as JSON.")
def push(
    artifacts: tuple[str, ...],
    run_ids: tuple[str, ...],
    namespace: str | None,
    repo_id: str | None,
    repo_names: tuple[str, ...],
    private: bool,
    create_pr: bool,
    revision: str | None,
    base_model: str | None,
    dry_run: bool,
    stage_dir: str,
    no_collection: bool,
    no_track: bool,
    gated: bool,
    summary_file: str | None,
    as_json: bool,
) -> None:
    """Publish ARTIFACTS (folders from 'hubquant quantize') to the Hugging Face Hub with model cards.

    The token comes from HF_TOKEN or 'hf auth login', the endpoint from HF_ENDPOINT. Without a
    token, or with --dry-run, the exact files, cards and commit plan are staged locally instead.

    \b
    Examples:
      hubquant push hubquant-out/* --namespace my-org
      hubquant push hubquant-out/gguf-Q4_K_M --dry-run
      hubquant push --run 0123abcd… --create-pr
    """
    from huggingface_hub import get_token

    from hubquant.artifact import load_artifact
    from hubquant.publishing import PushSettings, markdown_summary, push_artifacts

    settings = PushSettings(
        namespace=namespace,
        repo_id=repo_id,
        templates=_templates(repo_names),
        private=private,
        create_pr=create_pr,
        revision=revision,
        dry_run=dry_run,
        stage_dir=Path(stage_dir),
        base_model=base_model,
        collection=not no_collection,
        track=not no_track,
    )
    everything = [load_artifact(p) for p in _artifact_paths(artifacts, run_ids)]
    loaded = _gated(everything) if gated else everything
    outcome = push_artifacts(loaded, settings, token=get_token(), progress=Progress())
    if summary_file:
        _append_summary(summary_file, markdown_summary(everything, outcome))
    if as_json:
        click.echo(json.dumps({"dry_run": outcome.dry_run, "repos": [r.summary() for r in outcome.results]}, indent=2))
    else:
        _print_pushed(outcome)


def _artifact_paths(artifacts: tuple[str, ...], run_ids: tuple[str, ...]) -> list[Path]:
    from hubquant.tracking import TrackingError, artifact_path_of_run, publishing_store

    paths = [Path(a) for a in artifacts]
    if run_ids:
        store = publishing_store()
        if store is None:
            raise TrackingError(
                "no MLflow store to read the runs from",
                hint="set MLFLOW_TRACKING_URI, or run in the folder that holds mlflow.db",
            )
        paths += [artifact_path_of_run(store, run_id) for run_id in run_ids]
    if not paths:
        raise RecipeError(
            "nothing to publish",
            key="artifacts",
            hint="pass artifact folders (hubquant push hubquant-out/*) or --run RUN_ID",
        )
    return paths


def _templates(repo_names: tuple[str, ...]) -> dict[str, str]:
    templates = {}
    for pair in repo_names:
        fmt, sep, template = pair.partition("=")
        if not sep or not template:
            raise RecipeError(
                f"--repo-name {pair!r} is not FORMAT=TEMPLATE",
                key="repo_name",
                hint="write --repo-name gguf={model}-GGUF",
            )
        templates[fmt.strip().lower()] = template.strip()
    return templates


def _gated(artifacts: list[Any]) -> list[Any]:
    from hubquant.publishing import gated

    passed, held = gated(artifacts)
    for artifact, why in held:
        click.echo(f"held back: {artifact.path.name} ({why})", err=True)
    if not passed:
        raise RecipeError(
            "no variant passed the quality gate",
            key="artifacts",
            hint="see eval.json of each variant; nothing was published",
        )
    return passed


def _print_pushed(outcome: Any) -> None:
    for result in outcome.results:
        size = human_size(result.uploaded_bytes)
        if outcome.dry_run:
            click.echo(f"{result.repo_id}: staged {len(result.uploaded)} file(s), {size} in {result.staged}")
        elif result.commit is None:
            click.echo(f"{result.repo_id}: up to date, nothing uploaded  {result.url}")
        else:
            click.echo(
                f"{result.repo_id}: {len(result.uploaded)} file(s), {size} uploaded "
                f"({len(result.unchanged)} unchanged)  {result.pr_url or result.commit_url}"
            )
    if outcome.dry_run:
        click.echo(
            f"dry run ({outcome.reason}): nothing was uploaded; each staged folder holds the files, "
            "README.md and commit-plan.json"
        )
