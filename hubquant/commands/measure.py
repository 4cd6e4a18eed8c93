"""``hubquant eval``: measure variants against their source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hubquant.commands.common import Progress, print_tracking, tracking, tracking_options
from hubquant.errors import RecipeError
from hubquant.recipe import EvalSection

#: The recipe's eval section is the one place the defaults are written.
EVAL_DEFAULTS = EvalSection.model_fields


@click.command(name="eval")
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--source", help="The source checkpoint (default: the one recorded in the first artifact's manifest).")
@click.option(
    "--text", "text_path", type=click.Path(dir_okay=False), help="UTF-8 text to evaluate on (default: built-in)."
)
@click.option("--dataset", help="A datasets dataset as NAME[:CONFIG[:SPLIT]] (needs the Hub).")
@click.option("--context", default=EVAL_DEFAULTS["context"].default, show_default=True, help="Tokens per window.")
@click.option("--max-windows", type=int, help="Score at most this many windows.")
@click.option(
    "--prompt-tokens",
    default=EVAL_DEFAULTS["prompt_tokens"].default,
    show_default=True,
    help="Prompt length for the speed test.",
)
@click.option(
    "--gen-tokens",
    default=EVAL_DEFAULTS["gen_tokens"].default,
    show_default=True,
    help="Tokens generated for the speed test.",
)
@click.option(
    "--reference-weights",
    type=click.Choice(["auto", "fp32", "source"]),
    default="auto",
    show_default=True,
    help="The reference computes in float32; fp32 widens its weights once, source keeps them as stored "
    "(half the memory for bf16, same logits); auto picks fp32 when it fits.",
)
@click.option(
    "--max-ppl-delta", type=float, metavar="PCT", help="Quality gate: fail variants whose perplexity rises more."
)
@click.option("--max-kl", type=float, metavar="X", help="Quality gate: fail variants whose mean KL is higher.")
@click.option(
    "--max-runtime-kl",
    type=float,
    metavar="X",
    help="Quality gate: fail every variant of a runtime whose own unquantized KL is higher.",
)
@click.option(
    "--fidelity/--no-fidelity",
    default=True,
    show_default=True,
    help="Measure each runtime's unquantized deviation from the reference (builds a full-precision "
    "variant when the run has none; deleted after).",
)
@click.option(
    "--tasks",
    metavar="TASK[,TASK…]",
    help="Also score lm-eval tasks on every variant and the reference: task or group names, or task YAML "
    "files / folders (needs hubquant[tasks]). Accuracy ± standard error and recovery vs the reference.",
)
@click.option("--limit", type=click.IntRange(min=1), help="With --tasks: score the first N examples of each task.")
@click.option(
    "--num-fewshot", type=click.IntRange(min=0), help="With --tasks: few-shot examples (default: the task's)."
)
@click.option(
    "--task-max-length",
    type=click.IntRange(min=16),
    default=EVAL_DEFAULTS["task_max_length"].default,
    show_default=True,
    help="With --tasks: tokens a request may use (at most the model's positions).",
)
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), help="Draw size against Δ perplexity and KL to a PNG."
)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@tracking_options
def eval_command(
    artifacts: tuple[str, ...],
    source: str | None,
    text_path: str | None,
    dataset: str | None,
    context: int,
    max_windows: int | None,
    prompt_tokens: int,
    gen_tokens: int,
    reference_weights: str,
    max_ppl_delta: float | None,
    max_kl: float | None,
    max_runtime_kl: float | None,
    fidelity: bool,
    plot_path: str | None,
    as_json: bool,
    no_track: bool,
    experiment: str | None,
    new_run: bool,
    **task_flags: Any,
) -> None:
    """Measure ARTIFACTS against their source on the same token ids and print the comparison.

    Every quality figure comes with its standard error; each runtime's own unquantized deviation
    (its fidelity floor) is measured and reported apart from the quantization's. Writes eval.json
    beside each artifact. Exit code 1 when a variant could not be measured (the others still are),
    2 when one fails the quality gate.

    \b
    Examples:
      hubquant eval out/gguf-* --max-ppl-delta 5 --plot tradeoff.png
      hubquant eval out/* --tasks arc_easy,hellaswag --limit 200
    """
    from hubquant.evaluate import EvalSettings, GateSettings
    from hubquant.pipeline import evaluate_artifacts
    from hubquant.text import eval_text

    loaded, resolved = _load(artifacts, source)
    settings = EvalSettings(
        context=context,
        max_windows=max_windows,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        reference_weights=reference_weights,
        fidelity=fidelity,
        tasks=_tasks(**task_flags),
    )
    result = evaluate_artifacts(
        loaded,
        resolved,
        text=eval_text(text_path=text_path, dataset=dataset),
        settings=settings,
        gate=GateSettings(max_ppl_delta=max_ppl_delta, max_kl=max_kl, max_runtime_kl=max_runtime_kl),
        plot=Path(plot_path) if plot_path else None,
        progress=Progress(quiet=as_json),
        tracking=tracking(no_track, experiment, new_run),
    )
    _report(result, as_json=as_json)


def _load(artifacts: tuple[str, ...], source: str | None) -> tuple[list[Any], Any]:
    """The artifacts, and their source (by default the one the first artifact's manifest names)."""
    from hubquant.artifact import load_artifact
    from hubquant.source import resolve_source

    loaded = [load_artifact(path) for path in artifacts]
    source = source or loaded[0].manifest.source.path
    if not source:
        raise RecipeError("the artifact's manifest names no source", hint="pass --source")
    return loaded, resolve_source(source)


def _tasks(tasks: str | None, limit: int | None, num_fewshot: int | None, task_max_length: int) -> Any:
    from hubquant.tasks import TaskSettings

    settings = TaskSettings.parse(tasks or "", limit=limit, num_fewshot=num_fewshot, max_length=task_max_length)
    if settings is None and (limit is not None or num_fewshot is not None):
        raise RecipeError("--limit and --num-fewshot apply to --tasks, and no task was named", hint="add --tasks")
    return settings


def _report(result: Any, *, as_json: bool) -> None:
    """Print the comparison; exit 1 when a variant could not be measured, 2 when one fails the gate."""
    from hubquant.table import render_table, rows_as_json

    click.echo(json.dumps(rows_as_json(result.rows), indent=2) if as_json else render_table(result.rows))
    if result.plot:
        click.echo(f"plot: {result.plot}", err=True)
    print_tracking(result.tracking)
    for row in result.failures:
        click.echo(f"hubquant: error: {row.label}: {row.error}", err=True)
    if result.failures:
        raise SystemExit(1)
    if any(not row.gate.passed for row in result.rows):
        raise SystemExit(2)
