"""Recipes and options are validated before any work, with messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubquant.errors import RecipeError, RegistryError
from hubquant.exporters import Exporter, ExporterOptions, get_exporter, register_exporter
from hubquant.exporters.base import unregister_exporter
from hubquant.recipe import VariantSpec, build_recipe, load_recipe


def _recipe(**variant: object) -> dict:
    return {"source": "some/model", "variants": [{"format": "gguf", **variant}]}


@pytest.mark.parametrize(
    ("given", "native"),
    [
        ("int4", "Q4_K_M"),
        ("int8", "Q8_0"),
        ("fp16", "F16"),
        ("fp32", "F32"),
        ("INT4", "Q4_K_M"),
        ("q5_k_m", "Q5_K_M"),
        ("IQ4_XS", "IQ4_XS"),
    ],
)
def test_generic_and_native_precisions_resolve(given: str, native: str) -> None:
    assert VariantSpec(format="gguf", precision=given).resolved().precision == native


def test_resolved_options_carry_defaults() -> None:
    spec = VariantSpec(format="GGUF", precision="Q4_K_M").resolved()
    assert spec.format == "gguf"
    assert spec.options == {
        "imatrix": False,
        "calibration_text": None,
        "imatrix_context": 512,
        "pre_tokenizer": None,
        "token_embedding_type": None,
        "output_tensor_type": None,
        "tensor_types": [],
        "split_max_size": "45G",
    }


def test_unknown_precision_lists_the_allowed_ones() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe(_recipe(precision="Q4_K_XL"))
    assert "Q4_K_XL" in info.value.message and "variants[0]" in info.value.message
    assert "Q4_K_M" in info.value.hint and "int4" in info.value.hint


def test_unknown_format() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe({"source": "x/y", "variants": [{"format": "tflite", "precision": "int4"}]})
    assert "tflite" in info.value.message and "gguf" in info.value.hint


def test_unknown_option_names_key_and_alternatives() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe(_recipe(precision="Q4_K_M", options={"imatrx": True}))
    assert "imatrx" in info.value.message
    assert info.value.key == "variants[0].options.imatrx"
    assert "imatrix" in info.value.hint


def test_bad_option_value_is_named() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe(_recipe(precision="Q4_K_M", options={"imatrix_context": "long"}))
    assert "imatrix_context" in info.value.message


def test_unknown_recipe_and_variant_keys() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe({"source": "x/y", "variants": [{"format": "gguf", "precision": "int4"}], "outptu": "o"})
    assert "outptu" in info.value.message and "output" in info.value.hint
    with pytest.raises(RecipeError) as info:
        build_recipe({"source": "x/y", "variants": [{"format": "gguf", "precision": "int4", "bits": 4}]})
    assert "variants[0].bits" in info.value.message and "precision" in info.value.hint


def test_missing_variants_and_duplicates() -> None:
    with pytest.raises(RecipeError, match="variants"):
        build_recipe({"source": "x/y"})
    with pytest.raises(RecipeError, match="at least one variant"):
        build_recipe({"source": "x/y", "variants": []})
    with pytest.raises(RecipeError, match="repeats"):
        build_recipe(
            {
                "source": "x/y",
                "variants": [{"format": "gguf", "precision": "int4"}, {"format": "gguf", "precision": "Q4_K_M"}],
            }
        )


@pytest.mark.parametrize("precision", ["IQ2_XS", "IQ3_XS", "IQ1_M", "Q2_K_S"])
def test_low_bit_types_need_an_importance_matrix(precision: str) -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe(_recipe(precision=precision))
    assert "importance matrix" in info.value.message and "imatrix=true" in info.value.hint
    build_recipe(_recipe(precision=precision, options={"imatrix": True}))


def test_imatrix_is_dropped_for_converter_types() -> None:
    recipe = build_recipe(_recipe(precision="F16", options={"imatrix": True}))
    assert recipe.variants[0].options["imatrix"] is False


def test_unknown_pre_tokenizer_lists_known_ones() -> None:
    with pytest.raises(RecipeError) as info:
        build_recipe(_recipe(precision="Q8_0", options={"pre_tokenizer": "no-such-bpe"}))
    assert "gpt-4o" in info.value.hint
    build_recipe(_recipe(precision="Q8_0", options={"pre_tokenizer": "gpt-4o"}))


def test_missing_calibration_text(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        build_recipe(_recipe(precision="IQ4_XS", options={"imatrix": True, "calibration_text": str(tmp_path / "x")}))


def test_yaml_recipe_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "source: model\noutput: out\nvariants:\n  - {format: gguf, precision: int8}\n"
        "  - {format: gguf, precision: IQ4_XS, options: {imatrix: true}}\n"
    )
    recipe = load_recipe(path)
    assert recipe.source == str(tmp_path / "model")
    assert recipe.output == tmp_path / "out"
    assert [v.precision for v in recipe.variants] == ["Q8_0", "IQ4_XS"]


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("source: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def _format_class(name: str, **changes: object) -> type:
    """An exporter class with a complete declaration, changed by ``changes`` (None deletes an attribute)."""

    class FineOptions(ExporterOptions):
        pass

    attributes: dict[str, object] = {
        "name": name,
        "description": "x",
        "extra": "x",
        "precisions": {"A": "a"},
        "generic_precisions": {"int4": "A", "int8": "A", "fp16": "A", "fp32": "A"},
        "Options": FineOptions,
        "library_name": "x",
        "display_name": "X",
        "repo_template": "{model}-x",
        "repo_layout": "files",
        "export_one": lambda self, source, job, *, shared, progress: None,
        "runner": lambda self, artifact, *, context_length: None,
    }
    attributes.update(changes)
    return type(
        f"Exporter_{name.replace('-', '_')}", (Exporter,), {k: v for k, v in attributes.items() if v is not None}
    )


def test_registry_validates_declarations() -> None:
    with pytest.raises(RegistryError, match="already registered"):
        register_exporter(_format_class("gguf"))
    with pytest.raises(RegistryError, match="generic precisions"):
        register_exporter(_format_class("partial", generic_precisions={"int4": "A"}))
    with pytest.raises(RegistryError, match="unknown ones"):
        register_exporter(
            _format_class("wrong", generic_precisions={"int4": "B", "int8": "A", "fp16": "A", "fp32": "A"})
        )
    with pytest.raises(RegistryError, match="does not declare 'library_name'"):
        register_exporter(_format_class("no-library", library_name=None))
    with pytest.raises(RegistryError, match="does not implement runner"):
        register_exporter(_format_class("no-runner", runner=None))
    with pytest.raises(RegistryError, match="neither export_one"):
        register_exporter(_format_class("no-export", export_one=None))
    with pytest.raises(RegistryError, match="unknown field"):
        register_exporter(_format_class("bad-template", repo_template="{model}-{quant}"))
    with pytest.raises(RegistryError, match="repo_layout"):
        register_exporter(_format_class("bad-layout", repo_layout="zip"))
    fine = register_exporter(_format_class("fine-test-format"))
    try:
        assert get_exporter("fine-test-format") is fine
    finally:
        unregister_exporter("fine-test-format")
