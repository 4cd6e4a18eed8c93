"""MLX through mlx-lm (``mlx_lm.convert``), runnable on Linux CPUs with ``mlx[cpu]``.

Correctness first: mlx-lm's ``phi3`` model reads only the top-level ``rope_theta``,
``partial_rotary_factor`` and ``rope_scaling`` (with a ``type`` key), while configs saved by
transformers 5 keep them under ``rope_parameters`` (with ``rope_type``). Converted as is, a
Phi-4-mini-style model (partial rotary, long-rope) computes wrong numbers without any error. The
exporter writes the keys mlx-lm reads into the *artifact's* ``config.json`` — never into the
user's source folder.

A limit that remains: mlx-lm's ``SuScaledRoPE`` applies the long-rope factors at every length,
whereas the original switches from the short to the long factors past
``original_max_position_embeddings``. A long-rope model therefore scores differently from the
original on short texts; the exporter records this as a warning in the manifest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from hubquant.errors import ExportError, MissingDependencyError, RecipeError
from hubquant.exporters.base import Exporter, ExporterOptions, ExportJob, Intermediates, Progress, Runner
from hubquant.exporters.mlx_common import MLX_PRECISIONS, MLXRunner, mlx_rope_keys

if TYPE_CHECKING:
    from hubquant.artifact import Artifact
    from hubquant.repos import RepoPlan
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)


class MLXOptions(ExporterOptions):
    group_size: Literal[32, 64, 128] = Field(
        64, description="weights sharing one scale and bias (quantized precisions)"
    )
    rope_factors: Literal["long", "short"] = Field(
        "long",
        description="long-rope models: factors mlx-lm applies at every length (long: right past "
        "original_max_position_embeddings; short: right below it)",
    )


class MLXExporter(Exporter):
    name = "mlx"
    description = "Apple MLX (mlx-lm on Apple silicon; mlx[cpu] on Linux)"
    extra = "mlx"
    required_modules = ("mlx", "mlx_lm")
    precisions = {
        "fp32": "32-bit float",
        "fp16": "16-bit float",
        "bf16": "bfloat16",
        "8bit": "8-bit affine",
        "6bit": "6-bit affine",
        "5bit": "5-bit affine",
        "4bit": "4-bit affine",
        "3bit": "3-bit affine",
        "2bit": "2-bit affine",
        "mixed_2_6": "mlx-lm recipe: 2/6-bit mix",
        "mixed_3_4": "mlx-lm recipe: 3/4-bit mix",
        "mixed_3_6": "mlx-lm recipe: 3/6-bit mix",
        "mixed_4_6": "mlx-lm recipe: 4/6-bit mix",
    }
    generic_precisions = {"int4": "4bit", "int8": "8bit", "fp16": "fp16", "fp32": "fp32"}
    full_precisions = ("fp32",)  # 16-bit conversions round the norms too: compared with fp32 like any variant
    Options = MLXOptions
    tool_distributions = ("mlx", "mlx-lm", "transformers")
    library_name = "mlx"
    display_name = "MLX"
    repo_template = "{model}-{variant}"
    repo_layout = "repo-per-variant"
    floor_bytes_per_parameter = 4.4  # fp32 weights plus activations (estimated)
    writes_in_order = True  # mx.save_safetensors: header, then each tensor in order; the rest is small JSON
    plot_marker = "D"
    vision_architectures = ("Phi4ForCausalLMV",)  # through mlx-vlm: see hubquant.exporters.mlx_vision
    floor_projector = "fp32"

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        assert isinstance(options, MLXOptions)
        if MLX_PRECISIONS[precision][0] is None and options.group_size != 64:
            raise RecipeError(
                f"group_size has no effect on MLX {precision}",
                key="options.group_size",
                hint="drop group_size, or pick a quantized precision such as 4bit",
            )

    def folder_name(self, source: SourceModel, precision: str, options: dict[str, Any]) -> str:
        quantized = MLX_PRECISIONS[precision][0] is not None
        return (
            f"mlx-{precision}"
            + (f"-g{options['group_size']}" if quantized else "")
            + ("-short-rope" if options.get("rope_factors") == "short" else "")
        )

    @classmethod
    def repo_variant(cls, folder: str) -> str:
        # mlx-community names repos by bits only when the group size is mlx-lm's default
        return super().repo_variant(folder).replace("-g64", "")

    @classmethod
    def floor_precision(cls, source: SourceModel) -> str:
        # fp32: mlx-lm's fp16 conversion rounds the norms too (tiny Phi-3: KL 7e-7 against fp32's exact
        # match), and mlx[cpu] runs expert layers (GatherMM) in float32 only.
        return "fp32"

    @classmethod
    def snippets(cls, plan: RepoPlan) -> str:
        if plan.variants and plan.variants[0].artifact.manifest.source.vision_parts:
            from hubquant.exporters.mlx_vision import VISION_SNIPPETS

            return VISION_SNIPPETS.format(repo=plan.repo_id)
        return SNIPPETS.format(repo=plan.repo_id)

    @classmethod
    def deviation_causes(cls, source: SourceModel, options: dict[str, Any]) -> list[str]:
        from hubquant.source import PHIMOE_ROUTING_DIFFERS

        causes = [PHIMOE_ROUTING_DIFFERS.format(runtime="mlx-lm")] if source.model_type == "phimoe" else []
        return causes + cls._rope_causes(source, options)

    @classmethod
    def _rope_causes(cls, source: SourceModel, options: dict[str, Any]) -> list[str]:
        keys = mlx_rope_keys(source.config)
        scaling = keys.get("rope_scaling") or {}
        limit = keys.get("original_max_position_embeddings", source.config.get("original_max_position_embeddings"))
        if (
            scaling.get("type") in ("longrope", "su")
            and scaling.get("long_factor") != scaling.get("short_factor")
            and options.get("rope_factors", "long") == "long"
        ):
            return [
                f"mlx-lm applies the long-rope factors at every length, while the original uses the short ones "
                f"below {limit} tokens (rope_factors=short is exact there, and wrong past it)."
            ]
        return []

    @classmethod
    def tool_versions(cls) -> dict[str, str]:
        from hubquant.vision_env import MLX

        return {**super().tool_versions(), "mlx-vision-environment": " ".join(MLX.pins)}

    @classmethod
    def check_installed(cls) -> None:
        super().check_installed()
        try:
            import mlx.core  # noqa: F401 - the wheel exists only where mlx can run
        except (ImportError, ValueError) as exc:
            raise MissingDependencyError(
                f"the MLX exporter needs a working mlx ({exc})",
                extra=cls.extra,
                hint='install it with: pip install "hubquant[mlx]" (Apple silicon, or Linux x86_64/arm64: mlx[cpu])',
            ) from None

    def export_one(self, source: SourceModel, job: ExportJob, *, shared: Intermediates, progress: Progress) -> None:
        if source.is_vision:
            from hubquant.exporters.mlx_vision import convert_vision

            progress(f"mlx {job.precision}: converting with mlx_vlm.convert (mlx-vision environment)")
            convert_vision(source, job, progress=progress)
            return
        progress(f"mlx {job.precision}: converting with mlx_lm.convert")
        convert(
            source,
            job.folder,
            job.precision,
            group_size=job.options["group_size"],
            rope_factors=job.options["rope_factors"],
            # inside the variant's folder (mlx-lm wants a folder that does not exist yet): the files
            # are followed and hashed while mlx writes them, then moved up (same inodes)
            scratch=job.folder / ".mlx-lm",
            warnings=job.warnings,
        )

    def runner(self, artifact: Artifact, *, context_length: int) -> Runner:
        self.check_installed()
        if artifact.manifest.source.vision_parts:
            from hubquant.exporters.mlx_vision import MLXVisionRunner

            return MLXVisionRunner(artifact.path)
        return MLXRunner(artifact.path)

    @classmethod
    def worker_python(cls, artifact: Artifact) -> str | None:
        """A vision variant is measured in the mlx-vision environment, where mlx-vlm imports."""
        if not artifact.manifest.source.vision_parts:
            return None
        from hubquant.vision_env import MLX, ensure_env

        return str(ensure_env(env=MLX))

    @classmethod
    def image_projectors(cls, artifact: Artifact) -> list[str]:
        """A vision variant reads pictures with the unquantized tower it holds, named by its float type."""
        if not artifact.manifest.source.vision_parts:
            return []
        return [str((artifact.manifest.settings or {}).get("vision_weights") or "fp32")]

    def image_reader(self, artifact: Artifact, projector: str) -> Any:
        from hubquant.exporters.mlx_vision import MLXVisionReader

        return MLXVisionReader(artifact.path)


SNIPPETS = """mlx-lm:

```bash
pip install mlx-lm
mlx_lm.generate --model {repo} --prompt "Hello"
```

```python
from mlx_lm import load, generate
model, tokenizer = load("{repo}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```"""


def convert(
    source: "SourceModel",
    output: Path,
    precision: str,
    *,
    group_size: int,
    scratch: Path,
    warnings: list[str],
    rope_factors: str = "long",
) -> Path:
    """Convert with ``mlx_lm.convert`` into ``output`` (an existing empty folder) and fix the rope keys.

    Raises:
        ExportError: mlx-lm cannot convert this model.
    """
    from mlx_lm import convert as mlx_convert

    bits, dtype, recipe = MLX_PRECISIONS[precision]
    if dtype is None:  # quantized: non-quantized tensors keep a 16-bit float type
        dtype = source.dtype if source.dtype in ("float16", "bfloat16") else "float16"
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):  # mlx-lm prints its progress; stdout stays ours
            mlx_convert(
                hf_path=str(source.path),
                mlx_path=str(scratch),
                quantize=bits is not None,
                q_bits=bits,
                q_group_size=group_size if bits is not None else None,
                dtype=dtype,
                quant_predicate=recipe,
            )
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise ExportError(
            f"mlx_lm.convert failed: {exc}",
            format="mlx",
            precision=precision,
            hint="check that mlx-lm supports this architecture",
        ) from None
    finally:
        log.debug("mlx_lm.convert: %s", captured.getvalue())
    for item in scratch.iterdir():
        shutil.move(str(item), output / item.name)
    scratch.rmdir()
    _write_rope_keys(output, rope_factors, warnings)
    return output


def _write_rope_keys(output: Path, rope_factors: str, warnings: list[str]) -> None:
    """The top-level rope keys mlx-lm reads, in the artifact's config (short factors when asked)."""
    config_path = output / "config.json"
    config = json.loads(config_path.read_text())
    keys = mlx_rope_keys(config)
    scaling = keys.get("rope_scaling") or {}
    limit = keys.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 4096))
    if scaling.get("type") in ("longrope", "su") and scaling.get("long_factor") != scaling.get("short_factor"):
        if rope_factors == "short":
            # mlx-lm reads only long_factor: give it the short ones, exact below the limit.
            scaling["long_factor"] = scaling["short_factor"]
            warnings.append(
                f"rope_factors=short: exact below {limit} tokens; longer contexts use the short "
                "factors where the original switches to the long ones"
            )
    if keys:
        config.update(keys)
        config_path.write_text(json.dumps(config, indent=4) + "\n")
