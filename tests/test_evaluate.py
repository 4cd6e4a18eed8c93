"""Evaluation: one token stream, a cached reference, the same metrics for every variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubquant.pipeline import quantize
from hubquant.recipe import build_recipe
from hubquant.records import METRICS, Metrics

from conftest import run_cli

pytestmark = pytest.mark.slow

TIMING = {"load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "peak_rss_mb"}


@pytest.fixture(scope="module")
def variants(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("eval-variants")
    recipe = build_recipe(
        {
            "source": str(tiny_phi3),
            "output": str(out),
            "variants": [{"format": "gguf", "precision": p} for p in ("F16", "Q8_0", "Q4_K_M")],
        }
    )
    result = quantize(recipe)
    assert not result.failures
    return [str(a.path) for a in result.artifacts]


def _eval_json(*args: str) -> dict:
    code, out, err = run_cli("eval", *args, "--context", "256", "--json")
    assert code == 0, err
    return json.loads(out)


def test_metrics_order_and_f16_agreement(variants: list[str], tiny_phi3: Path) -> None:
    import jsonschema

    from hubquant.table import table_schema

    document = _eval_json(*variants)
    schema = json.loads((Path(__file__).parents[1] / "hubquant/data/eval-table.schema.json").read_text())
    assert schema == json.loads(json.dumps(table_schema())), "regenerate the schema file from hubquant.table"
    jsonschema.validate(document, schema)
    rows = {row["variant"]["precision"]: row for row in document["rows"]}
    assert document["rows"][0]["is_reference"] is True
    sizes = [row["metrics"]["size_bytes"] for row in document["rows"]]
    assert sizes == sorted(sizes, reverse=True)
    f16, q8, q4 = (rows[p]["metrics"] for p in ("F16", "Q8_0", "Q4_K_M"))
    ref = document["rows"][0]["metrics"]
    assert abs(f16["perplexity"] - ref["perplexity"]) / ref["perplexity"] < 0.001
    assert f16["kl_mean"] < 1e-3
    assert f16["kl_mean"] < q8["kl_mean"] < q4["kl_mean"]
    assert 0.9 < q4["top1_agreement"] <= q8["top1_agreement"] <= 1.0
    assert set(METRICS) == set(Metrics.model_fields) == set(f16)
    # The run's F16 variant is llama.cpp's floor: the other variants are also scored against it.
    floor = rows["Q4_K_M"]["fidelity"]
    assert floor["origin"] == "variant" and floor["precision"] == "F16" and not floor["deviates"]
    assert f16["quant_kl_mean"] is None and q4["quant_kl_mean"] == pytest.approx(q4["kl_mean"], rel=0.2)
    for metrics in (f16, q8, q4):
        assert metrics["prefill_tokens_per_second"] > 0 and metrics["decode_tokens_per_second"] > 0
        assert 10 < metrics["peak_rss_mb"] < 4000 and metrics["load_seconds"] > 0
        assert metrics["export_seconds"] is not None
        assert metrics["perplexity_stderr"] > 0 and metrics["ppl_delta_pct_stderr"] > 0
        assert metrics["kl_mean_stderr"] > 0 and metrics["top1_agreement_stderr"] is not None
    assert q4["bits_per_weight"] < q8["bits_per_weight"] < f16["bits_per_weight"] < 17
    assert abs(f16["compression_ratio"] - 2.0) < 0.1  # fp32 source → f16
    # eval.json beside each artifact, with the same numbers
    written = json.loads((Path(rows["Q4_K_M"]["path"]) / "eval.json").read_text())
    assert written["metrics"] == q4 and written["variant"]["precision"] == "Q4_K_M"
    assert written["source"]["fingerprint"] and written["machine"]["cores"] >= 1
    assert written["text"]["tokens_scored"] == document["text"]["tokens_scored"] > 0
    assert written["text"]["label"].startswith("hubquant's built-in text")


@pytest.mark.fresh_reference
def test_runs_agree_and_the_reference_is_cached(variants: list[str], tiny_phi3: Path, tmp_path: Path) -> None:
    first = _eval_json(*variants[:2])
    code, out, err = run_cli("eval", *variants[:2], "--context", "256", "--json")
    second = json.loads(out)
    assert code == 0
    for a, b in zip(first["rows"], second["rows"], strict=False):
        assert {k: v for k, v in a["metrics"].items() if k not in TIMING} == {
            k: v for k, v in b["metrics"].items() if k not in TIMING
        }
        assert a["fidelity"] == b["fidelity"]
    # The second run said it reused the cached reference; the table output names the step.
    code, _, err = run_cli("eval", variants[0], "--context", "256")
    assert code == 0 and "reusing cached logits" in err
    # A different text invalidates it.
    text = tmp_path / "other.txt"
    text.write_text((Path(__file__).parents[1] / "hubquant/data/calibration.txt").read_text()[:5000] + "\nMore text.\n")
    code, _, err = run_cli("eval", variants[0], "--context", "256", "--text", str(text))
    assert code == 0 and "PyTorch logits for" in err and "reusing" not in err


def test_table_fits_a_terminal_and_gate_exits_2(variants: list[str], tmp_path: Path) -> None:
    plot = tmp_path / "tradeoff.png"
    code, out, err = run_cli("eval", *variants, "--context", "256", "--max-kl", "1e-4", "--plot", str(plot))
    assert code == 2, err
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines), max(map(len, lines))
    assert any(line.startswith("✗ gguf Q4_K_M ") for line in lines)
    assert any(line.startswith("✗ gguf Q4_K_M: fails the quality gate") for line in lines)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gate = json.loads((Path(variants[-1]) / "eval.json").read_text())["gate"]
    assert gate["passed"] is False and gate["max_kl"] == 1e-4
    code, _, _ = run_cli("eval", *variants, "--context", "256", "--max-ppl-delta", "50")
    assert code == 0


def _clean_failure(code: int, err: str, *needles: str) -> None:
    assert code == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_inputs(variants: list[str], tiny_phi4: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    code, _, err = run_cli("eval", str(bare), "--source", variants[0])
    _clean_failure(code, err, "no manifest.json")
    code, _, err = run_cli("eval", variants[0], "--source", str(tiny_phi4))
    _clean_failure(code, err, "another source")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli("eval", variants[0], "--text", str(empty))
    _clean_failure(code, err, "empty")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    code, _, err = run_cli("eval", variants[0], "--text", str(short), "--context", "256")
    _clean_failure(code, err, "fewer than one window")
    code, _, err = run_cli("eval", variants[0], "--text", str(short), "--dataset", "wikitext")
    _clean_failure(code, err, "cannot be combined")
    # No Hub here: either datasets is missing (named extra) or it cannot load the dataset.
    code, _, err = run_cli("eval", variants[0], "--dataset", "wikitext:wikitext-2-raw-v1:test")
    assert code == 1 and "Traceback" not in err
    assert "hubquant[datasets]" in err or "cannot load dataset" in err
