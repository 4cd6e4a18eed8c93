"""Every error hubquant raises on purpose.

Each error inherits from the built-in exception it resembles, carries the fields a user needs
(format, path, key …) and a ``hint`` that says how to fix it. The CLI turns any of them into one
line and exit code 1 in one place (``hubquant.cli``); library code only raises.
"""

from __future__ import annotations

import re
from pathlib import Path

# Hugging Face user access tokens and anything that looks like a bearer credential.
_SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._\-]{8,}"),
    re.compile(r"(?i)(token[=:]\s*)[^\s,;]+"),
]


def redact(text: str) -> str:
    """Replace anything that looks like a token with ``***`` so it never reaches a message or log."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "***", text)
        else:
            text = pattern.sub("***", text)
    return text


class HubquantError(Exception):
    """Root of every hubquant error. ``hint`` tells the user what to do about it."""

    default_hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = redact(message)
        self.hint = redact(hint if hint is not None else self.default_hint)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class RecipeError(HubquantError, ValueError):
    """The recipe or the command-line flags describe something hubquant cannot build.

    ``key`` is the offending key (dotted path when nested), ``allowed`` what would be accepted.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        allowed: list[str] | tuple[str, ...] | None = None,
        hint: str | None = None,
    ) -> None:
        self.key = key
        self.allowed = list(allowed) if allowed is not None else None
        if hint is None and self.allowed is not None:
            hint = "use one of: " + ", ".join(self.allowed)
        super().__init__(message, hint=hint)


class SourceError(HubquantError, ValueError):
    """The source checkpoint cannot be used (missing, incomplete, corrupt)."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(message, hint=hint)


class UnsupportedModelError(SourceError):
    """The source is not a model of the supported Phi family."""


class OutputError(HubquantError, OSError):
    """The output location cannot be written."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        HubquantError.__init__(self, message, hint=hint)


class ArtifactError(HubquantError, ValueError):
    """An artifact folder is missing its manifest or does not match it."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(message, hint=hint)


class ExportError(HubquantError, RuntimeError):
    """A converter or quantizer failed for one variant."""

    def __init__(
        self, message: str, *, format: str | None = None, precision: str | None = None, hint: str | None = None
    ) -> None:
        self.format = format
        self.precision = precision
        super().__init__(message, hint=hint)


class MissingDependencyError(HubquantError, ImportError):
    """An optional library for one format is not installed."""

    def __init__(self, message: str, *, extra: str, hint: str | None = None) -> None:
        self.extra = extra
        super().__init__(message, hint=hint or f'install it with: pip install "hubquant[{extra}]"')


class RegistryError(HubquantError, TypeError):
    """An exporter class was declared wrongly or registered twice (a programming error)."""


class EvaluationError(HubquantError, ValueError):
    """The evaluation cannot run on the given text or artifacts, or a runtime failed while measuring."""


class HubError(HubquantError):
    """Publishing failed; the hint says what to do. The repo is left as it was."""


class TrackingError(HubquantError, ConnectionError):
    """The MLflow tracking store cannot be used."""


class TrackingLost(TrackingError):
    """The tracking server stopped answering in the middle of a run."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every clean-up Ctrl-C runs runs for it too
    (children stopped, staging folders removed, MLflow runs KILLED); the command exits 143."""


class FaultInjected(HubquantError, RuntimeError):
    """Raised at a stage named by ``HUBQUANT_FAULT=raise:STAGE`` (fault-injection tests only)."""


def key_path(parts: "list[str | int] | tuple[str | int, ...]") -> str:
    """One spelling of a recipe key path: ``variants[0].options.group_size``."""
    text = ""
    for part in parts:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text
