"""The exporter interface and its registry.

An exporter is one class per format that declares, as class attributes, everything hubquant must
know about that format before doing any work: its precisions (native names), how the generic
``int4/int8/fp16/fp32`` vocabulary maps onto them, its options (a pydantic model that forbids
unknown keys) and the pip extra that installs it. Classes are registered with
:func:`register_exporter`, which validates the declaration and refuses duplicates.

Heavy libraries are imported inside the methods that need them, never at module level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from hubquant.errors import RecipeError, RegistryError
from hubquant.recipe import GENERIC_PRECISIONS

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: Receives one human-readable line per step (``"gguf Q4_K_M: quantizing"``); the CLI prints it.
Progress = Callable[[str], None]


class ExporterOptions(BaseModel):
    """Base of every exporter's options: unknown keys are errors, values are checked by type."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ExportJob:
    """One variant to build: its resolved spec and the (temporary) folder to fill."""

    precision: str
    options: dict[str, Any]
    folder: Path
    warnings: list[str]
    #: Seconds this variant's own step took (the exporter fills it in).
    seconds: float = 0.0
    #: Seconds of shared steps it needed (an intermediate, an importance matrix), each counted once per variant.
    shared_seconds: float = 0.0
    #: What the tool was actually asked to do when it differs from the options (resolved defaults);
    #: written to the manifest as ``settings``.
    settings: dict[str, Any] | None = None


class Runner:
    """A loaded artifact that returns next-token logits for given token ids (for evaluation)."""

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Logits of shape ``[len(ids), vocab]``: row i scores the token after ``ids[: i + 1]``."""
        raise NotImplementedError

    def timed_generation(self, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
        """Process ``prompt`` then generate ``new_tokens`` greedily; return (prefill s, decode s)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the runtime's memory."""


class Exporter:
    """Base class of every format. Subclasses fill in the class attributes and :meth:`export`."""

    #: Format id used in recipes and on the CLI (``gguf``).
    name: ClassVar[str]
    #: What a user sees in ``hubquant formats``.
    description: ClassVar[str]
    #: The pip extra that installs this format's libraries.
    extra: ClassVar[str]
    #: Native precision name → one-line description.
    precisions: ClassVar[dict[str, str]]
    #: Generic precision (int4/int8/fp16/fp32) → native precision name.
    generic_precisions: ClassVar[dict[str, str]]
    #: The pydantic model of this format's options.
    Options: ClassVar[type[ExporterOptions]] = ExporterOptions
    #: Distributions whose versions shape this format's bytes (recorded and part of the cache key).
    tool_distributions: ClassVar[tuple[str, ...]] = ()
    #: Temporary disk an export needs, as a share of the source's weight bytes (the GGUF F16 file,
    #: the OpenVINO full-precision IR: 1.0). Formats needing more are built first, before the
    #: finished variants of the others fill the disk, which lowers a multi-format run's peak.
    scratch_share: ClassVar[float] = 0.0

    # -- validation (cheap, no heavy imports) --------------------------------------------------
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
        allowed = list(cls.Options.model_fields)
        try:
            parsed = cls.Options.model_validate(options)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = ".".join(str(p) for p in error["loc"]) or "options"
            if error["type"] == "extra_forbidden":
                raise RecipeError(f"format '{cls.name}' has no option '{key}'", key=f"options.{key}",
                                  allowed=allowed) from None
            raise RecipeError(f"option '{key}' of format '{cls.name}': {error['msg']} (got {error.get('input')!r})",
                              key=f"options.{key}", hint=f"see 'hubquant formats' for the options of {cls.name}") from None
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

    def folder_name(self, source: "SourceModel", precision: str, options: dict[str, Any]) -> str:
        """The artifact folder name for a variant (unique per spec within one output folder)."""
        return f"{self.name}-{precision}"

    # -- heavy work ----------------------------------------------------------------------------
    @classmethod
    def check_installed(cls) -> None:
        """Raise MissingDependencyError when this format's libraries are missing."""

    @classmethod
    def check_runnable(cls, artifact: "Artifact") -> None:
        """Raise when this machine cannot run the artifact (e.g. built for a GPU target)."""

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        """Versions of every tool that shapes this format's bytes (part of the cache key)."""
        import importlib.metadata

        versions = {}
        for dist in cls.tool_distributions:
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = "missing"
        return versions

    def export(self, source: "SourceModel", jobs: list[ExportJob], *, work_dir: Path,
               progress: Progress) -> dict[str, BaseException | None]:
        """Build every job's files into ``job.folder``.

        All variants of one format come in one call so intermediates (the GGUF F16 file, an
        importance matrix) are built once. ``work_dir`` is a scratch folder removed afterwards.
        Returns, per precision folder name, None on success or the exception that failed it —
        one failing variant must not stop the others.
        """
        raise NotImplementedError

    def runner(self, artifact: "Artifact", *, context_length: int) -> Runner:
        """Load an artifact for evaluation."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Exporter]] = {}


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Class decorator that validates an exporter's declaration and registers it.

    Raises:
        RegistryError: missing attributes, a generic precision mapped to an unknown native one,
            options that are not an ``ExporterOptions`` model, or a name already registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, Exporter)):
        raise RegistryError(f"{cls!r} is not an Exporter subclass")
    for attribute in ("name", "description", "extra", "precisions", "generic_precisions"):
        if not getattr(cls, attribute, None):
            raise RegistryError(f"exporter {cls.__name__} does not declare '{attribute}'")
    if cls.name in _REGISTRY:
        raise RegistryError(f"format '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    missing = sorted(set(GENERIC_PRECISIONS) - set(cls.generic_precisions))
    if missing:
        raise RegistryError(f"exporter {cls.__name__} does not map the generic precisions {missing}")
    unknown = sorted(v for v in cls.generic_precisions.values() if v not in cls.precisions)
    if unknown:
        raise RegistryError(f"exporter {cls.__name__} maps generic precisions to unknown ones: {unknown}")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, ExporterOptions)):
        raise RegistryError(f"exporter {cls.__name__}.Options must subclass ExporterOptions")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_exporter(name: str) -> None:
    """Remove a format from the registry (tests and plugins that replace a built-in)."""
    _REGISTRY.pop(name, None)


def registered_exporters() -> dict[str, type[Exporter]]:
    return dict(_REGISTRY)
