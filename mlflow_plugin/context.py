"""GitHub Actions run context for every MLflow run (``mlflow.run_context_provider`` entry point)."""

from __future__ import annotations

import logging
import warnings

from mlflow.tracking.context.abstract_context import RunContextProvider

log = logging.getLogger(__name__)


class GitHubActionsRunContext(RunContextProvider):
    """Tags from the documented ``GITHUB_*`` variables when ``GITHUB_ACTIONS=true``; nothing elsewhere.

    Never reads a token. A failure here warns and adds no tags: it must not stop a run from starting.
    """

    def in_context(self) -> bool:
        import os

        return os.environ.get("GITHUB_ACTIONS") == "true"

    def tags(self) -> dict[str, str]:
        try:
            from hubquant.tracking import github_tags

            return github_tags()
        except Exception as exc:  # noqa: BLE001 - never break run creation
            warnings.warn(f"hubquant's GitHub Actions run context is unavailable: {exc}", stacklevel=2)
            return {}
