"""Which variants go to which Hub repo, and where in it (planning only; nothing is uploaded here).

Each format's exporter says how its ecosystem lays repos out (:attr:`Exporter.repo_template`,
:attr:`Exporter.repo_layout`): GGUF puts every quant file at the root of one ``{model}-GGUF``
repo, ONNX gives each variant a folder of one ``{model}-onnx`` repo, OpenVINO and MLX give each
variant a repo of its own. Templates can be overridden per format, or one ``repo_id`` given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import RecipeError
from hubquant.records import EVAL_FILE, MANIFEST, Evaluation, Manifest

if TYPE_CHECKING:
    from hubquant.artifact import Artifact

#: Files of an artifact folder that describe it rather than run it: published under ``hubquant/``.
RECORD_FILES = (MANIFEST, EVAL_FILE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def default_templates() -> dict[str, str]:
    """Repo name template of every registered format."""
    from hubquant.exporters import registered_exporters

    return {name: cls.repo_template for name, cls in registered_exporters().items()}


@dataclass
class VariantFiles:
    artifact: Artifact
    location: str  # the file (layout "files") or folder in the repo, "." for a repo of its own
    files: list[tuple[Path, str]]  # local path → path in repo

    @property
    def format(self) -> str:
        return self.artifact.format

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def folder(self) -> str:
        return self.artifact.path.name

    @property
    def label(self) -> str:
        """The variant's name within its format: its folder without the format prefix
        (``Q4_K_M-imatrix``, ``cpu-int4-rtn-block-32-acc-level-4``)."""
        prefix = self.format + "-"
        return self.folder[len(prefix) :] if self.folder.startswith(prefix) else self.folder

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def evaluation(self) -> Evaluation | None:
        return self.artifact.evaluation()


@dataclass
class RepoPlan:
    repo_id: str
    format: str
    variants: list[VariantFiles]
    endpoint: str
    #: Files made for the repo (card, chart, records): path in repo → bytes.
    generated: dict[str, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.repo_id}"

    def all_files(self) -> list[tuple[str, Path | bytes]]:
        """Every (path in repo, content) of the commit, sorted by path."""
        items: dict[str, Path | bytes] = {}
        for variant in self.variants:
            for local, remote in variant.files:
                items[remote] = local
        items.update(self.generated)
        return sorted(items.items())

    def commit_message(self) -> str:
        return f"hubquant: {', '.join(v.label for v in self.variants)}"


def _repo_id(artifact: Artifact, *, namespace: str, template: str) -> str:
    from hubquant.exporters import get_exporter

    fields = {
        "model": artifact.manifest.source.name,
        "format": artifact.format,
        "precision": artifact.precision,
        "variant": get_exporter(artifact.format).repo_variant(artifact.path.name),
    }
    try:
        return f"{namespace}/{template.format(**fields)}"
    except (KeyError, IndexError) as exc:
        raise RecipeError(
            f"repo name template '{template}' uses an unknown field {exc}", key="repo_name", allowed=sorted(fields)
        ) from None


def _lay_out(plan: RepoPlan) -> None:
    """Where each variant's files go in its repo, by its format's layout."""
    from hubquant.exporters import get_exporter

    layout = get_exporter(plan.format).repo_layout
    for variant in plan.variants:
        folder = variant.artifact.path
        runnable = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.name not in RECORD_FILES and not p.name.startswith(".")
        )
        if layout == "files":
            variant.files = [(p, p.relative_to(folder).as_posix()) for p in runnable]
            models = [entry.path for entry in variant.artifact.model_files] or [r for _, r in variant.files]
            variant.location = min(models) if models else variant.folder  # a split model: its first shard
        elif layout == "folders" or len(plan.variants) > 1:
            variant.location = variant.label
            variant.files = [(p, f"{variant.label}/{p.relative_to(folder).as_posix()}") for p in runnable]
        else:
            variant.location = "."
            variant.files = [(p, p.relative_to(folder).as_posix()) for p in runnable]
    # Two variants may carry the very same file (one importance matrix for several GGUF types): it is
    # uploaded once. Different contents at one path would lose one of them.
    seen: dict[str, tuple[str, str | None]] = {}  # repo path → (the variant writing it, its sha256)
    for variant in plan.variants:
        by_path = {entry.path: entry.sha256 for entry in variant.manifest.files}
        for local, remote in variant.files:
            digest = by_path.get(local.relative_to(variant.artifact.path).as_posix())
            owner, owner_digest = seen.setdefault(remote, (variant.folder, digest))
            if owner != variant.folder and (digest is None or digest != owner_digest):
                raise RecipeError(
                    f"{owner} and {variant.folder} would both write {remote} in {plan.repo_id}",
                    key="artifacts",
                    hint="publish them to different repos",
                )


def plan_repos(
    artifacts: list[Artifact],
    *,
    namespace: str,
    templates: dict[str, str] | None = None,
    repo_id: str | None = None,
    endpoint: str | None = None,
) -> list[RepoPlan]:
    """Group artifacts into repos by the ecosystem conventions (or ``repo_id`` for all of them).

    Raises:
        RecipeError: a template names an unknown field, artifacts of several sources, two
            variants that would write the same file, or ``repo_id`` for several formats.
    """
    from hubquant.exporters import get_exporter

    if not artifacts:
        raise RecipeError(
            "nothing to publish", key="artifacts", hint="pass artifact folders written by 'hubquant quantize'"
        )
    if len({a.manifest.source.fingerprint for a in artifacts}) > 1:
        raise RecipeError(
            "the artifacts come from different source models",
            key="artifacts",
            hint="publish one source model at a time",
        )
    endpoint = endpoint or hub_endpoint()
    plans: dict[str, RepoPlan] = {}
    for artifact in artifacts:
        fmt = artifact.format
        template = (templates or {}).get(fmt) or get_exporter(fmt).repo_template
        target = repo_id or _repo_id(artifact, namespace=namespace, template=template)
        plan = plans.setdefault(target, RepoPlan(repo_id=target, format=fmt, variants=[], endpoint=endpoint))
        if plan.format != fmt:
            raise RecipeError(
                f"repo {target} would mix {plan.format} and {fmt} variants",
                key="repo_id",
                hint="publish one format per repo (leave --repo-id out to use the conventions)",
            )
        plan.variants.append(VariantFiles(artifact=artifact, location="", files=[]))
    for plan in plans.values():
        _lay_out(plan)
    return list(plans.values())


def public_source(manifest: Manifest) -> dict[str, Any]:
    """The source facts a published file may carry (no local path)."""
    return manifest.public().source.model_dump(mode="json", exclude={"path"})
