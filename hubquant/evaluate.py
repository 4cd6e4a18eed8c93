"""Measuring every variant the same way: one token stream, the same windows, the same metrics.

The text is tokenized once with the source's Hugging Face tokenizer and those ids are fed to every
runtime (:mod:`hubquant.text`), in non-overlapping windows of ``context`` tokens; a window's first
token is context only, every later token is scored. The reference — the source in PyTorch, fp32 on
CPU — is run once per (source, text, windows) and cached (:mod:`hubquant.reference`). Each variant
is measured in its own child process (:mod:`hubquant.eval_worker`), so one variant's memory never
shows up in another's figure, and one failing variant becomes a row with its error.

**Fidelity floors** (:mod:`hubquant.fidelity`): every runtime's unquantized form is scored too, so
a variant carries its total deviation from the reference, its runtime's floor, and the deviation due
to quantization alone (``quant_*``: against its own runtime's full-precision logits on the same ids).

**Uncertainty.** Every quality figure carries its standard error from the per-token values
(:mod:`hubquant.stats`); the perplexity change is paired per token.

Metrics (names shared by ``eval.json``, the table, MLflow and model cards): see :data:`hubquant.records.METRICS`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import ArtifactError, HubquantError
from hubquant.eval_worker import run_worker
from hubquant.fidelity import FloorPlan, fidelity_record, plan_floors
from hubquant.gate import GateSettings, apply_gate
from hubquant.recipe import EvalSection
from hubquant.records import Evaluation, Fidelity, ImageResults, Metrics, SourceFacts, TextFacts, VariantRecord
from hubquant.reference import reference
from hubquant.tasks import TaskSettings
from hubquant.text import EvalText

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.exporters.base import Progress
    from hubquant.source import SourceModel
    from hubquant.tasks import TaskPlan

log = logging.getLogger(__name__)

#: Builds a runtime's full-precision form for its floor, deleting it on exit (see hubquant.pipeline.FloorBuilder).
BuildFloor = Callable[[FloorPlan], AbstractContextManager["Artifact | None"]]


@dataclass
class EvalSettings:
    """How a variant is measured; identical for every variant of a comparison."""

    context: int = EvalSection.model_fields["context"].default
    max_windows: int | None = None
    prompt_tokens: int = EvalSection.model_fields["prompt_tokens"].default
    gen_tokens: int = EvalSection.model_fields["gen_tokens"].default
    #: How the reference holds its weights (it always computes in float32): auto, fp32 or source.
    reference_weights: str = "auto"
    #: Measure each runtime's fidelity floor (its unquantized deviation from the reference).
    fidelity: bool = True
    #: lm-eval tasks to score every variant on (see hubquant.tasks); None: none.
    tasks: TaskSettings | None = None

    @classmethod
    def of(cls, section: Any) -> EvalSettings:
        """The settings a recipe's ``eval`` section asks for."""
        return cls(
            context=section.context,
            max_windows=section.max_windows,
            prompt_tokens=section.prompt_tokens,
            gen_tokens=section.gen_tokens,
            reference_weights=section.reference_weights,
            fidelity=section.fidelity,
            tasks=TaskSettings.parse(
                section.tasks,
                limit=section.task_limit,
                num_fewshot=section.num_fewshot,
                max_length=section.task_max_length,
            ),
        )

    def key(self) -> dict[str, Any]:
        """What the reference logits depend on."""
        return {"context": self.context, "max_windows": self.max_windows}

    def record(self) -> dict[str, Any]:
        """What an evaluation's figures depend on (a stored evaluation is reused only when equal)."""
        record: dict[str, Any] = {
            "context": self.context,
            "max_windows": self.max_windows,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
        }
        return {**record, "tasks": self.tasks.record()} if self.tasks else record


def machine_facts() -> dict[str, Any]:
    """What the speed and memory figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


# -- rows ------------------------------------------------------------------------------------------
def variant_labels(artifacts: list[Artifact]) -> dict[Path, str]:
    """Short row labels (``gguf Q4_K_M+imatrix``); variants sharing one get their folder's distinguishing part."""
    import collections

    from hubquant.exporters import get_exporter

    plain = {a.path: f"{a.format} {get_exporter(a.format).variant_label(a.precision, a.options)}" for a in artifacts}
    counts = collections.Counter(plain.values())
    labels = {}
    for artifact in artifacts:
        label = plain[artifact.path]
        if counts[label] > 1:
            name, prefix = artifact.path.name, f"{artifact.format}-"
            label = f"{artifact.format} {name[len(prefix) :] if name.startswith(prefix) else name}"
        labels[artifact.path] = label
    return labels


def _pair(values: list[float | None] | None) -> tuple[float | None, float | None]:
    return (values[0], values[1]) if values else (None, None)


def variant_metrics(
    result: dict[str, Any], artifact: Artifact, source: SourceModel, *, weight_bytes: int, reference_ppl: float
) -> Metrics:
    """A variant's metrics from its worker's result."""
    size = artifact.size_bytes
    ppl, ppl_se = _pair(result["perplexity"])
    r, f = result["reference"], result.get("floor") or {}
    delta, kl, top1 = _pair(r["ppl_change_pct"]), _pair(r["kl_mean"]), _pair(r["top1"])
    q_delta, q_kl, q_top1 = _pair(f.get("ppl_change_pct")), _pair(f.get("kl_mean")), _pair(f.get("top1"))
    return Metrics(
        size_bytes=size,
        bits_per_weight=size * 8 / source.language_parameters,
        compression_ratio=weight_bytes / size,
        perplexity=ppl,
        perplexity_stderr=ppl_se,
        ppl_delta=None if ppl is None else ppl - reference_ppl,
        ppl_delta_pct=delta[0],
        ppl_delta_pct_stderr=delta[1],
        kl_mean=kl[0],
        kl_mean_stderr=kl[1],
        kl_p99=r["kl_p99"],
        top1_agreement=top1[0],
        top1_agreement_stderr=top1[1],
        quant_ppl_delta_pct=q_delta[0],
        quant_ppl_delta_pct_stderr=q_delta[1],
        quant_kl_mean=q_kl[0],
        quant_kl_mean_stderr=q_kl[1],
        quant_top1_agreement=q_top1[0],
        quant_top1_agreement_stderr=q_top1[1],
        load_seconds=result["load_seconds"],
        prefill_tokens_per_second=result["prefill_tokens_per_second"],
        decode_tokens_per_second=result["decode_tokens_per_second"],
        peak_rss_mb=result["peak_rss_mb"],
        export_seconds=artifact.manifest.export_seconds,
    )


def check_artifact_source(artifact: Artifact, source: SourceModel) -> None:
    """Refuse to compare an artifact with a source it was not built from."""
    if artifact.manifest.source.fingerprint != source.fingerprint:
        raise ArtifactError(
            f"{artifact.path.name} was built from another source than {source.name} (fingerprints differ)",
            path=artifact.path,
            hint="pass the --source the artifact was quantized from, or rebuild the artifact",
        )


class Evaluator:
    """One comparison: the reference, every runtime's floor, then every variant."""

    def __init__(
        self,
        source: SourceModel,
        *,
        text: EvalText,
        settings: EvalSettings,
        gate: GateSettings,
        progress: Progress,
        reuse: bool,
        work: Path,
        build_floor: BuildFloor | None,
    ) -> None:
        from hubquant import __version__

        self.source, self.text, self.settings, self.gate = source, text, settings, gate
        self.say, self.reuse, self.work, self.build_floor = progress, reuse, work, build_floor
        self.weight_bytes = sum((source.path / name).stat().st_size for name in source.weight_files)
        self.common = {
            "hubquant_version": __version__,
            "source": SourceFacts.model_validate(source.facts()),
            "settings": settings.record(),
            "machine": machine_facts(),
        }
        self.results: dict[str, dict[str, Any]] = {}
        self.floor_of: dict[Path, tuple[FloorPlan, Path | None, Fidelity | None]] = {}
        self.floor_notes: dict[Path, str] = {}

    def run(self, artifacts: list[Artifact]) -> list[Evaluation]:
        self.ref_folder, ref_result = reference(
            self.source, self.text, self.settings, work=self.work, progress=self.say
        )
        self.ref_row = self._reference_row(ref_result)
        for plan in plan_floors(artifacts, self.source) if self.settings.fidelity else []:
            folder, fidelity, note = self._floor(plan)
            for artifact in plan.variants:
                self.floor_of[artifact.path] = (plan, folder, fidelity)
                if note:
                    self.floor_notes[artifact.path] = f"{plan.format} {plan.precision} floor not measured: {note}"
        labels = variant_labels(artifacts)
        rows = [self.ref_row]
        for artifact in sorted(artifacts, key=lambda a: -a.size_bytes):
            rows.append(self._variant_row(artifact, labels[artifact.path]))
        return rows

    def _reference_row(self, result: dict[str, Any]) -> Evaluation:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(self.source.dtype, self.source.dtype)
        ppl, ppl_se = result["perplexity"]
        metrics = Metrics(
            size_bytes=self.weight_bytes,
            bits_per_weight=self.weight_bytes * 8 / self.source.parameter_count,
            compression_ratio=1.0,
            perplexity=ppl,
            perplexity_stderr=ppl_se,
            ppl_delta=0.0,
            ppl_delta_pct=0.0,
            kl_mean=0.0,
            kl_p99=0.0,
            top1_agreement=1.0,
            load_seconds=result["load_seconds"],
            prefill_tokens_per_second=result["prefill_tokens_per_second"],
            decode_tokens_per_second=result["decode_tokens_per_second"],
            peak_rss_mb=result["peak_rss_mb"],
        )
        self.text_facts = TextFacts(
            name=self.text.name, sha256=self.text.sha256, label=self.text.describe(), **result["text"]
        )
        variant = VariantRecord(
            format="pytorch",
            precision=self.source.dtype,
            options={"compute": "float32", "weights": result.get("weights", "fp32"), "why": result.get("why", "")},
        )
        return Evaluation(
            label=f"reference {short}",
            variant=variant,
            is_reference=True,
            path=str(self.source.path),
            text=self.text_facts,
            metrics=metrics,
            reference=metrics,
            speed_note=result.get("speed_note"),
            **self.common,
        )

    def _job(self, artifact: Artifact, label: str, **extra: Any) -> dict[str, Any]:
        context = max(self.settings.context, self.settings.prompt_tokens + self.settings.gen_tokens + 8)
        return {
            "kind": "artifact",
            "label": label,
            "artifact": str(artifact.path),
            "reference": str(self.ref_folder),
            "context": context,
            "prompt_tokens": self.settings.prompt_tokens,
            "gen_tokens": self.settings.gen_tokens,
            **extra,
        }

    def _floor(self, plan: FloorPlan) -> tuple[Path | None, Fidelity | None, str | None]:
        """Measure (or reuse) a runtime's floor: its logits are kept for the quantization-only figures.
        Without a floor, the reason why (said in the table and on the cards)."""
        from hubquant.fidelity import memory_shortfall
        from hubquant.reference import floor_folder

        folder = floor_folder(self.ref_folder, plan.key)
        if (folder / "floor.json").is_file():
            self.say(f"{plan.format} floor: reusing the cached {plan.precision} logits")
            result = json.loads((folder / "floor.json").read_text())
        elif (short := memory_shortfall(plan, self.source)) is not None:
            self.say(f"{plan.format} floor: not measured — {short}")
            return None, None, short
        elif plan.artifact is not None:
            result = self._measure_floor(plan, plan.artifact, folder)
        elif self.build_floor is None:
            return None, None, "no full-precision form to measure"
        else:
            with self.build_floor(plan) as built:
                result = self._measure_floor(plan, built, folder) if built is not None else None
        if result is None:
            return None, None, f"its {plan.precision} form could not be built or measured (see the log)"
        if plan.artifact is not None:
            self.results[str(plan.artifact.path)] = result
        return folder, fidelity_record(plan, result, self.source), None

    def _measure_floor(self, plan: FloorPlan, artifact: Artifact, folder: Path) -> dict[str, Any] | None:
        """Score the runtime's unquantized form and keep its logits in ``folder`` (None: it failed)."""
        from hubquant.artifact import atomic_folder

        self.say(f"{plan.format} floor: measuring its unquantized form ({plan.precision}) against the reference")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            with atomic_folder(folder) as staging:
                job = self._job(artifact, f"{plan.format} {plan.precision} (floor)", keep_logits=str(staging))
                result = run_worker(job, self.work)
                (staging / "floor.json").write_text(json.dumps(result))
        except HubquantError as exc:
            self.say(f"{plan.format} floor: could not be measured ({exc.message})")
            return None
        return result

    def _variant_row(self, artifact: Artifact, label: str) -> Evaluation:
        plan, folder, fidelity = self.floor_of.get(artifact.path, (None, None, None))
        is_floor = plan is not None and plan.artifact is not None and plan.artifact.path == artifact.path
        floor_key = plan.key if folder is not None and not is_floor else None
        previous = self._previous(artifact, floor_key) if self.reuse else None
        if previous is not None:
            self.say(f"{label}: reusing its evaluation (same artifact, text and settings)")
            apply_gate(previous, self.gate)
            return previous
        row = Evaluation(
            label=label,
            variant=artifact.manifest.variant,
            path=str(artifact.path),
            cache_key=artifact.manifest.cache_key,
            floor_key=floor_key,
            text=self.text_facts,
            metrics=Metrics(size_bytes=artifact.size_bytes),
            reference=self.ref_row.metrics,
            fidelity=fidelity,
            fidelity_note=self.floor_notes.get(artifact.path),
            warnings=list(artifact.manifest.warnings),
            **self.common,
        )
        try:
            result = self.results.get(str(artifact.path))
            if result is None:
                self.say(f"{label}: measuring in a child process")
                extra = {"floor": str(folder)} if floor_key else {}
                result = run_worker(self._job(artifact, label, **extra), self.work)
            row.metrics = variant_metrics(
                result,
                artifact,
                self.source,
                weight_bytes=self.weight_bytes,
                reference_ppl=self.ref_row.metrics.perplexity or 0.0,
            )
            row.image = self._image(result, artifact, plan if folder is not None else None)
            row.speed_note, row.timing = (
                result.get("speed_note"),
                {k: result[k] for k in ("worker_seconds", "forward_seconds") if k in result},
            )
        except HubquantError as exc:
            self.say(f"{label}: evaluation failed ({exc.message})")
            row.error = exc.message
        apply_gate(row, self.gate)
        from hubquant.records import write_evaluation

        row.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_evaluation(artifact.path, row)
        return row

    def _image(self, result: dict[str, Any], artifact: Artifact, plan: FloorPlan | None) -> ImageResults | None:
        """A vision variant's picture figures (against its runtime's floor when it has one)."""
        from hubquant.exporters import get_exporter
        from hubquant.image_fidelity import image_results

        image = result.get("image")
        if not image:
            return None
        exporter = get_exporter(artifact.format)
        first = exporter.floor_projector or next(iter(image["projectors"]))  # the one the floor reads with
        return image_results(
            image,
            floor=f"{plan.precision} with the {first} picture encoder" if plan is not None else None,
            runtime=exporter.display_name,
            architecture=self.source.architecture,
        )

    def score_tasks(self, rows: list[Evaluation], plan: TaskPlan) -> None:
        """Every row's lm-eval task scores (see :mod:`hubquant.tasks`), written to its eval.json."""
        from hubquant.records import write_evaluation
        from hubquant.tasks import score_tasks

        def finish(row: Evaluation) -> None:
            apply_gate(row, self.gate)
            write_evaluation(Path(str(row.path)), row)

        weights = str(self.ref_row.variant.options.get("weights", "fp32"))
        run = functools.partial(run_worker, work=self.work)
        score_tasks(rows, self.source, plan, weights=weights, run=run, say=self.say, finish=finish)

    def _previous(self, artifact: Artifact, floor_key: str | None) -> Evaluation | None:
        previous = artifact.evaluation()
        if previous is None or previous.error:
            return None
        same = (
            previous.cache_key == artifact.manifest.cache_key
            and previous.text.sha256 == self.text.sha256
            and previous.settings == self.settings.record()
            and previous.floor_key == floor_key
        )
        return previous if same else None


def evaluate(
    artifacts: list[Artifact],
    source: SourceModel,
    *,
    text: EvalText,
    settings: EvalSettings,
    gate: GateSettings | None = None,
    progress: Progress | None = None,
    reuse: bool = False,
    build_floor: BuildFloor | None = None,
) -> list[Evaluation]:
    """Measure every artifact against the cached reference and its runtime's floor; write ``eval.json`` beside each.

    With ``reuse``, an artifact whose ``eval.json`` was measured on the same artifact (cache key),
    text, settings and floor is not measured again (``hubquant publish`` resuming after a failure).
    ``build_floor`` builds a runtime's full-precision form when the run has none (a context manager
    that deletes it on exit; without it such runtimes get no floor).
    A variant that cannot be measured becomes a row with its error (and fails the gate).

    Returns the rows: the reference first, then the variants by decreasing size.

    Raises:
        ArtifactError: an artifact was built from another source.
        MissingDependencyError: a format's libraries are missing.
        EvaluationError: the text is too short, or the reference cannot be computed.
    """
    from hubquant.exporters import get_exporter

    for artifact in artifacts:
        check_artifact_source(artifact, source)
        get_exporter(artifact.format).check_installed()
    say: Callable[[str], None] = progress or (lambda line: None)
    task_plan = None
    if settings.tasks is not None:
        from hubquant.tasks import resolve_tasks

        task_plan = resolve_tasks(settings.tasks)  # an unknown task is refused before any work
    with tempfile.TemporaryDirectory(prefix="hubquant-eval-") as tmp:
        evaluator = Evaluator(
            source,
            text=text,
            settings=settings,
            gate=gate or GateSettings(),
            progress=say,
            reuse=reuse,
            work=Path(tmp),
            build_floor=build_floor,
        )
        rows = evaluator.run(artifacts)
        if task_plan is not None:
            evaluator.score_tasks(rows, task_plan)
        return rows
