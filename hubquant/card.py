"""Model cards: one per Hub repo, rendered from ``data/card.md.j2`` with ``huggingface_hub.ModelCard``.

Metadata (``ModelCardData``): ``base_model`` + ``base_model_relation: quantized``, the format's
``library_name`` (from its exporter), ``pipeline_tag``, the source's licence (with
``license_name``/``license_link`` when it is custom), tags, and ``model-index`` results (perplexity
of each variant on the named text) so the Hub shows them. The body is built from what the artifacts
recorded — ``manifest.json`` (tools, source) and ``eval.json`` (every figure with its standard
error, the runtime's fidelity floor, the text, the machine) — and everything format-specific
(snippets, names, bits) comes from the format's exporter.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hubquant import display
from hubquant.source import HUB_ID_PATTERN

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from hubquant.records import Evaluation, Fidelity
    from hubquant.repos import RepoPlan


@dataclass
class CardContext:
    """What a card needs beyond its own repo: the source, the siblings and the provenance."""

    source: dict[str, Any]
    base_model: str | None
    siblings: list[RepoPlan] = field(default_factory=list)
    chart_path: str | None = None
    mlflow_runs: dict[str, str] = field(default_factory=dict)  # variant folder → run id
    ci_run_url: str | None = None
    license_name: str | None = None
    license_link: str | None = None


def device_advice(pairs: list[tuple[str, str]]) -> list[str]:
    """Which variant suits which device, for the (format, precision) pairs present."""
    from hubquant.exporters import get_exporter

    bits = [(precision, get_exporter(fmt).bits(precision)) for fmt, precision in pairs]
    low = [p for p, b in bits if b <= 5]
    mid = [p for p, b in bits if 5 < b <= 16]
    full = [p for p, b in bits if b > 16]
    lines = []
    if low:
        lines.append(
            f"Phones, IoT and small devices with little memory: {', '.join(low)} (4-bit class; smallest, "
            "some quality lost — check the KL column)."
        )
    if mid:
        lines.append(
            f"AI PCs and laptops with an NPU/GPU or plenty of RAM: {', '.join(mid)} (8-/16-bit; close to the original)."
        )
    if full:
        lines.append(
            f"Servers and reference runs: {', '.join(full)} (full precision; as good as the original, largest)."
        )
    return lines


def _row(label: str, location: str, evaluation: Evaluation) -> dict[str, str]:
    m = evaluation.metrics
    return {
        "label": label,
        "location": location,
        "size": display.human_size(m.size_bytes),
        "bpw": display.fmt(m.bits_per_weight, ".2f"),
        "ppl": display.plus_minus(m.perplexity, m.perplexity_stderr, ".3f"),
        "delta": display.delta_pct(m.ppl_delta_pct, m.ppl_delta_pct_stderr),
        "kl": display.scientific(m.kl_mean, m.kl_mean_stderr),
        "quant_kl": display.scientific(m.quant_kl_mean, m.quant_kl_mean_stderr),
        "top1": display.percent(m.top1_agreement, m.top1_agreement_stderr),
        "prefill": display.fmt(m.prefill_tokens_per_second, ".0f"),
        "decode": display.fmt(m.decode_tokens_per_second, ".0f"),
    }


def card_rows(plan: RepoPlan) -> tuple[list[dict[str, str]], dict[str, str] | None, Evaluation | None]:
    """Table rows of the repo's variants, the reference row, and one evaluation (for the settings)."""
    rows, reference, sample = [], None, None
    for variant in plan.variants:
        evaluation = variant.evaluation
        if evaluation is None:
            continue
        sample = sample or evaluation
        rows.append(_row(variant.label, variant.location, evaluation))
        if reference is None:
            r = evaluation.reference
            reference = {
                "precision": evaluation.source.dtype or "original",
                "size": display.human_size(r.size_bytes),
                "bpw": display.fmt(r.bits_per_weight, ".2f"),
                "ppl": display.plus_minus(r.perplexity, r.perplexity_stderr, ".3f"),
                "prefill": display.fmt(r.prefill_tokens_per_second, ".0f"),
                "decode": display.fmt(r.decode_tokens_per_second, ".0f"),
            }
    return rows, reference, sample


def fidelity_line(fidelity: Fidelity | None, runtime: str, note: str | None = None) -> str | None:
    """The card's sentence about the runtime's own deviation from the original."""
    if fidelity is None:
        if note is None:
            return None
        return (
            f"Runtime fidelity: not measured — {note}. The Δ, KL and top-1 columns therefore include "
            f"whatever {runtime} itself computes differently from the original."
        )
    measured = (
        f"KL {display.scientific(fidelity.kl_mean, fidelity.kl_mean_stderr)}, top-1 "
        f"{display.percent(fidelity.top1_agreement, fidelity.top1_agreement_stderr)}, perplexity "
        f"{display.delta_pct(fidelity.ppl_delta_pct, fidelity.ppl_delta_pct_stderr)}"
    )
    limits = f"KL ≤ {fidelity.max_kl:.0e}, top-1 not significantly below {100 * fidelity.min_top1:g}%"
    if fidelity.deviates:
        return (
            f"**Runtime finding:** {fidelity.finding} The Δ, KL and top-1 columns compare with the original and so "
            f"include this deviation; the *KL from quantization* column compares each variant with {runtime}'s "
            f"own unquantized ({fidelity.precision}) output, which is what quantization alone cost."
        )
    return (
        f"Runtime fidelity: {runtime}'s own unquantized form ({fidelity.precision}) matches the original within "
        f"rounding ({measured}; limits: {limits}), so the differences above are the quantization's."
    )


def _eval_results(plan: RepoPlan, text_name: str) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for variant in plan.variants:
        evaluation = variant.evaluation
        if evaluation is None or evaluation.metrics.perplexity is None:
            continue
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text generation",
                dataset_type=f"hubquant/{text_name}",
                dataset_name=f"{text_name} (hubquant evaluation text)",
                metric_type="perplexity",
                metric_name=f"Perplexity ({variant.label})",
                metric_value=round(float(evaluation.metrics.perplexity), 4),
            )
        )
        results += _task_results(variant.label, evaluation)
    return results


def _task_results(label: str, evaluation: Evaluation) -> list[Any]:
    """Task scores for the model index — only when every example was scored (a limited score is
    not comparable with published ones) and lm-eval gave a standard error."""
    from huggingface_hub import EvalResult

    tasks = evaluation.tasks
    if tasks is None or tasks.settings.get("limit"):
        return []
    return [
        EvalResult(
            task_type="text-generation",
            task_name="Text generation",
            dataset_type=score.dataset or score.task,
            dataset_name=score.task,
            metric_type=score.metric,
            metric_name=f"{score.metric} ({label}, lm-eval {tasks.lm_eval_version})",
            metric_value=round(float(score.value), 4),
        )
        for score in tasks.scores
        if score.stderr is not None
    ]


def image_table(plan: RepoPlan) -> tuple[list[dict[str, str]], str]:
    """The repo's picture figures (a vision model's variants, one line per projector) and what they compare with."""
    lines, baseline, prompts = [], "", 0
    for variant in plan.variants:
        image = variant.evaluation.image if variant.evaluation else None
        if image is None:
            continue
        baseline, prompts = image.baseline, image.prompts
        for score in image.scores:
            lines.append(
                {
                    "label": variant.label,
                    "projector": score.projector,
                    "kl": display.scientific(score.quant_kl_mean, score.quant_kl_mean_stderr),
                    "top1": display.percent(score.quant_top1_agreement, score.quant_top1_agreement_stderr),
                    "effect": display.scientific(score.image_effect_kl, score.image_effect_kl_stderr),
                    "original": display.scientific(score.ref_kl_mean, score.ref_kl_mean_stderr)
                    if score.ref_kl_mean is not None
                    else None,
                    "tokens": str(score.answer_tokens),
                }
            )
    note = (
        f"Each variant read {prompts} pictures drawn by hubquant, each with a question, and was fed the answer "
        "token by token; the figures compare its next-token distribution at every answer token. "
        f"{baseline} (— marks that form itself). *Picture effect*: the KL between the answers given the right "
        "picture and another one of the set — a quantization KL well below it changes what the model reads in a "
        "picture much less than the picture itself does. ± one standard error over the answer tokens."
        if lines
        else ""
    )
    return lines, note


def _card_data(plan: RepoPlan, context: CardContext, eval_results: list[Any]) -> Any:
    from huggingface_hub import ModelCardData

    from hubquant.exporters import get_exporter

    exporter = get_exporter(plan.format)
    source = context.source
    license_id = source.get("license") or None
    custom_license = license_id == "other" or (license_id is not None and not re.fullmatch(r"[\w.-]+", license_id))
    return ModelCardData(
        base_model=context.base_model,
        base_model_relation="quantized" if context.base_model else None,
        library_name=exporter.library_name,
        pipeline_tag="image-text-to-text" if source.get("vision_parts") else "text-generation",
        license="other" if custom_license else license_id,
        license_name=(context.license_name or license_id) if custom_license else None,
        license_link=context.license_link if custom_license else None,
        tags=sorted(
            {
                plan.format,
                exporter.library_name,
                source.get("model_type") or "phi",
                *(("vision", "multimodal") if source.get("vision_parts") else ()),
                "hubquant",
                "quantized",
                *(v.precision.lower() for v in plan.variants),
            }
        ),
        model_name=plan.repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
    )


def _source_link(context: CardContext) -> tuple[str | None, bool]:
    source = context.source
    source_id = context.base_model or (source.get("id") if source.get("revision") else None) or source.get("name")
    is_hub = bool(source_id and HUB_ID_PATTERN.match(source_id) and (context.base_model or source.get("revision")))
    return source_id, is_hub


def _settings_text(sample: Evaluation | None) -> dict[str, Any]:
    if sample is None:
        return {
            "text_name": "",
            "eval_tokens": "",
            "context": None,
            "prompt_tokens": None,
            "gen_tokens": None,
            "machine": "",
        }
    text = sample.text
    machine = sample.machine
    return {
        "text_name": text.label or text.name,
        "text_sha": text.sha256[:12],
        "eval_tokens": f"{text.tokens_scored} tokens scored in {text.windows} windows",
        "context": sample.settings.get("context"),
        "prompt_tokens": sample.settings.get("prompt_tokens"),
        "gen_tokens": sample.settings.get("gen_tokens"),
        "speed_note": sample.speed_note,
        "machine": f"{machine.get('cpu', 'an unknown CPU')} ({machine.get('cores', '?')} cores, "
        f"{machine.get('system', '')})",
    }


def task_table(plan: RepoPlan) -> tuple[list[dict[str, str]], str]:
    """The repo's lm-eval task rows (the original's first, from the variants' records) and how they were scored."""
    rows = [v.evaluation.model_copy(update={"label": v.label}) for v in plan.variants if v.evaluation]
    rows = [row for row in rows if row.tasks is not None]
    if not rows:
        return [], ""
    first = rows[0].tasks
    assert first is not None
    limit = first.settings.get("limit")
    shots = first.settings.get("num_fewshot")
    note = (
        f"Scored with lm-evaluation-harness {first.lm_eval_version} through hubquant's adapter: every runtime "
        "and the original (PyTorch, float32) get the same requests, tokenized once with the original tokenizer; "
        "± one standard error (lm-eval's); recovery = variant / original, paired over the same examples. "
        + (
            f"**Only the first {limit} examples of each task were scored** (a limit), so the scores are not "
            "comparable with full-task scores published elsewhere. "
            if limit
            else "Every example was scored. "
        )
        + (f"{shots}-shot." if shots is not None else "Each task's own few-shot setting.")
    )
    return display.task_rows(rows, original="original"), note


def _description(plan: RepoPlan, context: CardContext, display_name: str) -> str:
    source = context.source
    source_id, is_hub = _source_link(context)
    link = f"[{source_id}](https://huggingface.co/{source_id})" if is_hub else f"`{source.get('name')}`"
    parts = source.get("vision_parts") or {}
    vision = (
        f" It reads pictures: its parts are {', '.join(f'{p} {display.count(n)}' for p, n in parts.items())}; "
        "the language model is quantized, and the picture encoder ships beside it."
        if parts
        else ""
    )
    return (
        f"{display_name} quantizations ({', '.join(v.precision for v in plan.variants)}) of {link}, "
        f"a {source.get('architecture', 'Phi')} model with {display.count(source.get('parameter_count') or 0)} "
        f"parameters ({source.get('dtype')} weights), built, measured and published by hubquant. Each "
        "variant was measured against the original on the same text with the same tokenization; the table "
        "below has the figures, each with its standard error." + vision
    )


def variant_notes(plan: RepoPlan) -> list[dict[str, Any]]:
    """What the table cannot say per variant (tensor types, shards, calibration), from its exporter."""
    from hubquant.exporters import get_exporter

    notes = []
    for variant in plan.variants:
        lines = get_exporter(variant.format).variant_notes(variant.artifact)
        if lines:
            notes.append({"label": variant.label, "lines": lines})
    return notes


def _provenance(plan: RepoPlan, context: CardContext) -> list[str]:
    lines = [
        f"{v.label}: MLflow run `{context.mlflow_runs[v.folder]}`"
        for v in plan.variants
        if context.mlflow_runs.get(v.folder)
    ]
    return lines + ([f"Built in CI: {context.ci_run_url}"] if context.ci_run_url else [])


def build_card(plan: RepoPlan, context: CardContext) -> ModelCard:
    """The rendered card of one repo (metadata validated by ``huggingface_hub``'s own classes)."""
    from huggingface_hub import ModelCard

    from hubquant import __version__
    from hubquant.exporters import get_exporter

    exporter = get_exporter(plan.format)
    source = context.source
    rows, reference, sample = card_rows(plan)
    text_name = sample.text.name if sample else ""
    text_name = "hubquant-eval-text" if text_name == "builtin" else text_name
    eval_results = _eval_results(plan, text_name)
    tasks, images = task_table(plan), image_table(plan)
    tools: dict[str, str] = {}
    for variant in plan.variants:
        tools.update(variant.manifest.tools)
    source_id, is_hub = _source_link(context)
    template = importlib.resources.files("hubquant").joinpath("data/card.md.j2").read_text(encoding="utf-8")
    return ModelCard.from_template(
        _card_data(plan, context, eval_results),
        template_str=template,
        repo_name=plan.repo_id.split("/")[-1],
        description=_description(plan, context, exporter.display_name),
        chart_path=context.chart_path,
        model_name=source.get("name"),
        rows=rows,
        reference=reference,
        fidelity=fidelity_line(
            sample.fidelity if sample else None, exporter.display_name, sample.fidelity_note if sample else None
        ),
        variant_notes=variant_notes(plan),
        task_rows=tasks[0],
        task_note=tasks[1],
        image_rows=images[0],
        image_note=images[1],
        device_advice=device_advice([(v.format, v.precision) for v in plan.variants]),
        snippets=exporter.snippets(plan),
        siblings=[
            {
                "repo_id": s.repo_id,
                "url": s.url,
                "what": f"{get_exporter(s.format).display_name} ({', '.join(v.precision for v in s.variants)})",
            }
            for s in context.siblings
            if s.repo_id != plan.repo_id
        ],
        source_id=source_id if is_hub else source.get("name"),
        source_url=f"https://huggingface.co/{source_id}" if is_hub else None,
        source_revision=source.get("revision"),
        hubquant_version=__version__,
        tools=", ".join(f"{k} {v}" for k, v in sorted(tools.items())),
        provenance=_provenance(plan, context),
        **_settings_text(sample),
    )
