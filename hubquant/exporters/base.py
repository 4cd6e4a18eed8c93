"""The exporter interface, the runner interface, and the mechanics every format shares.

An exporter is one class per format and the *only* place that knows that format. Its class
attributes declare, before any work, its precisions (native names) and how the generic
``int4/int8/fp16/fp32`` words map onto them, its options (a pydantic model that forbids unknown
keys), the pip extra and modules it needs, and what the Hub and the cards need to know: the Hub's
``library_name``, a display name, the repo name template and layout. Its methods give the card's
run snippets, the variant labels and bits per weight, the full-precision form its runtime is
measured against (the fidelity floor), the export and the runner.

Formats are registered through the ``hubquant.exporters`` entry-point group (see
:mod:`hubquant.exporters`); :func:`register_exporter` validates a declaration and refuses
duplicates. Shared mechanics live here once: the per-variant loop with timing and error capture
(:meth:`Exporter.export`), intermediates shared by several variants and deleted when no remaining
variant needs them (:class:`Intermediates`), and one speed measurement for every runtime
(:meth:`Runner.measure_speed`) over two primitives each runtime implements.

Heavy libraries are imported inside the methods that need them, never at module level.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from hubquant.errors import HubquantError, MissingDependencyError, RecipeError, RegistryError
from hubquant.exporters.jobs import ExportJob, Intermediates
from hubquant.exporters.runner import Runner, Speed

__all__ = [
    "GENERIC_PRECISIONS",
    "ExportJob",
    "Exporter",
    "ExporterOptions",
    "Intermediates",
    "Progress",
    "RepoLayout",
    "Runner",
    "Speed",
    "register_exporter",
    "registry",
    "unregister_exporter",
]

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.repos import RepoPlan
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: The cross-format vocabulary every exporter maps onto its native precision names.
GENERIC_PRECISIONS = ("int4", "int8", "fp16", "fp32")
#: Receives one human-readable line per step (``"gguf Q4_K_M: quantizing"``); the CLI prints it.
Progress = Callable[[str], None]
#: How a format's variants are laid out on the Hub:
#: ``files`` — one repo, every variant's files at its root (GGUF);
#: ``folders`` — one repo, a folder per variant (ONNX);
#: ``repo-per-variant`` — a repo per variant, its files at the root (OpenVINO, MLX).
RepoLayout = Literal["files", "folders", "repo-per-variant"]


class ExporterOptions(BaseModel):
    """Base of every exporter's options: unknown keys are errors, values are checked by type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- exporters ------------------------------------------------------------------------------------
_BITS = re.compile(r"(\d+)")


class Exporter(ABC):
    """Base class of every format: declare the class attributes, implement :meth:`export_one`
    (or :meth:`export` when all variants are built in one go) and :meth:`runner`."""

    #: Format id used in recipes and on the CLI (``gguf``).
    name: ClassVar[str]
    #: What a user sees in ``hubquant formats``.
    description: ClassVar[str]
    #: The pip extra that installs this format's libraries.
    extra: ClassVar[str]
    #: Modules that must be importable to export and run this format.
    required_modules: ClassVar[tuple[str, ...]] = ()
    #: Native precision name → one-line description.
    precisions: ClassVar[dict[str, str]]
    #: Generic precision (int4/int8/fp16/fp32) → native precision name.
    generic_precisions: ClassVar[dict[str, str]]
    #: Native precisions that are not quantized, most faithful first.
    full_precisions: ClassVar[tuple[str, ...]] = ()
    #: The pydantic model of this format's options.
    Options: ClassVar[type[ExporterOptions]] = ExporterOptions
    #: Distributions whose versions shape this format's bytes (recorded and part of the cache key).
    tool_distributions: ClassVar[tuple[str, ...]] = ()
    #: Bump when hubquant's own part of building this format changes its bytes (part of the cache key).
    build_version: ClassVar[int] = 1
    #: Temporary disk an export needs, as a share of the source's weight bytes (the GGUF F16 file,
    #: the OpenVINO full-precision IR: 1.0). Formats needing more are built first, before the
    #: finished variants of the others fill the disk, which lowers a multi-format run's peak.
    scratch_share: ClassVar[float] = 0.0
    #: The tool writes every file into the variant's folder front to back and never goes back: the
    #: files are hashed while they are written (:mod:`hubquant.follow`; intermediates in the work
    #: folder are not followed). Leave False when the writer patches what it wrote (llama.cpp's
    #: quantizer rewrites the GGUF header last) — the check would catch it, the work would be lost.
    writes_in_order: ClassVar[bool] = False
    #: The Hub's ``library_name`` for this format (``gguf``, ``onnxruntime-genai`` …).
    library_name: ClassVar[str]
    #: How cards name the format (``GGUF (llama.cpp)``).
    display_name: ClassVar[str]
    #: Repo name template; fields: model, format, precision, variant.
    repo_template: ClassVar[str]
    #: How variants are laid out on the Hub (see :data:`RepoLayout`).
    repo_layout: ClassVar[RepoLayout]
    #: Memory to load and run the floor precision, per parameter (bytes; measured at Phi-3.5-mini size).
    floor_bytes_per_parameter: ClassVar[float] = 4.0
    #: Marker of this format in the size-versus-quality chart (a matplotlib marker).
    plot_marker: ClassVar[str] = "o"

    # -- validation (cheap, no heavy imports) ----------------------------------------------------
    @classmethod
    def resolve_precision(cls, precision: str) -> str:
        """Map a generic or native precision (case-insensitive) to the native name.

        Raises:
            RecipeError: the format does not offer this precision.
        """
        wanted = precision.strip()
        if wanted.lower() in cls.generic_precisions:
            return cls.generic_precisions[wanted.lower()]
        by_upper = {name.upper(): name for name in cls.precisions}
        if wanted.upper() in by_upper:
            return by_upper[wanted.upper()]
        allowed = list(cls.generic_precisions) + list(cls.precisions)
        raise RecipeError(f"format '{cls.name}' has no precision '{precision}'", key="precision", allowed=allowed)

    @classmethod
    def validate_options(cls, options: dict[str, Any], *, precision: str) -> dict[str, Any]:
        """Check options against :attr:`Options` and the precision; return them with defaults filled in.

        Raises:
            RecipeError: an unknown option, a bad value, or a combination that cannot work.
        """
        try:
            parsed = cls.Options.model_validate(options)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(p) for p in error["loc"]) or "options"
            if error["type"] == "extra_forbidden":
                raise RecipeError(
                    f"format '{cls.name}' has no option '{key}'",
                    key=f"options.{key}",
                    allowed=list(cls.Options.model_fields),
                ) from None
            raise RecipeError(
                f"option '{key}' of format '{cls.name}': {error['msg']} (got {error.get('input')!r})",
                key=f"options.{key}",
                hint=f"see 'hubquant formats' for the options of {cls.name}",
            ) from None
        cls.check_combination(precision, parsed)
        return parsed.model_dump(mode="json")

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        """Reject precision/option combinations the tools cannot run (override per format)."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``hubquant formats`` prints: precisions, generic mapping, options with defaults."""
        options = []
        for name, info in cls.Options.model_fields.items():
            default = info.get_default(call_default_factory=True)
            options.append({"name": name, "default": default, "help": info.description or ""})
        return {
            "format": cls.name,
            "description": cls.description,
            "extra": cls.extra,
            "generic_precisions": dict(cls.generic_precisions),
            "precisions": dict(cls.precisions),
            "options": options,
        }

    def folder_name(self, source: SourceModel, precision: str, options: dict[str, Any]) -> str:
        """The artifact folder name for a variant (unique per spec within one output folder)."""
        return f"{self.name}-{precision}"

    # -- what cards, repos and the evaluation ask ------------------------------------------------
    @classmethod
    def bits(cls, precision: str) -> float:
        """Nominal bits per weight of a precision (for device advice): 16 for fp16, 4 for Q4_K_M."""
        text = precision.lower()
        if "32" in text and ("f" in text or "fp" in text):
            return 32
        if any(t in text for t in ("fp16", "f16", "bf16")):
            return 16
        match = _BITS.search(text.replace("_k", ""))
        return int(match.group(1)) if match else 16

    @classmethod
    def variant_label(cls, precision: str, options: dict[str, Any]) -> str:
        """How tables name a variant (``Q4_K_M``); formats add what distinguishes their variants."""
        return precision

    @classmethod
    def variant_notes(cls, artifact: Artifact) -> list[str]:
        """What a card says under the table about one variant beyond its name: how it was made (per-tensor
        choices, calibration data, split files), read from its manifest's ``settings``."""
        return []

    @classmethod
    def repo_variant(cls, folder: str) -> str:
        """The ``{variant}`` field of repo names and the variant's folder in a shared repo."""
        prefix = cls.name + "-"
        return folder[len(prefix) :] if folder.startswith(prefix) else folder

    @classmethod
    def floor_precision(cls, source: SourceModel) -> str | None:
        """The full precision to build when a run has none, to measure the runtime's own deviation
        from the reference (the fidelity floor); None when this format cannot offer one."""
        return cls.full_precisions[-1] if cls.full_precisions else None

    @classmethod
    def floor_options(cls, options: dict[str, Any], *, precision: str) -> dict[str, Any]:
        """A variant's options as they apply to ``precision`` (its runtime settings; quantization
        options dropped): the floor a variant is compared with runs the way the variant does."""
        kept = dict(options)
        for _ in range(len(kept) + 1):
            try:
                return cls.validate_options(kept, precision=precision)
            except RecipeError as exc:
                key = (exc.key or "").removeprefix("options.")
                if key not in kept:
                    break
                del kept[key]
        return cls.validate_options({}, precision=precision)

    @classmethod
    def deviation_causes(cls, source: SourceModel, options: dict[str, Any]) -> list[str]:
        """Known reasons this runtime computes ``source`` differently from the reference (for findings)."""
        return []

    @classmethod
    def snippets(cls, plan: RepoPlan) -> str:
        """Copy-paste commands per runtime for a repo of this format (Markdown)."""
        return f"Load the files with {cls.display_name}."

    # -- heavy work -----------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        """Raise MissingDependencyError when this format's libraries are missing."""
        try:
            missing = [m for m in cls.required_modules if importlib.util.find_spec(m) is None]
        except (ImportError, ValueError) as exc:  # a parent package that fails to import
            missing = [str(exc)]
        if missing:
            raise MissingDependencyError(
                f"the {cls.name} exporter needs {', '.join(missing)}, which is not installed", extra=cls.extra
            )

    #: Vision architectures this format carries with their picture encoder (see :mod:`hubquant.vision`).
    vision_architectures: ClassVar[tuple[str, ...]] = ()
    #: The picture encoder the format's floor reads pictures with (its most faithful).
    floor_projector: ClassVar[str | None] = None

    @classmethod
    def refusal(cls, source: SourceModel) -> HubquantError | None:
        """Why this format cannot build the source (a variant then fails with it), or None when it can."""
        if source.is_vision and source.architecture not in cls.vision_architectures:
            from hubquant.vision import format_refusal

            carriers = [name for name, kind in registry().items() if source.architecture in kind.vision_architectures]
            return format_refusal(cls.name, source.name, source.architecture, carriers)
        return None

    @classmethod
    def image_projectors(cls, artifact: Artifact) -> list[str]:
        """The picture encoders a vision artifact ships, most faithful first (none: it reads no pictures)."""
        return []

    def image_reader(self, artifact: Artifact, projector: str) -> Any:
        """What reads a picture and a prompt with one of :meth:`image_projectors` (``answer_logits``, ``close``)."""
        raise NotImplementedError(f"{self.name} reads no pictures")

    @classmethod
    def worker_python(cls, artifact: Artifact) -> str | None:
        """The Python the evaluation worker measures the artifact with, where its runtime cannot be imported
        beside hubquant's packages (None: hubquant's own)."""
        return None

    @classmethod
    def check_runnable(cls, artifact: Artifact) -> None:
        """Raise when this machine cannot run the artifact (e.g. built for a GPU target)."""

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        """Versions of every tool that shapes this format's bytes (part of the cache key)."""
        import importlib.metadata

        versions = {f"hubquant-{cls.name}-build": str(cls.build_version)}
        for dist in cls.tool_distributions:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "missing"
        return versions

    def order_jobs(self, jobs: list[ExportJob]) -> list[ExportJob]:
        """The order variants are built in (override when one variant can serve later ones)."""
        return list(jobs)

    def export(
        self, source: SourceModel, jobs: list[ExportJob], *, work_dir: Path, progress: Progress
    ) -> dict[str, BaseException | None]:
        """Build every job's files into ``job.folder``; return, per job name, None or the error.

        All variants of one format come in one call so intermediates are built once. The default
        loops over :meth:`export_one` with the timing, error capture and clean-up every format
        shares; one failing variant never stops the others. ``work_dir`` is removed afterwards.
        """
        self.check_installed()
        ordered = self.order_jobs(jobs)
        shared = Intermediates(work_dir, ordered)
        results: dict[str, BaseException | None] = {}
        for index, job in enumerate(ordered):
            started = time.perf_counter()
            try:
                self.export_one(source, job, shared=shared, progress=progress)
                results[job.name] = None
            except Exception as exc:  # noqa: BLE001 - recorded per variant; Ctrl-C passes through
                results[job.name] = exc
            job.seconds = time.perf_counter() - started - shared.building_seconds.get(job.name, 0.0)
            shared.release(ordered[index + 1 :])
        return results

    def export_one(self, source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress) -> None:
        """Build one variant into ``job.folder`` (raise on failure); ``shared`` holds intermediates."""
        raise NotImplementedError(f"{type(self).__name__} implements neither export_one() nor export()")

    @abstractmethod
    def runner(self, artifact: Artifact, *, context_length: int) -> Runner:
        """Load an artifact for evaluation."""


_REGISTRY: dict[str, type[Exporter]] = {}
_DECLARED = (
    "name",
    "description",
    "extra",
    "precisions",
    "generic_precisions",
    "library_name",
    "display_name",
    "repo_template",
    "repo_layout",
)


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Validate an exporter's declaration and register it (also usable as a class decorator).

    Raises:
        RegistryError: not an Exporter, missing attributes or methods, a generic precision mapped to
            an unknown native one, options that are not an ``ExporterOptions`` model, a bad repo
            layout or template, or a name already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Exporter)):
        raise RegistryError(f"{cls!r} is not an Exporter subclass")
    for attribute in _DECLARED:
        if not getattr(cls, attribute, None):
            raise RegistryError(f"exporter {cls.__name__} does not declare '{attribute}'")
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise RegistryError(f"exporter {cls.__name__} does not implement {', '.join(missing)}")
    if cls.export is Exporter.export and cls.export_one is Exporter.export_one:
        raise RegistryError(f"exporter {cls.__name__} implements neither export_one() nor export()")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RegistryError(f"format '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    missing_generic = sorted(set(GENERIC_PRECISIONS) - set(cls.generic_precisions))
    if missing_generic:
        raise RegistryError(f"exporter {cls.__name__} does not map the generic precisions {missing_generic}")
    unknown = sorted(v for v in (*cls.generic_precisions.values(), *cls.full_precisions) if v not in cls.precisions)
    if unknown:
        raise RegistryError(f"exporter {cls.__name__} maps generic or full precisions to unknown ones: {unknown}")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, ExporterOptions)):
        raise RegistryError(f"exporter {cls.__name__}.Options must subclass ExporterOptions")
    if cls.repo_layout not in ("files", "folders", "repo-per-variant"):
        raise RegistryError(f"exporter {cls.__name__}.repo_layout must be files, folders or repo-per-variant")
    try:
        cls.repo_template.format(model="m", format="f", precision="p", variant="v")
    except (KeyError, IndexError) as exc:
        raise RegistryError(f"exporter {cls.__name__}.repo_template uses an unknown field {exc}") from None
    _REGISTRY[cls.name] = cls
    return cls


def unregister_exporter(name: str) -> None:
    """Remove a format from the registry (tests and plugins that replace a built-in)."""
    _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Exporter]]:
    """The registry as it stands (plugins are loaded by :func:`hubquant.exporters.registered_exporters`)."""
    return _REGISTRY
