"""What to build: ``VariantSpec`` (one format + precision + options) and ``Recipe`` (a source and its variants).

A recipe is a YAML file or the same object built from CLI flags. Everything is validated before
any heavy work starts: unknown keys, a precision the format does not offer, an option the format
does not take — each is a ``RecipeError`` that names the key and lists what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hubquant.errors import RecipeError, key_path
from hubquant.exporters.base import GENERIC_PRECISIONS

__all__ = ["GENERIC_PRECISIONS", "EvalSection", "HubSection", "Recipe", "VariantSpec", "build_recipe", "load_recipe"]


class VariantSpec(BaseModel):
    """One variant to build: a format, a precision (generic or the format's native name), options.

    Use :meth:`resolved` to get the spec with the precision mapped to the format's native name and
    the options validated and completed with their defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    precision: str
    options: dict[str, Any] = Field(default_factory=dict)

    def resolved(self) -> "VariantSpec":
        """Validate against the format's exporter and return the canonical spec.

        Raises:
            RecipeError: unknown format, precision or option.
        """
        from hubquant.exporters import get_exporter

        exporter = get_exporter(self.format)
        precision = exporter.resolve_precision(self.precision)
        options = exporter.validate_options(self.options, precision=precision)
        return VariantSpec(format=exporter.name, precision=precision, options=options)

    @property
    def label(self) -> str:
        """A short name for messages and folder names, e.g. ``gguf-Q4_K_M``."""
        return f"{self.format}-{self.precision}"


class EvalSection(BaseModel):
    """How ``hubquant publish`` measures the variants, and the quality gate they must pass."""

    model_config = ConfigDict(extra="forbid")

    #: A text file to score; or ``dataset`` (NAME[:CONFIG[:SPLIT]]) — the built-in text when it cannot be loaded.
    text: str | None = None
    dataset: str | None = None
    context: int = Field(512, ge=16)
    max_windows: int | None = Field(None, ge=1)
    prompt_tokens: int = Field(64, ge=1)
    gen_tokens: int = Field(32, ge=1)
    #: How the float32 reference holds its weights (see hubquant.torch_runner.reference_weights).
    reference_weights: Literal["auto", "fp32", "source"] = "auto"
    max_ppl_delta: float | None = None
    max_kl: float | None = None
    #: Measure each runtime's own unquantized deviation from the reference (its fidelity floor).
    fidelity: bool = True
    #: Hold back the variants of a runtime whose unquantized KL exceeds this; default: publish with the finding.
    max_runtime_kl: float | None = None
    #: lm-eval tasks to score every variant on: task or group names, or task YAML files / folders.
    tasks: list[str] = Field(default_factory=list)
    #: Examples per task (the first N; a card says when a limit was used).
    task_limit: int | None = Field(None, ge=1)
    #: Few-shot examples (default: each task's own).
    num_fewshot: int | None = Field(None, ge=0)
    #: Tokens a task request may use (lm-eval's default for models that do not say).
    task_max_length: int = Field(2048, ge=16)

    @model_validator(mode="after")
    def _one_text(self) -> EvalSection:
        if self.text and self.dataset:
            raise ValueError("eval.text and eval.dataset cannot both be set")
        return self


class HubSection(BaseModel):
    """Where ``hubquant publish`` pushes (see ``hubquant push``)."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = None
    private: bool = False
    create_pr: bool = False
    revision: str | None = None
    base_model: str | None = None
    repo_names: dict[str, str] = Field(default_factory=dict)
    collection: bool = True


class RunnerSpec(BaseModel):
    """A GitHub Actions runner the publish workflow may put a format's job on (``hubquant plan --github-matrix``).

    The sizes default to GitHub's standard Linux runner for public repositories (16 GB memory,
    14 GB SSD); give a larger runner's own figures.
    """

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1)
    memory_gb: float = Field(default=16.0, gt=0)
    disk_gb: float = Field(default=14.0, gt=0)


class Recipe(BaseModel):
    """A source checkpoint and the variants to build from it.

    ``source`` is a local folder or a Hub id; ``revision`` pins a Hub commit/branch/tag.
    ``output`` is the folder that receives one sub-folder per variant. ``eval`` and ``hub`` are
    read by ``hubquant publish``.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    revision: str | None = None
    output: Path = Path("hubquant-out")
    #: Where intermediates go (the GGUF F16 file, the OpenVINO full-precision IR, the ONNX
    #: prequantized checkpoint); default: a temporary folder inside ``output``. Each is deleted as
    #: soon as no remaining variant needs it, and the folder itself when the format is done.
    scratch: Path | None = None
    #: MLflow experiment (default ``hubquant/<model name>``).
    experiment: str | None = None
    variants: list[VariantSpec]
    eval: EvalSection = Field(default_factory=EvalSection)
    hub: HubSection = Field(default_factory=HubSection)
    #: Runners ``plan --github-matrix`` chooses from, by name: a label, or {label, memory_gb, disk_gb}.
    #: ``default`` is tried first; a format whose estimate does not fit it goes to the next that fits.
    runners: dict[str, RunnerSpec] = Field(default_factory=dict)

    @field_validator("runners", mode="before")
    @classmethod
    def _runner_labels(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {name: {"label": spec} if isinstance(spec, str) else spec for name, spec in value.items()}
            if value and "default" not in value:
                raise ValueError("runners needs a `default` entry (the runner a job gets when it fits)")
        return value

    @field_validator("variants")
    @classmethod
    def _at_least_one(cls, value: list[VariantSpec]) -> list[VariantSpec]:
        if not value:
            raise ValueError("a recipe needs at least one variant")
        return value

    def resolved(self) -> "Recipe":
        """Return the recipe with every variant resolved; duplicates after resolution are errors."""
        resolved: list[VariantSpec] = []
        seen: dict[str, int] = {}
        for index, variant in enumerate(self.variants):
            try:
                spec = variant.resolved()
            except RecipeError as exc:
                exc.key = key_path(["variants", index, *(exc.key.split(".") if exc.key else [])])
                exc.message = f"variants[{index}] ({variant.format} {variant.precision}): {exc.message}"
                exc.args = (exc.message,)
                raise
            key = spec.model_dump_json()
            if key in seen:
                raise RecipeError(
                    f"variants[{index}] repeats variants[{seen[key]}] ({spec.format} {spec.precision})",
                    key=f"variants[{index}]",
                    hint="list each variant once",
                )
            seen[key] = index
            resolved.append(spec)
        return self.model_copy(update={"variants": resolved})


def _pydantic_to_recipe_error(exc: ValidationError, origin: str) -> RecipeError:
    """Turn pydantic's report into one message that names the key and what is allowed."""
    first = exc.errors()[0]
    loc = first["loc"]
    key = key_path(list(loc)) or "(top level)"
    if first["type"] == "extra_forbidden":
        model = VariantSpec if loc and loc[0] == "variants" and len(loc) > 2 else Recipe
        return RecipeError(f"{origin}: unknown key '{key}'", key=key, allowed=list(model.model_fields))
    if first["type"] == "missing":
        return RecipeError(f"{origin}: missing required key '{key}'", key=key, hint=f"add '{key}' to the recipe")
    return RecipeError(
        f"{origin}: invalid value for '{key}': {first['msg']}", key=key, hint="fix the value in the recipe"
    )


def build_recipe(data: dict[str, Any], *, origin: str = "recipe") -> Recipe:
    """Build and fully validate a recipe from plain data (a parsed YAML file or CLI flags).

    Raises:
        RecipeError: anything invalid, with the offending key.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: expected a mapping at the top level", hint="see the README for a recipe example")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_to_recipe_error(exc, origin) from None
    return recipe.resolved()


def read_recipe_data(path: str | Path) -> dict[str, Any]:
    """A recipe file's YAML as plain data, not yet validated (``publish`` adds profiles and flags to it).

    Relative ``source``/``output`` paths are taken relative to the recipe file's folder when that
    path exists there, so a recipe can travel with its model.

    Raises:
        RecipeError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}", hint="check the path given to --recipe") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}", hint="pass a readable YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}", hint="fix the YAML syntax") from None
    if isinstance(data, dict):
        base = path.resolve().parent
        source = data.get("source")
        if isinstance(source, str) and not Path(source).is_absolute() and (base / source).exists():
            data["source"] = str(base / source)
        for key in ("output", "scratch"):
            value = data.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                data[key] = str(base / value)
    return data


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file (see :func:`read_recipe_data`).

    Raises:
        RecipeError: the file is missing, not YAML, or invalid.
    """
    data = read_recipe_data(path)
    return build_recipe(data, origin=str(path))


PROFILES = ("mobile", "ai-pc", "all")


def profile_data(name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The variants and evaluation settings of a device profile shipped as data (``data/profiles/NAME.yaml``).

    Raises:
        RecipeError: no such profile.
    """
    import importlib.resources

    if name not in PROFILES:
        raise RecipeError(f"unknown profile '{name}'", key="profile", allowed=list(PROFILES))
    data = yaml.safe_load(
        importlib.resources.files("hubquant").joinpath(f"data/profiles/{name}.yaml").read_text(encoding="utf-8")
    )
    variants: list[dict[str, Any]] = []
    evaluation: dict[str, Any] = {}
    for included in data.get("include", []):
        more, their_eval = profile_data(included)
        variants += [v for v in more if v not in variants]
        evaluation = {**their_eval, **evaluation}
    return variants + [v for v in data.get("variants", []) if v not in variants], {**evaluation, **data.get("eval", {})}


def profile_variants(name: str) -> list[dict[str, Any]]:
    """The variants of a device profile (see :func:`profile_data`)."""
    return profile_data(name)[0]


def publish_recipe(
    recipe_file: str | None,
    *,
    source: str | None = None,
    profile: str | None = None,
    formats: tuple[str, ...] = (),
    variants: tuple[int, ...] = (),
    revision: str | None = None,
) -> Recipe:
    """The recipe of ``publish``/``plan``: a file, or SOURCE + a profile; narrowed to formats or variant numbers.

    A profile adds its variants and its evaluation settings (the recipe's own ``eval`` keys win).

    Raises:
        RecipeError: no source, a bad variant number, or anything invalid in the recipe.
    """
    data: Any = read_recipe_data(recipe_file) if recipe_file else {}
    origin = recipe_file or "command line"
    if not isinstance(data, dict):
        build_recipe(data, origin=origin)  # raises the "not a mapping" error
    if source:
        data["source"] = source
    if revision:
        data["revision"] = revision
    if profile:
        extra, evaluation = profile_data(profile)
        data["variants"] = list(data.get("variants") or []) + [
            v for v in extra if v not in (data.get("variants") or [])
        ]
        if isinstance(data.get("eval") or {}, dict):
            own = data.get("eval") or {}
            data["eval"] = {**({} if own.get("text") else evaluation), **own}
    if "source" not in data:
        raise RecipeError("no source given", hint="pass RECIPE.yaml, or --source MODEL with --profile")
    recipe = build_recipe(data, origin=origin)
    if variants:
        bad = [i for i in variants if not 0 <= i < len(recipe.variants)]
        if bad:
            raise RecipeError(
                f"--variant {bad[0]} is out of range",
                key="variant",
                allowed=[str(i) for i in range(len(recipe.variants))],
            )
        recipe = recipe.model_copy(update={"variants": [recipe.variants[i] for i in variants]})
    return only_formats(recipe, formats) if formats else recipe


def only_formats(recipe: Recipe, formats: tuple[str, ...] | list[str]) -> Recipe:
    """The recipe restricted to some formats (one GitHub Actions matrix job per format)."""
    wanted = {f.lower() for f in formats}
    kept = [v for v in recipe.variants if v.format in wanted]
    if not kept:
        raise RecipeError(
            f"the recipe has no variant of {', '.join(sorted(wanted))}",
            key="format",
            allowed=sorted({v.format for v in recipe.variants}),
        )
    return recipe.model_copy(update={"variants": kept})
