"""What a run will cost before it starts: per variant, peak memory, peak extra disk and a time class.

Every figure is a formula over facts of the source read from its safetensors headers (no weight is
read), and over the variant's own size:

- ``W``: the weights at 16 bits each (bytes; a float32 checkpoint counts half its bytes),
- ``T``: the largest tensor at 16 bits (the embedding or the LM head: what a streaming tool holds),
- ``O``: the variant's size on disk, ``W × bits / 16 × overhead`` (GGUF: llama-quantize's stated bits
  per weight; the overhead is each format's group scales and the tensors it keeps wider, measured at
  int4 and applied to every quantized precision).

| format | anonymous memory (must fit in RAM) | mapped (RSS on top) | extra disk | wall, 2 cores |
|---|---|---|---|---|
| gguf | 0.21 GiB + 3 T (the converter's and the quantizer's buffers) | 0.02 W | F16 file W + O | 28 s/GB |
| onnx | 0.98 GiB + 2.4 T (the builder's float32 embeddings) | 0.30 W | 0.35 W + O | 15 s/GB |
| onnx, head left to builder | 0.5 GiB + 2.2 O (its graph, serialised again) | 0.35 W | 0.35 W + O | 13 s/GB |
| openvino | 0.25 GiB + O (the compressed weights) | W (the export, the IR) | IR W + O | 10 s/GB |
| mlx | 1.25 GiB + 0.8 O (the quantized model, written shard by shard) | 0.02 W | O | 4.3 s/GB |

Mapped weights stay resident only as far as the machine's memory allows, so the RSS estimate is
capped at its size.

The coefficients (:data:`COSTS`) are fitted to ``benchmarks/scale.py`` runs at the Phi-3.5-mini (7.6 GB)
and Phi-4 (29 GB) shapes kept in ``benchmarks/results/``; ``tests/test_planner.py`` recomputes every
estimate for those shapes and checks it against the measured peaks within 25% (ONNX at Phi-4 passed
20 GiB and was stopped there before hubquant prequantized the LM head; that fit is kept for models
whose LM head the builder quantizes itself: tied embeddings). Anonymous memory is
what decides whether a variant can be built: mapped weights can be dropped and read again (slower).
``quantize`` and ``publish`` refuse up front (:func:`check_memory`) a variant whose anonymous memory
exceeds what the system can give; ``HUBQUANT_SKIP_MEMORY_CHECK=1`` skips that check.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.display import count, human_size
from hubquant.errors import HubquantError

if TYPE_CHECKING:
    from hubquant.recipe import RunnerSpec, VariantSpec
    from hubquant.source import SourceModel

GIB = 2**30
SKIP_MEMORY_ENV = "HUBQUANT_SKIP_MEMORY_CHECK"
#: Headroom the preflight keeps above a variant's estimate (a share of it).
MEMORY_MARGIN = 0.1
#: Cores of the machine the seconds were measured on (benchmarks/results: 2 cores).
MEASURED_CORES = 2
#: Time classes, by estimated wall seconds (upper bounds).
TIME_CLASSES = ((600, "minutes"), (3600, "under an hour"), (4 * 3600, "hours"), (float("inf"), "many hours"))


class ResourceError(HubquantError):
    """The machine cannot hold what a run needs (estimated before any work)."""


@dataclass(frozen=True)
class Shape:
    """The facts of a source the estimates use (see the module text)."""

    parameters: int
    weight_bytes: int
    largest_tensor_bytes: int
    #: the checkpoint has an LM head of its own (``lm_head.weight``), not the tied embeddings
    own_lm_head: bool = True

    @classmethod
    def from_headers(cls, headers: Iterable[Mapping[str, Any]]) -> Shape:
        """From safetensors headers (``{name: {"shape": [...], ...}}``), every tensor counted at 16 bits."""
        from hubquant.source import header_tensors

        headers = list(headers)
        parameters = largest = 0
        for _, numel in header_tensors(headers):
            parameters += numel
            largest = max(largest, numel)
        return cls(
            parameters=parameters,
            weight_bytes=2 * parameters,
            largest_tensor_bytes=2 * largest,
            own_lm_head=any("lm_head.weight" in header for header in headers),
        )

    @classmethod
    def of_source(cls, source: SourceModel) -> Shape:
        from hubquant.source import safetensors_header

        shape = cls.from_headers(safetensors_header(source.path / name) for name in source.weight_files)
        if source.config.get("tie_word_embeddings"):
            # the LM head is the embedding matrix, whatever else the files hold
            shape = dataclasses.replace(shape, own_lm_head=False)
        return shape

    def describe(self) -> str:
        return f"{count(self.parameters)} parameters, {human_size(self.weight_bytes)} at 16 bits"


@dataclass(frozen=True)
class Cost:
    """One format's measured behaviour (bytes per byte of W, T or O; see the module text)."""

    base_gib: float  # the process with its libraries imported, before any weight
    per_weight: float  # anonymous, × W
    per_tensor: float  # anonymous, × T
    per_output: float  # anonymous, × O
    mapped_per_weight: float  # file-backed RSS, × W (mmapped checkpoint or IR)
    seconds_per_gb: float  # wall seconds per GB of W on MEASURED_CORES cores
    overhead: float  # on-disk size of a quantized variant over its nominal bits


#: Fitted to benchmarks/results/scale-phi-3.5-mini-*.json and scale-phi-4-*.json (see the module text).
COSTS: dict[str, Cost] = {
    "gguf": Cost(0.21, 0.0, 2.98, 0.0, 0.02, 28.0, 1.09),
    "onnx": Cost(0.98, 0.0, 2.4, 0.0, 0.30, 15.0, 1.46),
    "openvino": Cost(0.25, 0.0, 0.0, 1.0, 1.0, 10.0, 1.08),
    "mlx": Cost(1.25, 0.0, 0.0, 0.8, 0.02, 4.3, 1.13),
}


#: ONNX when the builder's own quantizer pass serialises its whole graph again: the LM head is left for
#: the builder to quantize (tied to the embeddings, or shared embeddings). Fitted to the runs before
#: hubquant prequantized the LM head (5.63 GiB at Phi-3.5-mini; Phi-4 passed 20 GiB).
ONNX_FULL_PASS = Cost(0.5, 0.0, 0.0, 2.2, 0.35, 13.0, 1.46)


def onnx_full_pass(shape: Shape, spec: VariantSpec) -> bool:
    """Whether an ONNX variant's builder runs its whole-graph quantizer pass (see
    :mod:`hubquant.exporters.onnx_lean`): only when it must quantize the LM head itself."""
    if spec.format != "onnx" or spec.precision not in ("int4", "int8"):
        return False
    from hubquant.exporters.onnx import ONNXExporter

    return ONNXExporter.builder_quantizes_lm_head(dict(spec.options or {}), shape.own_lm_head)


@dataclass(frozen=True)
class VariantEstimate:
    """One variant's estimated cost."""

    label: str
    format: str
    memory: int  # peak anonymous bytes
    rss: int  # peak RSS: anonymous plus mapped weights
    output: int  # the variant on disk
    scratch: int  # its format's largest intermediate
    seconds: float

    @property
    def disk(self) -> int:
        """Peak extra disk of building this variant alone: its intermediate and itself."""
        return self.output + self.scratch

    @property
    def time_class(self) -> str:
        return next(name for bound, name in TIME_CLASSES if self.seconds < bound)


def output_bytes(weight_bytes: int, fmt: str, precision: str) -> int:
    """A variant's size on disk, from the source's 16-bit weight bytes (see the module text)."""
    from hubquant.exporters import get_exporter

    exporter = get_exporter(fmt)
    if fmt == "gguf":
        from hubquant.exporters.gguf import GGUFExporter

        bits = GGUFExporter.bits_per_weight(precision)
    else:
        bits = exporter.bits(precision)
    cost = COSTS.get(fmt)
    overhead = cost.overhead if cost and bits < 16 else 1.0
    return int(weight_bytes * bits / 16 * overhead)


def meminfo(field: str) -> int | None:
    """One ``/proc/meminfo`` figure in bytes (``MemTotal``, ``MemAvailable``), None where it is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def physical_memory() -> int | None:
    """The machine's memory (``MemTotal``), None where /proc/meminfo is absent."""
    return meminfo("MemTotal")


def estimate(
    shape: Shape, spec: VariantSpec, *, cores: int | None = None, memory_total: int | None = None
) -> VariantEstimate | None:
    """The variant's cost, or None for a format without measured figures (a plugin's).

    Mapped weights stay resident only as far as the machine's memory (``memory_total``, default
    this machine's) allows: beyond it the kernel drops pages and reads them again, so the RSS
    estimate is capped there (the OpenVINO export of Phi-4's 29 GB held 22 GiB on 24)."""
    cost = ONNX_FULL_PASS if onnx_full_pass(shape, spec) else COSTS.get(spec.format)
    if cost is None:
        return None
    from hubquant.exporters import get_exporter

    out = output_bytes(shape.weight_bytes, spec.format, spec.precision)
    w, t = shape.weight_bytes, shape.largest_tensor_bytes
    anon = cost.base_gib * GIB + cost.per_weight * w + cost.per_tensor * t + cost.per_output * out
    speedup = max(0.25, min(2.0, MEASURED_CORES / (cores or os.cpu_count() or MEASURED_CORES)))
    with_mapped, limit = anon + cost.mapped_per_weight * w, memory_total or physical_memory()
    return VariantEstimate(
        label=spec.label,
        format=spec.format,
        memory=int(anon),
        rss=int(min(with_mapped, max(anon, limit)) if limit else with_mapped),
        output=out,
        scratch=int(get_exporter(spec.format).scratch_share * w),
        seconds=cost.seconds_per_gb * w / 1e9 * speedup,
    )


@dataclass(frozen=True)
class RunEstimate:
    """A run's variants, built one after another: memory peaks at the largest variant, disk as
    :func:`hubquant.preflight.plan_disk` orders the formats, time adds up."""

    shape: Shape
    variants: list[VariantEstimate]
    disk: int

    @property
    def memory(self) -> int:
        return max((v.memory for v in self.variants), default=0)

    @property
    def rss(self) -> int:
        return max((v.rss for v in self.variants), default=0)

    @property
    def seconds(self) -> float:
        return sum(v.seconds for v in self.variants)

    @property
    def time_class(self) -> str:
        return next(name for bound, name in TIME_CLASSES if self.seconds < bound)


def build_order(formats: Iterable[str]) -> list[str]:
    """The order the pipeline builds formats in: the largest intermediates first, before the finished
    variants of the others fill the disk (see :mod:`hubquant.preflight`)."""
    from hubquant.exporters import get_exporter

    return sorted(formats, key=lambda fmt: -get_exporter(fmt).scratch_share)


def estimate_run(shape: Shape, specs: list[VariantSpec], *, cores: int | None = None) -> RunEstimate:
    """Every variant's estimate and the run's peak disk (formats with the largest intermediates first)."""
    found = [e for e in (estimate(shape, spec, cores=cores) for spec in specs) if e is not None]
    groups = []
    for fmt in build_order({e.format for e in found}):
        of_format = [e for e in found if e.format == fmt]
        groups.append((sum(e.output for e in of_format), max(e.scratch for e in of_format)))
    return RunEstimate(shape=shape, variants=found, disk=peak_disk(groups).together)


@dataclass(frozen=True)
class DiskPeaks:
    together: int  # outputs and intermediates on one filesystem
    outputs: int  # every output (the output folder's peak when intermediates go elsewhere)
    scratch: int  # the largest intermediate (the scratch folder's peak)


def peak_disk(groups: Iterable[tuple[int, int]]) -> DiskPeaks:
    """The peaks of building formats one after another, given in build order as (their outputs, their
    largest intermediate): each format's intermediate sits beside every output written before it."""
    done = together = scratch = 0
    for outputs, temporary in groups:
        together = max(together, done + outputs + temporary)
        scratch = max(scratch, temporary)
        done += outputs
    return DiskPeaks(together=together, outputs=done, scratch=scratch)


def check_memory(run: RunEstimate, available: int | None) -> None:
    """Refuse a run with a variant whose anonymous memory, with :data:`MEMORY_MARGIN` on top, exceeds
    ``available`` (bytes; None: unknown): the estimates are fitted within 10%, and a run that reaches
    the last free page meets the OOM killer, not a clean error.

    Raises:
        ResourceError: naming the variants that cannot fit, their estimate and what is available.
    """
    if available is None or os.environ.get(SKIP_MEMORY_ENV) == "1":
        return
    too_big = [v for v in run.variants if v.memory * (1 + MEMORY_MARGIN) > available]
    if not too_big:
        return
    named = ", ".join(f"{v.label} about {human_size(v.memory)}" for v in too_big)
    others = sorted({v.format for v in run.variants} - {v.format for v in too_big})
    raise ResourceError(
        f"not enough memory for this run: building {named.replace(' about', ' needs about', 1)} at its peak, "
        f"{human_size(available)} is available (estimated for {run.shape.describe()}; `hubquant plan` shows "
        "every variant's figures)",
        hint=f"run it on a machine with at least {human_size(max(v.memory for v in too_big) * (1 + MEMORY_MARGIN))} "
        "available (the estimate plus a 10% margin; in the publish workflow, a larger runner from the recipe's "
        "`runners`), "
        + (f"build only {', '.join(others)} here (--format), " if others else "")
        + f"or set {SKIP_MEMORY_ENV}=1 to try anyway",
    )


def choose_runner(estimate: VariantEstimate | RunEstimate, runners: Mapping[str, RunnerSpec], source_bytes: int) -> str:
    """The first runner (in the recipe's order, ``default`` first) whose memory and disk hold the job:
    its largest variant's memory (with :data:`MEMORY_MARGIN`), and the downloaded source plus the job's
    peak disk. None fits: the
    runner with the most memory (the job will say what it lacks)."""
    need_disk = source_bytes + estimate.disk
    ordered = sorted(runners.items(), key=lambda item: item[0] != "default")
    for _, runner in ordered:
        if estimate.memory * (1 + MEMORY_MARGIN) <= runner.memory_gb * 1e9 and need_disk <= runner.disk_gb * 1e9:
            return runner.label
    return max(ordered, key=lambda item: (item[1].memory_gb, item[1].disk_gb))[1].label


def source_shape(source_id: str, revision: str | None = None) -> Shape:
    """The shape of a local checkpoint (its headers) or of a Hub model (its safetensors headers, fetched
    without the weights: a few kB per file).

    Raises:
        SourceError: the folder is not a usable checkpoint, or the Hub cannot say.
    """

    from hubquant.errors import SourceError
    from hubquant.source import HUB_ID_PATTERN, resolve_source

    if Path(source_id).exists() or not HUB_ID_PATTERN.match(source_id):
        return Shape.of_source(resolve_source(source_id))
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError

    try:
        metadata = HfApi().get_safetensors_metadata(source_id, revision=revision)
    except (HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError, OSError, ValueError) as exc:
        raise SourceError(
            f"could not read the safetensors headers of {source_id} from the Hub ({type(exc).__name__})",
            hint="check the model id, the revision and HF_TOKEN for a gated model; or plan from a local copy",
        ) from None
    return Shape.from_headers(
        {name: {"shape": info.shape} for name, info in file.tensors.items()}
        for file in metadata.files_metadata.values()
    )
