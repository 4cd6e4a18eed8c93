"""The ``hubquant`` command. Each command maps its options onto one library call and prints.

The commands live in :mod:`hubquant.commands` (one module per stage); this module assembles the
group and turns every expected error into one line and exit code 1 in one place (:func:`main`);
set ``HUBQUANT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import click

from hubquant import __version__
from hubquant.commands import build, measure, publish
from hubquant.commands.common import debug
from hubquant.errors import HubquantError, Terminated, redact
from hubquant.faults import checkpoint

log = logging.getLogger("hubquant")

#: Set (unless already set) when neither -v nor HUBQUANT_DEBUG asks for the libraries' own output.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
#: Third-party loggers that only speak at ERROR unless -v (INFO) or HUBQUANT_DEBUG (everything).
NOISY_LOGGERS = (
    "llama_cpp",
    "hf-to-gguf",
    "gguf",
    "transformers",
    "httpx",
    "urllib3",
    "filelock",
    "matplotlib",
    "py.warnings",
    "nncf",
    "optimum",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hubquant")
@click.option("-v", "--verbose", is_flag=True, help="Log every step (HUBQUANT_DEBUG=1 adds tracebacks and tool logs).")
def cli(verbose: bool) -> None:
    """Quantize Microsoft Phi checkpoints to GGUF, ONNX, OpenVINO and MLX; measure and publish them."""
    level = logging.DEBUG if debug() else logging.INFO if verbose else logging.WARNING
    if not (verbose or debug()):
        # Third-party progress bars and advice (transformers' rope_parameters and torch_dtype notes,
        # the converter's "Writing" bar) add nothing to hubquant's own step lines; children inherit this.
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    logging.basicConfig(level=level, format="hubquant: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    logging.captureWarnings(True)  # warnings.warn from libraries goes through logging: shown with -v
    if not debug():
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


for command in (
    build.formats,
    build.quantize,
    measure.eval_command,
    build.tiny,
    build.setup,
    build.demo,
    publish.publish,
    publish.plan,
    publish.push,
):
    cli.add_command(command)


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """SIGTERM (how CI cancels a job, after SIGINT) ends the command as Ctrl-C does, exit code 143;
    a second SIGINT or SIGTERM while hubquant cleans up exits at once. Handlers are put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def force(signum: int, frame: object) -> None:
        os.write(2, b"hubquant: interrupted again, stopping now\n")
        os._exit(130 if signum == signal.SIGINT else 143)

    def first(signum: int, frame: object) -> None:
        for name in handled:
            signal.signal(name, force)
        checkpoint("interrupted")
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    # SIGINT ignored on entry (a background job) stays ignored, as the shell asked.
    handled = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {name: signal.signal(name, first) for name in handled}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn every expected error into one line and exit code 1."""
    try:
        with _signals():
            cli.main(args=argv, prog_name="hubquant", standalone_mode=False)
    except HubquantError as exc:
        if debug():
            raise
        hint = f" — {exc.hint}" if exc.hint else ""
        click.echo(f"hubquant: error: {exc.message}{hint}", err=True)
        raise SystemExit(1) from None
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns the interrupt into Abort; the signal behind it decides the exit code.
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("hubquant: terminated (SIGTERM); children stopped, nothing half-written kept", err=True)
            raise SystemExit(143) from None
        click.echo("hubquant: interrupted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(1) from None
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - last resort: a bug, shown without a wall of traceback
        if debug():
            raise
        click.echo(
            f"hubquant: internal error: {type(exc).__name__}: {redact(str(exc))} "
            "— rerun with HUBQUANT_DEBUG=1 for the traceback and please report it",
            err=True,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
