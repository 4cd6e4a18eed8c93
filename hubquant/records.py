"""The records hubquant writes beside every artifact, as typed, versioned models.

- :class:`Manifest` (``manifest.json``): what an artifact is — every file with its size and sha256,
  the variant, the source, the tools, the cache key, the timings.
- :class:`Evaluation` (``eval.json``): how it measured — every metric with its standard error, the
  reference, the runtime's fidelity floor, the text, the settings, the machine and the gate.

Each is read and written here and nowhere else (:func:`read_manifest`/:func:`write_manifest_file`,
:func:`read_evaluation`/:func:`write_evaluation`); every other module uses the models' fields.
Writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "manifest.json"
EVAL_FILE = "eval.json"
MANIFEST_VERSION = 1
EVAL_SCHEMA = "hubquant.eval/2"


class _Record(BaseModel):
    # Fields a newer hubquant adds are kept when an older one rewrites a record.
    model_config = ConfigDict(extra="allow")


class FileEntry(_Record):
    path: str
    size: int
    sha256: str
    #: ``model`` for what a runtime loads; anything else (``calibration``: an importance matrix) ships
    #: beside the model but is not counted in its size.
    role: str = "model"


class VariantRecord(_Record):
    format: str
    precision: str
    options: dict[str, Any] = Field(default_factory=dict)


class SourceFacts(_Record):
    """What the manifests record of the source (see :meth:`hubquant.source.SourceModel.facts`)."""

    id: str | None = None
    path: str | None = None
    name: str = "model"
    revision: str | None = None
    fingerprint: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    parameter_count: int = 0
    dtype: str | None = None
    tokenizer_style: str | None = None
    license: str | None = None
    #: A vision model's parts and their parameter counts (absent for a text model).
    vision_parts: dict[str, int] | None = None


class Manifest(_Record):
    manifest_version: int = MANIFEST_VERSION
    hubquant_version: str = ""
    created: str = ""
    variant: VariantRecord
    source: SourceFacts = Field(default_factory=SourceFacts)
    tools: dict[str, str] = Field(default_factory=dict)
    cache_key: str = ""
    export_seconds: float | None = None
    shared_seconds: float | None = None
    #: The most bytes the build of this variant's format held at once (intermediates and the variants
    #: being written; shared with the format's other variants of the same run).
    peak_disk_bytes: int | None = None
    warnings: list[str] = Field(default_factory=list)
    settings: dict[str, Any] | None = None
    files: list[FileEntry]

    def public(self) -> Manifest:
        """The manifest without local paths (a published file must not reveal the builder's disk)."""
        source = self.source.model_copy(update={"path": None})
        if source.id and not source.revision:  # a local folder: its path stays private
            source = source.model_copy(update={"id": source.name})
        return self.model_copy(update={"source": source})


#: What each metric is (the names are shared by ``eval.json``, the table, MLflow and model cards).
METRICS: dict[str, str] = {
    "size_bytes": "bytes on disk of the variant's model files (manifest and calibration files excluded)",
    "bits_per_weight": "size_bytes × 8 / parameter count of the source",
    "compression_ratio": "source weight bytes / size_bytes",
    "perplexity": "exp(mean NLL) over every scored token of every window",
    "perplexity_stderr": "standard error of perplexity (delta method: ppl × sd(NLL) / √N)",
    "ppl_delta": "perplexity − reference perplexity",
    "ppl_delta_pct": "100 × (exp(mean(NLL − reference NLL)) − 1): the change in %, paired per token",
    "ppl_delta_pct_stderr": "standard error of ppl_delta_pct (from the paired per-token differences)",
    "kl_mean": "mean over scored positions of KL(reference ‖ variant), nats",
    "kl_mean_stderr": "standard error of kl_mean (sd / √N)",
    "kl_p99": "99th percentile of the per-position KL, nats",
    "top1_agreement": "share of positions where the variant's argmax equals the reference's",
    "top1_agreement_stderr": "standard error of top1_agreement (√(p(1−p)/N))",
    "quant_ppl_delta_pct": "ppl_delta_pct against the runtime's own full-precision form: quantization alone",
    "quant_ppl_delta_pct_stderr": "standard error of quant_ppl_delta_pct",
    "quant_kl_mean": "mean KL(runtime full precision ‖ variant): quantization alone, nats",
    "quant_kl_mean_stderr": "standard error of quant_kl_mean",
    "quant_top1_agreement": "top-1 agreement with the runtime's own full-precision form",
    "quant_top1_agreement_stderr": "standard error of quant_top1_agreement",
    "load_seconds": "wall time to load the variant into its runtime",
    "prefill_tokens_per_second": "prompt_tokens / time from an empty state to the first new token (greedy)",
    "decode_tokens_per_second": "gen_tokens / time to generate them one step each after the first",
    "peak_rss_mb": "peak resident memory (MiB) of the measuring child process through load and generation",
    "export_seconds": "the variant's own export step, from its manifest",
}


class Metrics(_Record):
    """Every figure of one row. ``*_stderr`` is the standard error of the figure before it; ``quant_*``
    compares the variant with its own runtime's full-precision form (the quantization alone)."""

    size_bytes: int | None = None
    bits_per_weight: float | None = None
    compression_ratio: float | None = None
    perplexity: float | None = None
    perplexity_stderr: float | None = None
    ppl_delta: float | None = None
    ppl_delta_pct: float | None = None
    ppl_delta_pct_stderr: float | None = None
    kl_mean: float | None = None
    kl_mean_stderr: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    top1_agreement_stderr: float | None = None
    quant_ppl_delta_pct: float | None = None
    quant_ppl_delta_pct_stderr: float | None = None
    quant_kl_mean: float | None = None
    quant_kl_mean_stderr: float | None = None
    quant_top1_agreement: float | None = None
    quant_top1_agreement_stderr: float | None = None
    load_seconds: float | None = None
    prefill_tokens_per_second: float | None = None
    decode_tokens_per_second: float | None = None
    peak_rss_mb: float | None = None
    export_seconds: float | None = None

    def numbers(self) -> dict[str, float]:
        """The figures that were measured (for MLflow metrics)."""
        return {k: float(v) for k, v in self.model_dump().items() if isinstance(v, (int, float))}


class Fidelity(_Record):
    """A runtime's own deviation from the reference: its full-precision form scored like a variant."""

    format: str
    precision: str
    #: ``variant`` when the run built that full-precision variant, ``floor`` when built only to measure it.
    origin: Literal["variant", "floor"] = "variant"
    kl_mean: float
    kl_mean_stderr: float
    top1_agreement: float
    top1_agreement_stderr: float
    ppl_delta_pct: float
    ppl_delta_pct_stderr: float
    max_kl: float
    min_top1: float
    deviates: bool
    finding: str | None = None


class TextFacts(_Record):
    name: str
    sha256: str
    label: str = ""
    tokens_scored: int = 0
    windows: int = 0
    context: int = 0


class Gate(_Record):
    passed: bool = True
    reasons: list[str] = Field(default_factory=list)
    max_ppl_delta_pct: float | None = None
    max_kl: float | None = None
    max_runtime_kl: float | None = None


class TaskScore(_Record):
    """One lm-eval metric of one task for one variant, beside the reference's (see :mod:`hubquant.tasks`)."""

    task: str
    metric: str
    #: lm-eval's filter (``none`` for multiple-choice and loglikelihood tasks).
    filter: str = "none"
    value: float
    #: lm-eval's standard error; None where lm-eval gives none (perplexity-like metrics).
    stderr: float | None = None
    higher_is_better: bool | None = None
    reference: float | None = None
    reference_stderr: float | None = None
    #: value / reference, with its paired standard error over the same examples.
    recovery: float | None = None
    recovery_stderr: float | None = None
    #: Examples scored (after ``limit``) and few-shot examples shown.
    samples: int = 0
    num_fewshot: int | None = None
    #: The Hub dataset the task reads (None for local files).
    dataset: str | None = None


class TaskResults(_Record):
    """The lm-eval tasks a variant was scored on, and how."""

    #: tasks, limit, num_fewshot, max_length (what the scores depend on).
    settings: dict[str, Any] = Field(default_factory=dict)
    lm_eval_version: str = ""
    scores: list[TaskScore] = Field(default_factory=list)
    seconds: float = 0.0
    #: Forward passes and examples; time per example = seconds / examples.
    examples: int = 0
    forward_passes: int = 0

    def numbers(self) -> dict[str, float]:
        """MLflow metrics: ``task.<task>.<metric>`` (``.<filter>`` unless none), with ``_stderr``,
        ``_recovery`` and ``_recovery_stderr`` where known."""
        import re

        out: dict[str, float] = {}
        for score in self.scores:
            name = f"task.{score.task}.{score.metric}" + ("" if score.filter == "none" else f".{score.filter}")
            name = re.sub(r"[^\w./ -]", "_", name)
            for suffix, value in (
                ("", score.value),
                ("_stderr", score.stderr),
                ("_recovery", score.recovery),
                ("_recovery_stderr", score.recovery_stderr),
            ):
                if value is not None:
                    out[name + suffix] = value
        return out


class ImageScore(_Record):
    """A vision variant read with one of its projectors (see :mod:`hubquant.image_fidelity`)."""

    #: The projector's type (``F16``, ``Q8_0`` for a GGUF mmproj).
    projector: str
    answer_tokens: int = 0
    #: KL between the answers given the right picture and another one: how much a picture moves the answer.
    image_effect_kl: float
    image_effect_kl_stderr: float | None = None
    #: Against the runtime's unquantized form with its most faithful projector (None: no floor measured).
    quant_kl_mean: float | None = None
    quant_kl_mean_stderr: float | None = None
    quant_top1_agreement: float | None = None
    quant_top1_agreement_stderr: float | None = None
    #: Against the PyTorch model on the same inputs, where one reads pictures: the runtime's deviation plus
    #: quantization (None: no PyTorch class reads this architecture's pictures).
    ref_kl_mean: float | None = None
    ref_kl_mean_stderr: float | None = None
    ref_top1_agreement: float | None = None
    ref_top1_agreement_stderr: float | None = None


class ImageResults(_Record):
    """Image-conditioned fidelity of a vision variant: the built-in pictures read with each projector."""

    prompts: int
    scores: list[ImageScore] = Field(default_factory=list)
    #: What the figures compare with, in words.
    baseline: str = ""

    def numbers(self) -> dict[str, float]:
        """MLflow metrics: ``image.<projector>.<figure>``."""
        out: dict[str, float] = {}
        for score in self.scores:
            for key, value in score.model_dump().items():
                if key != "projector" and isinstance(value, (int, float)):
                    out[f"image.{score.projector}.{key}"] = float(value)
        return out


class Evaluation(_Record):
    """One row of a comparison — the reference or a variant — and, for a variant, its ``eval.json``."""

    schema_: str = Field(EVAL_SCHEMA, alias="schema")
    hubquant_version: str = ""
    created: str = ""
    label: str
    variant: VariantRecord
    #: The reference row (the source in PyTorch) rather than a variant.
    is_reference: bool = False
    #: The artifact folder (not published).
    path: str | None = None
    #: Why measuring failed; the figures are then absent.
    error: str | None = None
    cache_key: str | None = None
    #: The cache key of the full-precision form the quantization-only figures compare with.
    floor_key: str | None = None
    source: SourceFacts = Field(default_factory=SourceFacts)
    text: TextFacts
    settings: dict[str, Any] = Field(default_factory=dict)
    machine: dict[str, Any] = Field(default_factory=dict)
    metrics: Metrics
    reference: Metrics
    fidelity: Fidelity | None = None
    #: Why the runtime's floor was not measured (then ``fidelity`` is None and no ``quant_*`` figure exists).
    fidelity_note: str | None = None
    gate: Gate = Field(default_factory=Gate)
    warnings: list[str] = Field(default_factory=list)
    speed_note: str | None = None
    timing: dict[str, float] = Field(default_factory=dict)
    #: lm-eval task scores (``hubquant eval --tasks``); None when no task was asked for.
    tasks: TaskResults | None = None
    #: Image-conditioned fidelity of a vision variant (None for a text model).
    image: ImageResults | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def numbers(self) -> dict[str, float]:
        """Every measured figure of the row, as MLflow metrics: the metrics, task and picture scores."""
        tasks, image = self.tasks.numbers() if self.tasks else {}, self.image.numbers() if self.image else {}
        return {**self.metrics.numbers(), **tasks, **image}


def _write_json(path: Path, document: dict[str, Any]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> Manifest:
    """The manifest of an artifact folder.

    Raises:
        FileNotFoundError: no manifest.
        ValueError: not a hubquant manifest (bad JSON or missing fields).
    """
    text = (folder / MANIFEST).read_text(encoding="utf-8")
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(str(exc.errors()[0].get("msg"))) from None


def write_manifest_file(folder: Path, manifest: Manifest) -> Path:
    return _write_json(folder / MANIFEST, manifest.model_dump(mode="json"))


def read_evaluation(folder: Path) -> Evaluation | None:
    """``eval.json`` of an artifact folder, or None when absent, unreadable or of an older schema."""
    path = folder / EVAL_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("schema") != EVAL_SCHEMA:
        return None
    try:
        return Evaluation.model_validate(document)
    except ValidationError:
        return None


def write_evaluation(folder: Path, evaluation: Evaluation) -> Path:
    return _write_json(folder / EVAL_FILE, evaluation_document(evaluation))


def evaluation_document(evaluation: Evaluation) -> dict[str, Any]:
    """The JSON form of an evaluation (as written to ``eval.json``)."""
    return evaluation.model_dump(mode="json", by_alias=True)
