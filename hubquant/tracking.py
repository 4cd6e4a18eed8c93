"""MLflow tracking: one parent run per (source, revision), one child run per variant.

- Target: ``MLFLOW_TRACKING_URI`` when set (a server; ``MLFLOW_TRACKING_TOKEN`` or
  ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` are read by MLflow itself from the environment), else
  MLflow's embedded local store ``sqlite:///<working folder>/mlflow.db``.
- A child run is identified by the variant's cache key (source fingerprint, spec, tool versions),
  so re-running the same variant updates the same run; ``new_run`` starts fresh ones.
- A variant that fails ends as a FAILED run with the error in the ``hubquant.error`` tag; the
  parent ends FAILED if any child did. Ctrl-C leaves KILLED runs, never RUNNING ones.
- Every value goes through :func:`hubquant.errors.redact`, and only documented fields are
  logged, so tokens never become params, tags or artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant import __version__
from hubquant.errors import HubquantError, MissingDependencyError, TrackingError, redact
from hubquant.tracking_link import Link, bounded_retries

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.recipe import VariantSpec
    from hubquant.records import Evaluation
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

LOCAL_STORE = "mlflow.db"
ROLE, PARENT, VARIANT = "hubquant.role", "parent", "variant"
KEY_TAG, SOURCE_TAG = "hubquant.variant_key", "hubquant.source_fingerprint"
FORMAT_TAG, PRECISION_TAG, ERROR_TAG = "hubquant.format", "hubquant.precision", "hubquant.error"
PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3 opens an experiment of this kind on its runs table, not on the GenAI traces overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: MLflow ≥ 3.10's UI ignores that tag: its "GenAI | Model training" switch (default GenAI, kept in the
#: browser) decides, and a link carrying this query opens the experiment on its runs table whatever the
#: switch says. Every experiment link hubquant prints carries it; the tag stays for the UIs that read it.
RUNS_VIEW_QUERY = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"
_PARAM_LIMIT = 6000  # MLflow's param value limit


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the embedded local store in the working folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / LOCAL_STORE}"


def experiment_link(server: str, experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment (or one of its runs), opened on the runs view, not GenAI's overview."""
    page = f"/runs/{run_id}" if run_id else ""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}{page}?{RUNS_VIEW_QUERY}"


def ui_hint(uri: str, experiment_id: str | None = None) -> str:
    """How to look at the runs."""
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_link(uri, experiment_id) if experiment_id else uri} in a browser"
    command = f"mlflow ui --backend-store-uri {uri}"
    return f"{command}, then open {experiment_link(LOCAL_UI, experiment_id)}" if experiment_id else command


def _client(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise MissingDependencyError(
            "tracking needs mlflow",
            extra="tracking",
            hint='install it with: pip install "hubquant[tracking]", or pass --no-track',
        ) from None
    return MlflowClient(tracking_uri=uri)


def _clean(value: Any) -> str:
    text = "" if value is None else value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return redact(text)[:_PARAM_LIMIT]


def setting_params(settings: dict[str, Any] | None) -> dict[str, str]:
    """How a variant was made (its manifest's ``settings``: shards, tensor types, calibration identity) as
    ``setting.*`` params, one level of nesting flattened (``setting.imatrix.sha256``)."""
    params: dict[str, str] = {}
    for key, value in (settings or {}).items():
        if isinstance(value, dict):
            params.update({f"setting.{key}.{k}": _clean(v) for k, v in value.items()})
        elif isinstance(value, list):
            params[f"setting.{key}"] = _clean("; ".join(str(item) for item in value))
        else:
            params[f"setting.{key}"] = _clean(value)
    return params


class Tracker:
    """Writes one source's runs. Create with :func:`open_tracker`; use as a context manager."""

    def __init__(self, uri: str, *, experiment: str, source: "SourceModel", new_run: bool = False) -> None:
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            bounded_retries()
        self.client = Link(_client(uri), uri)
        self.source = source
        self.new_run = new_run
        self.experiment_name = experiment
        self._check_reachable()
        self.experiment_id = self._experiment(experiment)
        self.parent_id: str | None = None
        self._open: set[str] = set()
        self._failed = False

    # -- set-up -------------------------------------------------------------------------------
    def _check_reachable(self) -> None:
        # One quick try: MLflow's default retries with back-off would keep a user waiting minutes.
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
        saved = {k: os.environ.get(k) for k in quick}
        os.environ.update(quick)
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a dead server
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {redact(self.uri)}: {type(exc).__name__}",
                hint="start the server or fix MLFLOW_TRACKING_URI, or pass --no-track to run without tracking",
            ) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        return self.client.create_experiment(
            name, tags={"hubquant.source": _clean(self.source.source_id), EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )

    def _find(self, filter_string: str) -> str | None:
        if self.new_run:
            return None
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def _start(self, run_id: str | None, *, name: str, tags: dict[str, str]) -> str:
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, ERROR_TAG, "")
        self._open.add(run_id)
        return run_id

    def _end(self, run_id: str, status: str) -> None:
        import contextlib
        import sys

        # MLflow prints "View run … at: URL" to stdout when a server tracks the run; stdout belongs
        # to hubquant's --json output, so the link goes to stderr with the other progress lines.
        with contextlib.redirect_stdout(sys.stderr):
            self.client.set_terminated(run_id, status=status)
        self._open.discard(run_id)

    # -- runs ---------------------------------------------------------------------------------
    def start_parent(self) -> str:
        """Open (or reopen) the parent run of this source and log its facts."""
        facts = self.source.facts()
        run_id = self._find(f"tags.`{ROLE}` = '{PARENT}' and tags.`{SOURCE_TAG}` = '{self.source.fingerprint}'")
        self.parent_id = self._start(
            run_id,
            name=f"{self.source.name}",
            tags={ROLE: PARENT, SOURCE_TAG: self.source.fingerprint, "hubquant.version": __version__, **github_tags()},
        )
        self._log(self.parent_id, params={f"source.{k}": v for k, v in facts.items() if k != "path"})
        return self.parent_id

    def variant_run(self, spec: "VariantSpec", *, key: str, name: str) -> str:
        """Open (or reopen) the child run of one variant, identified by its cache key."""
        assert self.parent_id, "start_parent() first"
        run_id = self._find(f"tags.`{KEY_TAG}` = '{key}'")
        run_id = self._start(
            run_id,
            name=name,
            tags={
                ROLE: VARIANT,
                KEY_TAG: key,
                PARENT_TAG: self.parent_id,
                FORMAT_TAG: spec.format,
                PRECISION_TAG: spec.precision,
                "hubquant.version": __version__,
                **github_tags(),
            },
        )
        params = {
            "format": spec.format,
            "precision": spec.precision,
            "source.id": self.source.source_id,
            "source.revision": self.source.revision,
            "source.fingerprint": self.source.fingerprint,
            "hubquant_version": __version__,
        }
        params.update({f"option.{k}": v for k, v in spec.options.items()})
        self._log(run_id, params=params)
        return run_id

    def _log(
        self,
        run_id: str,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        existing = self.client.get_run(run_id).data.params if params else {}
        param_list = [Param(k, _clean(v)) for k, v in (params or {}).items() if k not in existing]
        metric_list = [
            Metric(k, float(v), now, 0, model_id=model_id) for k, v in (metrics or {}).items() if v is not None
        ]
        tag_list = [RunTag(k, _clean(v)) for k, v in (tags or {}).items()]
        self.client.log_batch(run_id, metrics=metric_list, params=param_list, tags=tag_list)

    def log_artifact_files(self, run_id: str, artifact: "Artifact", *, log_text: str | None = None) -> None:
        """The variant's manifest (and eval.json when present), its tool versions and its log."""
        manifest = artifact.manifest
        self._log(
            run_id,
            params={**{f"tool.{k}": v for k, v in manifest.tools.items()}, **setting_params(manifest.settings)},
            metrics={
                "size_bytes": artifact.size_bytes,
                "export_seconds": manifest.export_seconds,
                "peak_disk_bytes": manifest.peak_disk_bytes,
            },
            tags={"hubquant.artifact_path": str(artifact.path), "hubquant.warnings": "; ".join(artifact.warnings)},
        )
        self.client.log_artifact(run_id, str(artifact.path / "manifest.json"))
        if log_text:
            self.client.log_text(run_id, redact(log_text), "logs/quantize.log")

    def finish_variant(self, run_id: str) -> None:
        self._end(run_id, "FINISHED")

    def fail_variant(self, run_id: str, error: BaseException) -> None:
        message = error.message if isinstance(error, HubquantError) else f"{type(error).__name__}: {error}"
        self.client.set_tag(run_id, ERROR_TAG, _clean(message))
        self.client.set_tag(run_id, "mlflow.note.content", _clean(f"Failed: {message}"))
        self._failed = True
        self._end(run_id, "FAILED")

    def log_evaluation(self, run_id: str, row: Evaluation, *, eval_json: Path | None, model_name: str) -> str:
        """Metrics (with ``*_stderr``) on the run and on the variant's LoggedModel; the runtime's fidelity
        floor as ``runtime_*`` metrics and a ``hubquant.runtime_finding`` tag; eval.json and the one-row table."""
        import mlflow

        metrics = {**row.numbers(), **fidelity_metrics(row)}
        model = self._logged_model(run_id, row, model_name)
        tags = {
            "hubquant.gate": "passed" if row.gate.passed else "failed",
            "hubquant.logged_model_id": model,
            "hubquant.runtime_finding": row.fidelity.finding if row.fidelity and row.fidelity.finding else "",
            "hubquant.eval_text": row.text.label or row.text.name,
            "hubquant.eval_text_sha256": row.text.sha256,
            "hubquant.eval_tokens_scored": str(row.text.tokens_scored),
        }
        self._log(run_id, metrics=metrics, tags=tags)
        self._log(run_id, metrics=metrics, model_id=model)
        if eval_json is not None and eval_json.is_file():
            self.client.log_artifact(run_id, str(eval_json))
        mlflow.set_tracking_uri(self.uri)
        self.client.call(
            mlflow.log_table,
            {"variant": [row.label], **{k: [v] for k, v in row.metrics.model_dump().items()}},
            artifact_file="eval_table.json",
            run_id=run_id,
        )
        return model

    def _logged_model(self, run_id: str, row: Evaluation, name: str) -> str:
        found = self.client.search_logged_models(
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1
        )
        if found:
            return found[0].model_id
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        model = self.client.call(
            mlflow.create_external_model,
            name=name,
            source_run_id=run_id,
            model_type="quantized-llm",
            experiment_id=self.experiment_id,
            params={
                "format": row.variant.format,
                "precision": row.variant.precision,
                **{f"option.{k}": _clean(v) for k, v in row.variant.options.items()},
            },
            tags={
                FORMAT_TAG: row.variant.format,
                PRECISION_TAG: row.variant.precision,
                "hubquant.artifact_path": _clean(row.path),
            },
        )
        return model.model_id

    def log_comparison(self, rows: list[Evaluation], *, plot: Path | None = None) -> None:
        """The whole comparison table (and the chart) on the parent run."""
        import mlflow

        assert self.parent_id
        mlflow.set_tracking_uri(self.uri)
        table: dict[str, list[Any]] = {"variant": [r.label for r in rows]}
        for key in rows[0].metrics.model_dump():
            table[key] = [getattr(r.metrics, key) for r in rows]
        table["gate"] = ["passed" if r.gate.passed else "failed" for r in rows]
        table["error"] = [r.error or "" for r in rows]
        self.client.call(mlflow.log_table, table, artifact_file="comparison.json", run_id=self.parent_id)
        if plot is not None and plot.is_file():
            self.client.log_artifact(self.parent_id, str(plot))

    def close(self, *, interrupted: bool = False, crashed: bool = False) -> None:
        """End every run still open: KILLED after Ctrl-C, FAILED after an error, else FINISHED.

        The parent ends FAILED when any child failed.
        """
        leftover = "KILLED" if interrupted else "FAILED" if crashed else "FINISHED"
        for run_id in list(self._open):
            if run_id != self.parent_id:
                self._failed = self._failed or leftover == "FAILED"
                self._end(run_id, leftover)
        if self.parent_id in self._open:
            self._end(self.parent_id, "KILLED" if interrupted else "FAILED" if self._failed or crashed else "FINISHED")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        interrupted = kind is not None and issubclass(kind, (KeyboardInterrupt, SystemExit))
        if self.client.lost is not None:
            return  # nothing can be closed; the error that says so is on its way
        try:
            self.close(interrupted=interrupted, crashed=kind is not None and not interrupted)
        except Exception as exc:  # noqa: BLE001 - never hide the original error behind a tracking one
            if kind is None:
                raise
            log.warning("could not close the MLflow runs: %s", getattr(exc, "message", exc))
            log.debug("closing the MLflow runs", exc_info=True)

    @property
    def parent_url(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return experiment_link(self.uri, self.experiment_id, self.parent_id)
        return f"run {self.parent_id} in experiment '{self.experiment_name}' ({ui_hint(self.uri, self.experiment_id)})"


def fidelity_metrics(row: Evaluation) -> dict[str, float]:
    """The runtime's floor as metrics: ``runtime_kl_mean`` (+ ``_stderr``), ``runtime_top1_agreement``…"""
    floor = row.fidelity
    if floor is None:
        return {}
    return {
        "runtime_kl_mean": floor.kl_mean,
        "runtime_kl_mean_stderr": floor.kl_mean_stderr,
        "runtime_top1_agreement": floor.top1_agreement,
        "runtime_top1_agreement_stderr": floor.top1_agreement_stderr,
        "runtime_ppl_delta_pct": floor.ppl_delta_pct,
        "runtime_ppl_delta_pct_stderr": floor.ppl_delta_pct_stderr,
        "runtime_deviates": float(floor.deviates),
    }


def github_tags() -> dict[str, str]:
    """Run context when inside GitHub Actions (documented GITHUB_* variables only, never a token)."""
    if os.environ.get("GITHUB_ACTIONS") != "true":
        return {}
    env = os.environ
    tags = {
        f"github.{key.lower()}": env[f"GITHUB_{key}"]
        for key in ("REPOSITORY", "WORKFLOW", "JOB", "RUN_ID", "RUN_ATTEMPT", "SHA", "REF", "ACTOR")
        if env.get(f"GITHUB_{key}")
    }
    if env.get("GITHUB_SERVER_URL") and env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        tags["github.run_url"] = (
            f"{env['GITHUB_SERVER_URL']}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
        )
    return tags


def default_experiment(source: "SourceModel") -> str:
    return f"hubquant/{source.name}"


def open_tracker(source: "SourceModel", *, experiment: str | None = None, new_run: bool = False) -> Tracker:
    """A tracker for ``source`` on the configured target (checked to be reachable first).

    Raises:
        MissingDependencyError: mlflow is not installed.
        TrackingError: the server cannot be reached.
    """
    return Tracker(tracking_uri(), experiment=experiment or default_experiment(source), source=source, new_run=new_run)


class LogCapture(logging.Handler):
    """Collects hubquant's log lines (and progress lines) for a run's log artifact."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(redact(self.format(record)))

    def progress(self, line: str) -> None:
        self.lines.append(redact(f"{time.strftime('%Y-%m-%d %H:%M:%S')} PROGRESS {line}"))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def __enter__(self) -> "LogCapture":
        logging.getLogger("hubquant").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("hubquant").removeHandler(self)


# -- publishing ------------------------------------------------------------------------------------

HUB_TAGS = ("hf.repo_id", "hf.commit", "hf.url")


def publishing_store() -> str | None:
    """The tracking store a push records into: the server, or the local store when it exists."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return tracking_uri() if (Path.cwd() / LOCAL_STORE).is_file() else None


def variant_runs(uri: str, keys: list[str]) -> dict[str, str]:
    """cache key → the variant's run id, for the keys that have one."""
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, str] = {}
    for key in keys:
        runs = client.search_runs(
            experiments,
            filter_string=f"tags.`{KEY_TAG}` = '{key}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if runs:
            found[key] = runs[0].info.run_id
    return found


def record_publication(uri: str, run_id: str, *, repo_id: str, commit: str | None, url: str) -> None:
    """The Hub repo, commit and URL a variant was published to, as tags on its run."""
    client = _client(uri)
    client.set_tag(run_id, "hf.repo_id", repo_id)
    if commit:
        client.set_tag(run_id, "hf.commit", commit)
    client.set_tag(run_id, "hf.url", redact(url))


def artifact_path_of_run(uri: str, run_id: str) -> Path:
    """The local artifact folder a hubquant run logged (``hubquant push --run``)."""
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise TrackingError(
            f"no MLflow run {run_id} in {uri} ({type(exc).__name__})",
            hint="copy the run id from the MLflow UI; set MLFLOW_TRACKING_URI for a server",
        ) from None
    path = run.data.tags.get("hubquant.artifact_path")
    if not path:
        raise TrackingError(
            f"run {run_id} is not a hubquant variant run (no hubquant.artifact_path tag)",
            hint="pick a variant run (a child run) in the MLflow UI",
        )
    return Path(path)
