"""The ``hubquant`` command. Each command maps its options onto one library call and prints.

Errors are turned into one line and exit code 1 in one place (:func:`main`); set
``HUBQUANT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from hubquant import __version__
from hubquant.errors import HubquantError, RecipeError, redact

log = logging.getLogger("hubquant")


def _debug() -> bool:
    return os.environ.get("HUBQUANT_DEBUG", "") not in ("", "0", "false", "False")


class _Progress:
    """Prints one line per step to stderr with the elapsed time (stdout stays clean for --json)."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.started:6.1f}s] {line}", err=True)


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--option {pair!r} is not KEY=VALUE", key="option", hint="write --option imatrix=true")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{size} B"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hubquant")
@click.option("-v", "--verbose", is_flag=True, help="Log every step (HUBQUANT_DEBUG=1 adds tracebacks and tool logs).")
def cli(verbose: bool) -> None:
    """Quantize Microsoft Phi checkpoints to GGUF, ONNX, OpenVINO and MLX; measure and publish them."""
    level = logging.DEBUG if _debug() else logging.INFO if verbose else logging.WARNING
    if not (verbose or _debug()):
        # transformers' "Loading weights" bars add nothing to hubquant's own step lines.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=level, format="hubquant: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    if not _debug():
        for noisy in ("llama_cpp", "hf-to-gguf", "gguf", "transformers", "httpx", "urllib3", "filelock", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def tracking_options(command: Any) -> Any:
    """--no-track / --experiment / --new-run, shared by every command that records runs."""
    command = click.option("--new-run", is_flag=True, help="Start new MLflow runs instead of updating this variant's.")(command)
    command = click.option("--experiment", help="MLflow experiment (default: hubquant/<model name>).")(command)
    command = click.option("--no-track", is_flag=True,
                           help="Do not record MLflow runs (default: MLFLOW_TRACKING_URI, else ./mlflow.db).")(command)
    return command


def _tracking(no_track: bool, experiment: str | None, new_run: bool) -> Any:
    from hubquant.pipeline import TrackingSettings

    return None if no_track else TrackingSettings(experiment=experiment, new_run=new_run)


def _print_tracking(summary: Any) -> None:
    if summary is not None:
        click.echo(f"mlflow: {summary.where}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the formats as JSON.")
def formats(as_json: bool) -> None:
    """List every format with its precisions, options and defaults."""
    from hubquant.exporters import registered_exporters

    described = [cls.describe() for cls in registered_exporters().values()]
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for entry in described:
        click.echo(f"{entry['format']}: {entry['description']}  (pip install \"hubquant[{entry['extra']}]\")")
        generic = ", ".join(f"{k}→{v}" for k, v in entry["generic_precisions"].items())
        click.echo(f"  generic precisions: {generic}")
        click.echo("  precisions:")
        for name, text in entry["precisions"].items():
            click.echo(f"    {name:<9} {text}")
        if entry.get("targets"):
            click.echo("  targets (--option target=…):")
            for target, allowed in entry["targets"].items():
                click.echo(f"    {target:<9} {', '.join(allowed)}")
        click.echo("  options (--option KEY=VALUE):")
        for option in entry["options"]:
            click.echo(f"    {option['name']:<19} default {option['default']!r:<6} {option['help']}")


def _print_results(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([a.summary() for a in result.artifacts], indent=2))
    else:
        for variant in result.variants:
            artifact = variant.artifact
            if artifact is None:
                continue
            note = " (reused)" if artifact.reused else ""
            click.echo(f"{artifact.format:<5} {artifact.precision:<8} {_human_size(artifact.size_bytes):>9}  "
                       f"{artifact.path}{note}")
    for variant in result.variants:
        for warning in (variant.artifact.warnings if variant.artifact else []):
            click.echo(f"hubquant: warning: {warning}", err=True)
    for failure in result.failures:
        error = failure.error
        hint = f" — {error.hint}" if error.hint else ""
        click.echo(f"hubquant: error: {failure.spec.label}: {error.message}{hint}", err=True)


@cli.command()
@click.argument("source", required=False)
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False), help="Build the variants of a YAML recipe.")
@click.option("--format", "fmt", default="gguf", show_default=True, help="Output format (see 'hubquant formats').")
@click.option("--precision", "precisions", multiple=True,
              help="int4/int8/fp16/fp32 or a native name (Q4_K_M, IQ4_XS …); repeat for several.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="A format option; repeatable.")
@click.option("--revision", help="Hub branch, tag or commit of SOURCE.")
@click.option("--output", type=click.Path(file_okay=True), default="hubquant-out", show_default=True,
              help="Folder that receives one sub-folder per variant.")
@click.option("--scratch", type=click.Path(file_okay=False),
              help="Folder for intermediates (GGUF F16, OpenVINO IR, ONNX prequantized weights); default: inside --output.")
@click.option("--force", is_flag=True, help="Rebuild variants even when their inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the artifacts as JSON (path, format, precision, size, sha256).")
@tracking_options
def quantize(source: str | None, recipe_file: str | None, fmt: str, precisions: tuple[str, ...],
             options: tuple[str, ...], revision: str | None, output: str, scratch: str | None, force: bool,
             as_json: bool, no_track: bool, experiment: str | None, new_run: bool) -> None:
    """Quantize SOURCE (a local folder or a Hub id) into one or more variants.

    \b
    Examples:
      hubquant quantize ./Phi-3.5-mini-instruct --precision Q4_K_M --precision Q8_0
      hubquant quantize ./phi-4 --precision IQ4_XS --option imatrix=true
      hubquant quantize --recipe phi35.yaml
    """
    from hubquant.pipeline import quantize as run_quantize
    from hubquant.recipe import build_recipe, load_recipe

    if recipe_file:
        if source or precisions or options:
            raise RecipeError("--recipe cannot be combined with SOURCE, --precision or --option",
                              hint="put everything in the recipe, or use the flags without --recipe")
        recipe = load_recipe(recipe_file)
    else:
        if not source:
            raise RecipeError("no SOURCE given", hint="pass a model folder or Hub id, or --recipe FILE")
        data = {
            "source": source, "revision": revision, "output": output,
            "variants": [{"format": fmt, "precision": p, "options": _parse_options(options)}
                         for p in (precisions or ("int4",))],
        }
        recipe = build_recipe(data, origin="command line")
    if scratch:
        recipe = recipe.model_copy(update={"scratch": Path(scratch)})
    result = run_quantize(recipe, force=force, progress=_Progress(), tracking=_tracking(no_track, experiment, new_run))
    _print_results(result, as_json)
    _print_tracking(result.tracking)
    if result.failures:
        raise SystemExit(1)


@cli.command(name="eval")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--source", help="The source checkpoint (default: the one recorded in the first artifact's manifest).")
@click.option("--text", "text_path", type=click.Path(dir_okay=False), help="UTF-8 text to evaluate on (default: built-in).")
@click.option("--dataset", help="A datasets dataset as NAME[:CONFIG[:SPLIT]] (needs the Hub).")
@click.option("--context", default=512, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, help="Score at most this many windows.")
@click.option("--prompt-tokens", default=64, show_default=True, help="Prompt length for the speed test.")
@click.option("--gen-tokens", default=32, show_default=True, help="Tokens generated for the speed test.")
@click.option("--reference-weights", type=click.Choice(["auto", "fp32", "source"]), default="auto", show_default=True,
              help="The reference computes in float32; fp32 widens its weights once, source keeps them as stored "
                   "(half the memory for bf16, same logits); auto picks fp32 when it fits.")
@click.option("--max-ppl-delta", type=float, metavar="PCT", help="Quality gate: fail variants whose perplexity rises more.")
@click.option("--max-kl", type=float, metavar="X", help="Quality gate: fail variants whose mean KL is higher.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw size against Δ perplexity and KL to a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@tracking_options
def eval_command(artifacts: tuple[str, ...], source: str | None, text_path: str | None, dataset: str | None,
                 context: int, max_windows: int | None, prompt_tokens: int, gen_tokens: int, reference_weights: str,
                 max_ppl_delta: float | None, max_kl: float | None, plot_path: str | None, as_json: bool,
                 no_track: bool, experiment: str | None, new_run: bool) -> None:
    """Measure ARTIFACTS against their source on the same token ids and print the comparison.

    Writes eval.json beside each artifact. Exit code 2 when a variant fails the quality gate.

    \b
    Example:
      hubquant eval out/gguf-* --max-ppl-delta 5 --plot tradeoff.png
    """
    from hubquant.artifact import load_artifact
    from hubquant.evaluate import EvalSettings, eval_text, render_table, rows_as_json
    from hubquant.pipeline import evaluate_artifacts
    from hubquant.source import resolve_source

    loaded = [load_artifact(path) for path in artifacts]
    if source is None:
        source = loaded[0].manifest.get("source", {}).get("path")
        if not source:
            raise RecipeError("the artifact's manifest names no source", hint="pass --source")
    resolved = resolve_source(source)
    text = eval_text(text_path=text_path, dataset=dataset)
    settings = EvalSettings(context=context, max_windows=max_windows, prompt_tokens=prompt_tokens,
                            gen_tokens=gen_tokens, reference_weights=reference_weights)
    result = evaluate_artifacts(loaded, resolved, text=text, settings=settings, max_ppl_delta=max_ppl_delta,
                                max_kl=max_kl, plot=Path(plot_path) if plot_path else None,
                                progress=_Progress(quiet=as_json), tracking=_tracking(no_track, experiment, new_run))
    rows = result.rows
    if as_json:
        click.echo(json.dumps(rows_as_json(rows, text=text, settings=settings), indent=2))
    else:
        click.echo(render_table(rows))
    if result.plot:
        click.echo(f"plot: {result.plot}", err=True)
    _print_tracking(result.tracking)
    if any(not row.gate["passed"] for row in rows):
        raise SystemExit(2)


@cli.command()
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--style", type=click.Choice(["phi3", "phi4"]), default="phi3", show_default=True,
              help="phi3: SentencePiece tokenizer; phi4: byte-level BPE.")
@click.option("--seed", default=0, show_default=True, help="Seed for the tokenizer, weights and training batches.")
@click.option("--steps", default=300, show_default=True, help="Training steps (0 keeps random weights).")
def tiny(output: str, style: str, seed: int, steps: int) -> None:
    """Build a tiny trained Phi checkpoint in OUTPUT (for trying hubquant without a download)."""
    from hubquant.errors import OutputError
    from hubquant.tiny import build_tiny_phi

    if Path(output).exists():
        raise OutputError(f"{output} already exists", path=output, hint="choose a new folder; hubquant never overwrites it")
    click.echo(str(build_tiny_phi(output, style=style, seed=seed, steps=steps)))  # type: ignore[arg-type]


@cli.command()
@click.option("--output", type=click.Path(file_okay=True), default="hubquant-demo", show_default=True,
              help="Folder for the demo's variants.")
def demo(output: str) -> None:
    """Run the main job on the embedded default: a tiny Phi-3-style model through 'publish', all four formats, Hub dry run.

    The tiny model is built once (about a minute) and cached; re-running reuses everything.
    """
    from hubquant.demo import run_demo

    progress = _Progress()
    table = run_demo(Path(output), progress=progress)
    click.echo(table)


def _publish_recipe(recipe_file: str | None, source: str | None, profile: str | None, formats: tuple[str, ...],
                    variants: tuple[int, ...], revision: str | None = None) -> Any:
    """The recipe of ``publish``/``plan``: a file, or SOURCE + --profile; narrowed by --format/--variant."""
    from hubquant.recipe import build_recipe, only_formats, profile_variants, read_recipe_data

    data: Any = read_recipe_data(recipe_file) if recipe_file else {}
    origin = recipe_file or "command line"
    if not isinstance(data, dict):
        build_recipe(data, origin=origin)  # raises the recipe module's own "not a mapping" error
    if source:
        data["source"] = source
    if revision:
        data["revision"] = revision
    if profile:
        data["variants"] = list(data.get("variants") or []) + [v for v in profile_variants(profile)
                                                               if v not in (data.get("variants") or [])]
    if "source" not in data:
        raise RecipeError("no source given", hint="pass RECIPE.yaml, or --source MODEL with --profile")
    recipe = build_recipe(data, origin=origin)
    if variants:
        bad = [i for i in variants if not 0 <= i < len(recipe.variants)]
        if bad:
            raise RecipeError(f"--variant {bad[0]} is out of range", key="variant",
                              allowed=[str(i) for i in range(len(recipe.variants))])
        recipe = recipe.model_copy(update={"variants": [recipe.variants[i] for i in variants]})
    if formats:
        recipe = only_formats(recipe, formats)
    return recipe


@cli.command()
@click.argument("recipe_file", required=False, metavar="[RECIPE]")
@click.option("--source", help="Source model (instead of, or overriding, the recipe's).")
@click.option("--revision", help="Hub branch, tag or commit of the source.")
@click.option("--profile", type=click.Choice(["mobile", "ai-pc", "all"]),
              help="Add a device profile's variants: mobile = INT4 of every format, ai-pc = INT8 + FP16, all = both.")
@click.option("--format", "formats", multiple=True, help="Only this format's variants (repeatable; a CI matrix job).")
@click.option("--variant", "variants", multiple=True, type=int, help="Only the recipe's variant number N (repeatable).")
@click.option("--namespace", help="Hub user or organisation (default: the recipe's hub.namespace, else the token's user).")
@click.option("--dry-run", is_flag=True, help="Stage the repos under --stage-dir instead of uploading.")
@click.option("--output", type=click.Path(file_okay=False), help="Folder for the variants (overrides the recipe's).")
@click.option("--scratch", type=click.Path(file_okay=False),
              help="Folder for intermediates (overrides the recipe's scratch; default: inside the output).")
@click.option("--skip-push", is_flag=True, help="Stop after the quality gate (a matrix job; 'hubquant push --gated' publishes).")
@click.option("--stage-dir", type=click.Path(file_okay=False), default="hubquant-hub-staging", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@tracking_options
def publish(recipe_file: str | None, source: str | None, revision: str | None, profile: str | None,
            formats: tuple[str, ...],
            variants: tuple[int, ...], namespace: str | None, dry_run: bool, output: str | None, scratch: str | None,
            skip_push: bool, stage_dir: str,
            as_json: bool, no_track: bool, experiment: str | None, new_run: bool) -> None:
    """Export every variant, evaluate, log to MLflow, apply the gate, push what passed.

    Re-running resumes: finished artifacts, evaluations and uploads are reused. Exit code 1 when
    a variant failed to build, 2 when the quality gate held one back.

    \b
    Examples:
      hubquant publish phi35.yaml
      hubquant publish --source microsoft/Phi-3.5-mini-instruct --profile mobile --dry-run
    """
    from huggingface_hub import get_token

    from hubquant.evaluate import render_table
    from hubquant.pipeline import PushSettings, publish as run_publish

    recipe = _publish_recipe(recipe_file, source, profile, formats, variants, revision)
    if output:
        recipe = recipe.model_copy(update={"output": Path(output)})
    if scratch:
        recipe = recipe.model_copy(update={"scratch": Path(scratch)})
    hub = recipe.hub
    push_settings = None if skip_push else PushSettings(
        namespace=namespace or hub.namespace, templates=hub.repo_names, private=hub.private,
        create_pr=hub.create_pr, revision=hub.revision, dry_run=dry_run, stage_dir=Path(stage_dir),
        base_model=hub.base_model, collection=hub.collection, track=not no_track)
    progress = _Progress()
    result = run_publish(recipe, push=push_settings, token=get_token(), tracking=_tracking(no_track, experiment, new_run),
                         progress=progress, plot=Path(recipe.output) / "tradeoff.png" if _has("matplotlib") else None)
    summary = {
        "variants": [{"label": v.spec.label, "path": str(v.artifact.path) if v.artifact else None,
                      "error": v.error.message if v.error else None} for v in result.quantized.variants],
        "held_back": [{"path": str(a.path), "reason": why} for a, why in result.held_back],
        "mlflow": result.evaluation.tracking.where if result.evaluation and result.evaluation.tracking else None,
        "hub": ({"dry_run": result.pushed.dry_run, "repos": [r.summary() for r in result.pushed.results]}
                if result.pushed else None),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        if result.evaluation is not None:
            click.echo(render_table(result.evaluation.rows))
        for variant in result.quantized.failures:
            click.echo(f"✗ {variant.spec.label}: {variant.error.message if variant.error else 'failed'}")
        for artifact, why in result.held_back:
            click.echo(f"held back: {artifact.path.name} ({why})")
        if summary["mlflow"]:
            click.echo(f"mlflow: {summary['mlflow']}")
        for repo in (result.pushed.results if result.pushed else []):
            where = repo.staged if result.pushed.dry_run else (repo.pr_url or repo.commit_url or f"{repo.url} (up to date)")
            click.echo(f"hub: {repo.repo_id}  {where}")
        if result.pushed and result.pushed.dry_run:
            click.echo(f"hub: dry run ({result.pushed.reason}) — nothing uploaded")
    if result.quantized.failures:
        raise SystemExit(1)
    if result.held_back:
        raise SystemExit(2)


def _markdown_summary(artifacts: list[Any], outcome: Any) -> str:
    """The report a CI job writes to its summary: every variant with its figures and gate, then the repos."""
    lines = ["## hubquant publish", "", "| variant | size | perplexity | Δ vs original | KL | gate |",
             "|---|---:|---:|---:|---:|---|"]
    for artifact in artifacts:
        path = artifact.path / "eval.json"
        evaluation = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if evaluation is None:
            lines.append(f"| {artifact.path.name} | {_human_size(artifact.size_bytes)} | — | — | — | not evaluated |")
            continue
        m, gate = evaluation["metrics"], evaluation.get("gate") or {"passed": True}
        lines.append(f"| {artifact.path.name} | {_human_size(artifact.size_bytes)} | {m['perplexity']:.3f} | "
                     f"{m['ppl_delta_pct']:+.2f}% | {m['kl_mean']:.2e} | "
                     f"{'passed' if gate.get('passed', True) else 'held back: ' + '; '.join(gate.get('reasons', []))} |")
    lines += ["", "| repo | result |", "|---|---|"]
    for result in outcome.results:
        if outcome.dry_run:
            what = f"staged {len(result.uploaded)} files (dry run)"
        elif result.commit is None:
            what = "up to date, nothing uploaded"
        else:
            what = f"[{(result.commit or '')[:10]}]({result.pr_url or result.commit_url})"
        lines.append(f"| [{result.repo_id}]({result.url}) | {what} |")
    return "\n".join(lines) + "\n\n"


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@cli.command()
@click.argument("recipe_file", required=False, metavar="[RECIPE]")
@click.option("--source", help="Source model (instead of, or overriding, the recipe's).")
@click.option("--revision", help="Hub branch, tag or commit of the source.")
@click.option("--profile", type=click.Choice(["mobile", "ai-pc", "all"]), help="Add a device profile's variants.")
@click.option("--github-matrix", is_flag=True, help="Print a GitHub Actions matrix (JSON) instead of a table.")
@click.option("--per-variant", is_flag=True, help="One matrix job per variant instead of one per format.")
def plan(recipe_file: str | None, source: str | None, revision: str | None, profile: str | None,
         github_matrix: bool, per_variant: bool) -> None:
    """Show the variants a recipe builds; --github-matrix prints them as a GitHub Actions matrix."""
    from hubquant.exporters import get_exporter

    recipe = _publish_recipe(recipe_file, source, profile, (), (), revision)
    if per_variant:
        include = [{"name": spec.label, "format": spec.format, "extra": get_exporter(spec.format).extra,
                    "variant": index} for index, spec in enumerate(recipe.variants)]
    else:
        formats = list(dict.fromkeys(spec.format for spec in recipe.variants))
        include = [{"name": fmt, "format": fmt, "extra": get_exporter(fmt).extra,
                    "variants": sum(1 for s in recipe.variants if s.format == fmt)} for fmt in formats]
    if github_matrix:
        click.echo(json.dumps({"include": include}, separators=(",", ":")))
        return
    for index, spec in enumerate(recipe.variants):
        options = " ".join(f"{k}={v}" for k, v in spec.options.items() if v not in (None, False))
        click.echo(f"{index:>3}  {spec.format:<9} {spec.precision:<10} {options}")


@cli.command()
@click.argument("artifacts", nargs=-1)
@click.option("--run", "run_ids", multiple=True, metavar="RUN_ID",
              help="Publish the variant an MLflow run logged (repeatable; MLFLOW_TRACKING_URI or ./mlflow.db).")
@click.option("--namespace", help="User or organisation to publish under (default: the token's user).")
@click.option("--repo-id", help="One repo for every artifact given (same format), instead of the conventional names.")
@click.option("--repo-name", "repo_names", multiple=True, metavar="FORMAT=TEMPLATE",
              help="Repo name template per format, e.g. gguf={model}-GGUF (fields: model, format, precision, variant).")
@click.option("--private", is_flag=True, help="Create new repos as private.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--revision", help="Branch to commit to (default: main).")
@click.option("--base-model", help="Hub id of the source, for the card's base_model (default: the source's Hub id).")
@click.option("--dry-run", is_flag=True, help="Stage what would be uploaded under --stage-dir; upload nothing.")
@click.option("--stage-dir", type=click.Path(file_okay=False), default="hubquant-hub-staging", show_default=True,
              help="Where a dry run (or a run without a token) stages the repos.")
@click.option("--no-collection", is_flag=True, help="Do not group the repos in a Hub collection.")
@click.option("--no-track", is_flag=True, help="Do not look up or tag the variants' MLflow runs.")
@click.option("--gated", is_flag=True, help="Publish only variants whose eval.json passed the quality gate.")
@click.option("--summary", "summary_file", type=click.Path(dir_okay=False),
              help="Append a Markdown report (variants, gate, repos) to this file, e.g. $GITHUB_STEP_SUMMARY.")
@click.option("--json", "as_json", is_flag=True, help="Print what was published (or staged) as JSON.")
def push(artifacts: tuple[str, ...], run_ids: tuple[str, ...], namespace: str | None, repo_id: str | None,
         repo_names: tuple[str, ...], private: bool, create_pr: bool, revision: str | None, base_model: str | None,
         dry_run: bool, stage_dir: str, no_collection: bool, no_track: bool, gated: bool, summary_file: str | None,
         as_json: bool) -> None:
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
    from hubquant.pipeline import PushSettings, push_artifacts
    from hubquant.tracking import TrackingError, artifact_path_of_run, publishing_store

    paths = [Path(a) for a in artifacts]
    if run_ids:
        store = publishing_store()
        if store is None:
            raise TrackingError("no MLflow store to read the runs from",
                                hint="set MLFLOW_TRACKING_URI, or run in the folder that holds mlflow.db")
        paths += [artifact_path_of_run(store, run_id) for run_id in run_ids]
    if not paths:
        raise RecipeError("nothing to publish", key="artifacts",
                          hint="pass artifact folders (hubquant push hubquant-out/*) or --run RUN_ID")
    templates = {}
    for pair in repo_names:
        fmt, sep, template = pair.partition("=")
        if not sep or not template:
            raise RecipeError(f"--repo-name {pair!r} is not FORMAT=TEMPLATE", key="repo_name",
                              hint="write --repo-name gguf={model}-GGUF")
        templates[fmt.strip().lower()] = template.strip()
    settings = PushSettings(namespace=namespace, repo_id=repo_id, templates=templates, private=private,
                            create_pr=create_pr, revision=revision, dry_run=dry_run, stage_dir=Path(stage_dir),
                            base_model=base_model, collection=not no_collection, track=not no_track)
    loaded = [load_artifact(p) for p in paths]
    everything = list(loaded)
    if gated:
        from hubquant.pipeline import gated as split_gated

        loaded, held = split_gated(loaded)
        for artifact, why in held:
            click.echo(f"held back: {artifact.path.name} ({why})", err=True)
        if not loaded:
            raise RecipeError("no variant passed the quality gate", key="artifacts",
                              hint="see eval.json of each variant; nothing was published")
    outcome = push_artifacts(loaded, settings, token=get_token(), progress=_Progress())
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(_markdown_summary(everything, outcome))
    if as_json:
        click.echo(json.dumps({"dry_run": outcome.dry_run, "repos": [r.summary() for r in outcome.results]}, indent=2))
        return
    for result in outcome.results:
        if outcome.dry_run:
            click.echo(f"{result.repo_id}: staged {len(result.uploaded)} file(s), {_human_size(result.uploaded_bytes)} "
                       f"in {result.staged}")
        elif result.commit is None:
            click.echo(f"{result.repo_id}: up to date, nothing uploaded  {result.url}")
        else:
            target = result.pr_url or result.commit_url
            click.echo(f"{result.repo_id}: {len(result.uploaded)} file(s), {_human_size(result.uploaded_bytes)} "
                       f"uploaded ({len(result.unchanged)} unchanged)  {target}")
    if outcome.dry_run:
        click.echo(f"dry run ({outcome.reason}): nothing was uploaded; each staged folder holds the files, "
                   "README.md and commit-plan.json")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every expected error into one line and exit code 1."""
    try:
        cli.main(args=argv, prog_name="hubquant", standalone_mode=False)
    except HubquantError as exc:
        if _debug():
            raise
        hint = f" — {exc.hint}" if exc.hint else ""
        click.echo(f"hubquant: error: {exc.message}{hint}", err=True)
        raise SystemExit(1) from None
    except click.exceptions.Abort:
        click.echo("hubquant: interrupted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("hubquant: interrupted", err=True)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - last resort: a bug, shown without a wall of traceback
        if _debug():
            raise
        click.echo(f"hubquant: internal error: {type(exc).__name__}: {redact(str(exc))} "
                   "— rerun with HUBQUANT_DEBUG=1 for the traceback and please report it", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
