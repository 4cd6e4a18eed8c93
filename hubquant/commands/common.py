"""What every command shares: progress lines, --option parsing, the MLflow flags.

Commands live in this package, one module per stage; :mod:`hubquant.cli` assembles them into the
``hubquant`` group and turns errors into one line in one place.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

import click

from hubquant.errors import RecipeError


def debug() -> bool:
    """Whether ``HUBQUANT_DEBUG`` asks for tracebacks and the tools' own logs."""
    return os.environ.get("HUBQUANT_DEBUG", "") not in ("", "0", "false", "False")


class Progress:
    """Prints one line per step to stderr with the elapsed time (stdout stays clean for --json)."""

    def __init__(self, quiet: bool = False) -> None:
        self.started = time.perf_counter()
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.started:6.1f}s] {line}", err=True)


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
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


def tracking_options(command: Any) -> Any:
    """--no-track / --experiment / --new-run, shared by every command that records runs."""
    command = click.option("--new-run", is_flag=True, help="Start new MLflow runs instead of updating this variant's.")(
        command
    )
    command = click.option("--experiment", help="MLflow experiment (default: hubquant/<model name>).")(command)
    command = click.option(
        "--no-track", is_flag=True, help="Do not record MLflow runs (default: MLFLOW_TRACKING_URI, else ./mlflow.db)."
    )(command)
    return command


def tracking(no_track: bool, experiment: str | None, new_run: bool) -> Any:
    from hubquant.pipeline import TrackingSettings

    return None if no_track else TrackingSettings(experiment=experiment, new_run=new_run)


def print_tracking(summary: Any) -> None:
    if summary is not None:
        click.echo(f"mlflow: {summary.where}", err=True)


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
