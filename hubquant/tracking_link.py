"""hubquant's connection to MLflow: a dead server is told quickly, and once lost it stays lost.

MLflow retries each request 7 times with back-off (up to two minutes a call), so a server that
stops in the middle of a run used to keep hubquant waiting for many minutes, call after call, and
end in an internal error. Through :class:`Link` the first call that cannot reach the server marks
the link lost; that call and every later one raise :class:`~hubquant.errors.TrackingLost` at once,
whose message says what was kept and how to record it later.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from hubquant.errors import TrackingLost, redact

#: Fewer, shorter retries than MLflow's defaults (7 retries, back-off factor 2, 120 s timeout); a
#: user's own settings win.
RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def bounded_retries() -> None:
    for key, value in RETRIES.items():
        os.environ.setdefault(key, value)


def unreachable(exc: BaseException) -> bool:
    """Whether a failed MLflow call means the server is gone (not that it refused the request)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = str(exc)
    return "API request to" in text and "failed with exception" in text  # MLflow's wrapper of requests errors


class Link:
    """An ``MlflowClient`` (or any MLflow call, through :meth:`call`) that fails fast once the server is lost."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client = client
        self.uri = uri
        self.lost: str | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        return functools.partial(self.call, attribute) if callable(attribute) else attribute

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.lost is not None:
            raise self._error()
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.lost = type(exc).__name__
            raise self._error() from None

    def _error(self) -> TrackingLost:
        return TrackingLost(
            f"lost the MLflow tracking server at {redact(self.uri)} during the run ({self.lost}); "
            "its runs of this command stay as the server last saw them",
            hint="what was built or measured is kept in the output folder: run the same command again when the "
            "server is back (finished variants are reused, not rebuilt, and recorded then), or pass --no-track",
        )
