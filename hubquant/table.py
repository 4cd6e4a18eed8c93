"""The comparison as people and programs read it: a terminal table and the ``--json`` document.

The table fits a 100-column terminal. Δ perplexity carries its standard error; a change within two
standard errors of zero is marked ``~`` (within noise). *KL q* is the quantization alone: the
variant against its own runtime's unquantized output. Below the rows: each runtime's fidelity floor
(a finding when the runtime itself deviates from the reference), warnings, failures and the gate.
"""

from __future__ import annotations

from typing import Any

from hubquant import display
from hubquant.records import Evaluation, Fidelity, evaluation_document

TABLE_SCHEMA = "hubquant.eval-table/2"
_LABEL_MAX = 23


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _line(row: Evaluation, width: int) -> str:
    m = row.metrics
    label = row.label if row.gate.passed else f"✗ {row.label}"
    size = display.human_size(m.size_bytes, unit="")
    return (
        f"{_clip(label, width):<{width}} {size:>7} {display.fmt(m.perplexity, '.3f'):>8} "
        f"{display.delta_pct(m.ppl_delta_pct, m.ppl_delta_pct_stderr, compact=True):>13} "
        f"{display.fmt(m.kl_mean, '.2e'):>8} {display.fmt(m.quant_kl_mean, '.2e'):>8} "
        f"{display.percent(m.top1_agreement, None, compact=True):>6} "
        f"{display.fmt(m.prefill_tokens_per_second, '.0f'):>6} {display.fmt(m.decode_tokens_per_second, '.0f'):>6} "
        f"{display.fmt(m.peak_rss_mb, '.0f'):>5}"
    )


def _floors(rows: list[Evaluation]) -> list[Fidelity]:
    seen: dict[tuple[str, str], Fidelity] = {}
    for row in rows:
        if row.fidelity is not None:
            seen.setdefault((row.fidelity.format, row.fidelity.precision), row.fidelity)
    return list(seen.values())


def floor_lines(rows: list[Evaluation]) -> list[str]:
    """One line per runtime floor: within rounding, the finding, or why it was not measured."""
    lines = [f"! {note}" for note in dict.fromkeys(r.fidelity_note for r in rows if r.fidelity_note)]
    for floor in _floors(rows):
        if floor.deviates:
            lines.append(f"! finding: {floor.finding}")
        else:
            lines.append(
                f"  floor {floor.format} {floor.precision}: KL "
                f"{display.scientific(floor.kl_mean, floor.kl_mean_stderr)}, top-1 "
                f"{display.percent(floor.top1_agreement, floor.top1_agreement_stderr)} — the runtime matches "
                "the reference within rounding"
            )
    return lines


def render_table(rows: list[Evaluation]) -> str:
    """The comparison table; fits a 100-column terminal. A ✗ marks a variant that fails the gate."""
    width = min(max([18] + [len(r.label) + (0 if r.gate.passed else 2) for r in rows]), _LABEL_MAX)
    header = (
        f"{'variant':<{width}} {'size':>7} {'ppl':>8} {'Δppl ± se':>13} {'KL':>8} {'KL q':>8} {'top1':>6} "
        f"{'pre/s':>6} {'dec/s':>6} {'RSS':>5}"
    )
    lines = [header, "─" * len(header)] + [_line(row, width) for row in rows]
    lines.append(
        f"Δppl: paired change vs the reference, ± 1 standard error ({rows[0].text.tokens_scored} tokens); "
        "~ within noise"
    )
    lines.append("KL q: KL vs the runtime's own unquantized output (the quantization alone); RSS in MB")
    lines += floor_lines(rows)
    lines += task_lines(rows)
    lines += image_lines(rows)
    for row in rows:
        lines += [f"! {row.label}: {warning}" for warning in row.warnings]
        if row.speed_note:
            lines.append(f"! {row.label}: speed not measured: {row.speed_note}")
    for row in rows:
        if not row.gate.passed:
            lines.append(f"✗ {row.label}: fails the quality gate ({'; '.join(row.gate.reasons)})")
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def task_lines(rows: list[Evaluation]) -> list[str]:
    """The lm-eval task table below the comparison (nothing when no task was scored)."""
    found = display.task_rows(rows)
    runs = [row.tasks for row in rows if row.tasks is not None]
    if not found or not runs:
        return []
    settings = runs[0].settings
    limit = f"the first {settings['limit']} examples of each task" if settings.get("limit") else "every example"
    width = min(max(len(line["task"]) for line in found), 30)
    label = min(max(len(line["label"]) for line in found), _LABEL_MAX)
    head = f"{'task':<{width}} {'variant':<{label}} {'score ± se':>17} {'recovery ± se':>15}"
    lines = ["", f"lm-eval {runs[0].lm_eval_version} tasks, {limit}; recovery = variant / reference, paired", head]
    lines.append("─" * len(head))
    previous = None
    for line in found:
        task = "" if line["task"] == previous else line["task"]
        previous = line["task"]
        lines.append(
            f"{_clip(task, width):<{width}} {_clip(line['label'], label):<{label}} "
            f"{line['score']:>17} {line['recovery']:>15}"
        )
    return lines


def image_lines(rows: list[Evaluation]) -> list[str]:
    """A vision model's picture figures per variant and projector (nothing for a text model)."""
    found = [row for row in rows if row.image is not None]
    if not found:
        return []
    first = found[0].image
    assert first is not None
    original = any(score.ref_kl_mean is not None for row in found for score in row.image.scores)  # type: ignore[union-attr]
    # 79 characters of figures after the label: with the original's column the label gives way to stay in 100.
    label = min(max(len(row.label) for row in found), 21 if original else _LABEL_MAX)
    head = f"{'variant':<{label}} {'encoder':<7} {'KL q ± se':>18} {'top1 ± se':>13} {'picture effect':>18}"
    head += f" {'KL orig ± se':>18}" if original else ""
    lines = ["", f"pictures: {first.prompts} built-in pictures, KL on the answer tokens", head, "─" * len(head)]
    for row in found:
        assert row.image is not None
        for score in row.image.scores:
            lines.append(
                f"{_clip(row.label, label):<{label}} {score.projector:<7} "
                f"{display.scientific(score.quant_kl_mean, score.quant_kl_mean_stderr):>18} "
                f"{display.percent(score.quant_top1_agreement, score.quant_top1_agreement_stderr):>13} "
                f"{display.scientific(score.image_effect_kl, score.image_effect_kl_stderr):>18}"
                + (f" {display.scientific(score.ref_kl_mean, score.ref_kl_mean_stderr):>18}" if original else "")
            )
    return [*lines, first.baseline + " (— marks that form itself)"]


def _wrap(line: str, width: int = 100) -> list[str]:
    """Lines longer than the terminal continue indented below (the table rows never need it)."""
    import textwrap

    if len(line) <= width:
        return [line]
    return textwrap.wrap(line, width=width, subsequent_indent="    ", break_on_hyphens=False)


def rows_as_json(rows: list[Evaluation]) -> dict[str, Any]:
    """The ``hubquant eval --json`` document (schema: ``hubquant/data/eval-table.schema.json``)."""
    first = rows[0]
    shared = ("schema", "hubquant_version", "created", "source", "text", "settings", "machine", "reference")
    return {
        "schema": TABLE_SCHEMA,
        "text": first.text.model_dump(mode="json"),
        "settings": first.settings,
        "machine": first.machine,
        "rows": [{k: v for k, v in evaluation_document(r).items() if k not in shared} for r in rows],
    }


def table_schema() -> dict[str, Any]:
    """The JSON Schema of :func:`rows_as_json` (``hubquant/data/eval-table.schema.json`` is this, written
    out; a test keeps the two equal)."""
    from hubquant.records import TextFacts

    row = Evaluation.model_json_schema(by_alias=True, mode="serialization")
    shared = ("schema", "hubquant_version", "created", "source", "text", "settings", "machine", "reference")
    definitions = row.pop("$defs", {})
    row["properties"] = {k: v for k, v in row["properties"].items() if k not in shared}
    row["required"] = [k for k in row.get("required", []) if k not in shared]
    definitions["Row"] = row
    text = TextFacts.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": TABLE_SCHEMA,
        "title": "hubquant eval --json",
        "description": "The comparison printed by `hubquant eval --json`: the reference row first, then every variant. "
        "Metric definitions: hubquant.records.METRICS (and the README). Generated from "
        "hubquant.records by hubquant.table.table_schema().",
        "type": "object",
        "required": ["schema", "text", "settings", "machine", "rows"],
        "properties": {
            "schema": {"const": TABLE_SCHEMA},
            "text": text,
            "settings": {"type": "object"},
            "machine": {"type": "object"},
            "rows": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Row"}},
        },
        "$defs": definitions,
    }
