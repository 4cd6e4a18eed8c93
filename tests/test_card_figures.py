"""How figures read in the table and the cards: every quality figure with ±, "within noise" instead of
"better than the original", and a runtime's own deviation named apart from the quantization's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hubquant import display
from hubquant.records import (
    Evaluation,
    Fidelity,
    FileEntry,
    Manifest,
    Metrics,
    SourceFacts,
    TextFacts,
    VariantRecord,
    write_evaluation,
    write_manifest_file,
)

SOURCE = SourceFacts(
    id="/models/tiny",
    name="tiny",
    fingerprint="f" * 64,
    architecture="Phi3ForCausalLM",
    model_type="phi3",
    parameter_count=3_000_000,
    dtype="float32",
    license="mit",
)
TEXT = TextFacts(
    name="builtin", sha256="a" * 64, label="hubquant built-in text", tokens_scored=508, windows=4, context=128
)
REFERENCE = Metrics(size_bytes=12_000_000, bits_per_weight=32.0, perplexity=374.2, perplexity_stderr=17.3)


def _fidelity(deviates: bool) -> Fidelity:
    return Fidelity(
        format="gguf",
        precision="F16",
        origin="floor",
        kl_mean=0.045 if deviates else 6e-8,
        kl_mean_stderr=0.003 if deviates else 1e-8,
        top1_agreement=0.82 if deviates else 1.0,
        top1_agreement_stderr=0.017 if deviates else 0.0,
        ppl_delta_pct=3.8 if deviates else 0.0,
        ppl_delta_pct_stderr=1.4 if deviates else 0.001,
        max_kl=1e-4,
        min_top1=0.99,
        deviates=deviates,
        finding="GGUF (llama.cpp) computes this model differently from the reference: …" if deviates else None,
    )


def _artifact(folder: Path, precision: str, metrics: Metrics, fidelity: Fidelity) -> Path:
    folder.mkdir(parents=True)
    weights = folder / f"tiny-{precision}.gguf"
    weights.write_bytes(precision.encode() * 100)
    write_manifest_file(
        folder,
        Manifest(
            variant=VariantRecord(format="gguf", precision=precision, options={"imatrix": False}),
            source=SOURCE,
            tools={"llama-cpp-python": "0.3.36"},
            cache_key=hashlib.sha256(precision.encode()).hexdigest(),
            files=[
                FileEntry(
                    path=weights.name,
                    size=weights.stat().st_size,
                    sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                )
            ],
        ),
    )
    write_evaluation(
        folder,
        Evaluation(
            label=f"gguf {precision}",
            variant=VariantRecord(format="gguf", precision=precision),
            text=TEXT,
            metrics=metrics,
            reference=REFERENCE,
            fidelity=fidelity,
            settings={"context": 128, "prompt_tokens": 64, "gen_tokens": 16},
        ),
    )
    return folder


def _card(tmp_path: Path, *, deviates: bool) -> str:
    from hubquant.artifact import load_artifact
    from hubquant.card import CardContext, build_card
    from hubquant.repos import plan_repos, public_source

    noise = Metrics(
        size_bytes=1_800_000,
        bits_per_weight=4.8,
        perplexity=372.6,
        perplexity_stderr=17.1,
        ppl_delta_pct=-0.42,
        ppl_delta_pct_stderr=0.60,
        kl_mean=1.1e-3,
        kl_mean_stderr=6e-5,
        top1_agreement=0.972,
        top1_agreement_stderr=0.007,
        quant_kl_mean=1.0e-3,
        quant_kl_mean_stderr=5e-5,
    )
    clear = noise.model_copy(update={"ppl_delta_pct": 2.1, "ppl_delta_pct_stderr": 0.4})
    folders = [
        _artifact(tmp_path / "gguf-Q4_K_M", "Q4_K_M", noise, _fidelity(deviates)),
        _artifact(tmp_path / "gguf-Q3_K_M", "Q3_K_M", clear, _fidelity(deviates)),
    ]
    plans = plan_repos([load_artifact(f) for f in folders], namespace="ns", endpoint="https://hub.example")
    context = CardContext(source=public_source(plans[0].variants[0].manifest), base_model=None)
    return str(build_card(plans[0], context))


def test_every_card_figure_carries_its_error_and_noise_is_never_an_improvement(tmp_path: Path) -> None:
    card = _card(tmp_path, deviates=False)
    assert "-0.42% ± 0.60% (within noise)" in card, "a change inside 2 standard errors is noise, not 'better'"
    assert "+2.10% ± 0.40%" in card and "+2.10% ± 0.40% (within noise)" not in card
    assert "372.600 ± 17.100" in card and "97.2% ± 0.7%" in card and "1.10e-03 ± 6.0e-05" in card
    assert "508 tokens scored in 4 windows" in card and "hubquant built-in text" in card
    assert "Runtime fidelity: GGUF (llama.cpp)'s own unquantized form (F16) matches the original" in card
    assert "Runtime finding" not in card


def test_a_runtime_that_deviates_unquantized_is_a_named_finding_on_the_card(tmp_path: Path) -> None:
    card = _card(tmp_path, deviates=True)
    assert "**Runtime finding:** GGUF (llama.cpp) computes this model differently" in card
    assert "KL from quantization" in card and "1.00e-03 ± 5.0e-05" in card


def test_the_table_marks_noise_and_names_findings() -> None:
    from hubquant.table import render_table

    def row(label: str, metrics: Metrics, fidelity: Fidelity | None, reference: bool = False) -> Evaluation:
        return Evaluation(
            label=label,
            variant=VariantRecord(format="gguf" if not reference else "pytorch", precision=label.split()[-1]),
            is_reference=reference,
            text=TEXT,
            metrics=metrics,
            reference=REFERENCE,
            fidelity=fidelity,
        )

    rows = [
        row("reference fp32", REFERENCE.model_copy(update={"ppl_delta_pct": 0.0}), None, reference=True),
        row(
            "gguf Q4_K_M",
            Metrics(
                size_bytes=1_800_000,
                perplexity=372.6,
                ppl_delta_pct=-0.42,
                ppl_delta_pct_stderr=0.60,
                kl_mean=1.1e-3,
                quant_kl_mean=1.0e-3,
                top1_agreement=0.97,
            ),
            _fidelity(True),
        ),
    ]
    table = render_table(rows)
    assert "~-0.42±0.60%" in table and "! finding: GGUF (llama.cpp) computes" in table
    assert all(len(line) <= 100 for line in table.splitlines())


@pytest.mark.parametrize(
    ("value", "stderr", "expected"),
    [
        (-0.42, 0.60, "-0.42% ± 0.60% (within noise)"),
        (0.5, 0.1, "+0.50% ± 0.10%"),
        (1.0, None, "+1.00%"),
        (None, None, "—"),
    ],
)
def test_delta_wording(value: float | None, stderr: float | None, expected: str) -> None:
    assert display.delta_pct(value, stderr) == expected


def test_a_floor_that_was_not_measured_says_why(tmp_path: Path) -> None:
    from hubquant.card import fidelity_line
    from hubquant.table import render_table

    note = "openvino fp32 floor not measured: its fp32 form needs about 23.40 GB of memory, 16.00 GB is available"
    line = fidelity_line(None, "OpenVINO IR", note)
    assert line is not None and line.startswith("Runtime fidelity: not measured — openvino fp32 floor")
    assert fidelity_line(None, "OpenVINO IR") is None
    row = Evaluation(
        label="openvino int4",
        variant=VariantRecord(format="openvino", precision="int4"),
        text=TEXT,
        metrics=Metrics(size_bytes=10),
        reference=REFERENCE,
        fidelity_note=note,
    )
    assert "! openvino fp32 floor not measured: its fp32 form needs about 23.40 GB" in render_table([row])
