"""ONNX Runtime GenAI through its own model builder (``onnxruntime_genai.models.builder``).

The builder runs as a child process: its peak memory leaves with it, its tracebacks become one
clear error, and its progress goes to hubquant's log. For int4/int8 on cpu (rtn or k_quant) it is
fed a checkpoint quantized tensor by tensor with ONNX Runtime's own functions
(:mod:`hubquant.exporters.onnx_prequant`): the same MatMulNBits bytes as its direct route, which
holds the whole model in float32 (about 20 GiB of anonymous memory for a 3.8B model).
The artifact folder is what ``onnxruntime_genai.Model(path)`` loads (``model.onnx``,
``model.onnx.data``, ``genai_config.json``, tokenizer files and chat template). Folders follow
Microsoft's naming, e.g. ``cpu-int4-rtn-block-32-acc-level-4``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from hubquant.child import python_module, run_child
from hubquant.errors import ExportError, RecipeError
from hubquant.exporters.base import Exporter, ExporterOptions, ExportJob, Intermediates, Progress, Runner

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact
    from hubquant.repos import RepoPlan
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: What each execution target can load and run (fp16/bf16 files for cpu fail at load or generation).
TARGET_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "bf16"),
    "dml": ("int4", "fp16"),
    "webgpu": ("int4", "int8", "fp16"),
}
QUANTIZED = ("int4", "int8")


class ONNXOptions(ExporterOptions):
    target: Literal["cpu", "cuda", "dml", "webgpu"] = Field(
        "cpu", description="execution provider the model is built for"
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4/int8: weights per quantization block")
    accuracy_level: int | None = Field(
        None,
        ge=0,
        le=4,
        description="int4/int8: MatMulNBits compute type (4=int8, 1=fp32; default 4 on cpu, 0 elsewhere)",
    )
    algo: Literal["rtn", "k_quant", "default"] = Field("rtn", description="int4/int8: quantization algorithm")
    symmetric: bool = Field(True, description="int4/int8: symmetric (int) or asymmetric (uint) quantization")
    quantize_lm_head: bool = Field(True, description="int4/int8: quantize the LM head too")
    quantize_embeddings: bool = Field(False, description="int4/int8: quantize the embedding Gather too")
    shared_embeddings: bool | None = Field(
        None, description="share embedding and LM head weights (default: as the model ties them)"
    )
    route: Literal["auto", "prequantized", "direct"] = Field(
        "auto",
        description="int4/int8 cpu rtn/k_quant: 'prequantized' feeds the builder a checkpoint quantized "
        "tensor by tensor with ORT's own functions (same bytes, a fraction of the memory); "
        "'direct' gives it the source; 'auto' takes prequantized where it applies",
    )


class ONNXExporter(Exporter):
    name = "onnx"
    description = "ONNX Runtime GenAI (onnxruntime-genai; cpu, cuda, dml, webgpu)"
    extra = "onnx"
    required_modules = ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir")
    scratch_share = 0.35  # the prequantized checkpoint (2.67 GB for Phi-3.5-mini's 7.64)
    precisions = {
        "int4": "4-bit MatMulNBits",
        "int8": "8-bit MatMulNBits",
        "fp16": "16-bit float (GPU targets)",
        "bf16": "bfloat16 (cuda)",
        "fp32": "32-bit float",
    }
    generic_precisions = {"int4": "int4", "int8": "int8", "fp16": "fp16", "fp32": "fp32"}
    # fp16/bf16 are GPU targets' precisions; on cpu, fp32 is the runtime's unquantized form.
    full_precisions = ("fp32", "bf16", "fp16")
    Options = ONNXOptions
    tool_distributions = ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch")
    library_name = "onnxruntime-genai"
    display_name = "ONNX Runtime GenAI"
    repo_template = "{model}-onnx"
    repo_layout = "folders"
    floor_bytes_per_parameter = 3.9  # fp32: 14.8 GB for 3.8B parameters
    plot_marker = "s"

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        assert isinstance(options, ONNXOptions)
        valid = TARGET_PRECISIONS[options.target]
        if precision not in valid:
            pairs = [f"{t}/{p}" for t, ps in TARGET_PRECISIONS.items() for p in ps]
            raise RecipeError(
                f"ONNX {precision} cannot run on the {options.target} target",
                key="precision",
                allowed=pairs,
                hint=f"for {options.target} use one of: {', '.join(valid)} "
                f"(valid target/precision pairs: {', '.join(pairs)})",
            )
        quant_only = {
            "accuracy_level": None,
            "block_size": 32,
            "algo": "rtn",
            "symmetric": True,
            "quantize_lm_head": True,
            "quantize_embeddings": False,
            "route": "auto",
        }
        if precision not in QUANTIZED:
            for key, default in quant_only.items():
                if getattr(options, key) != default:
                    raise RecipeError(
                        f"ONNX option {key} only applies to int4/int8",
                        key=f"options.{key}",
                        hint=f"drop {key} for {precision}",
                    )

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {**super().describe(), "targets": {t: list(p) for t, p in TARGET_PRECISIONS.items()}}

    @staticmethod
    def accuracy_level(precision: str, options: dict[str, Any]) -> int | None:
        if precision not in QUANTIZED:
            return None
        level = options.get("accuracy_level")
        return level if level is not None else (4 if options["target"] == "cpu" else 0)

    def subfolder(self, precision: str, options: dict[str, Any]) -> str:
        """Microsoft's folder name: ``{target}-{precision}[-{algo}-block-{n}][-acc-level-{k}]``."""
        name = f"{options['target']}-{precision}"
        if precision in QUANTIZED:
            name += f"-{options['algo']}-block-{options['block_size']}"
            level = self.accuracy_level(precision, options)
            if level:
                name += f"-acc-level-{level}"
            if not options["symmetric"]:
                name += "-asym"
            if not options["quantize_lm_head"]:
                name += "-fp-lm-head"
            if options["quantize_embeddings"]:
                name += "-q-embed"
        if options.get("shared_embeddings") is not None:
            name += "-shared-embed" if options["shared_embeddings"] else "-separate-embed"
        return name

    def folder_name(self, source: "SourceModel", precision: str, options: dict[str, Any]) -> str:
        return f"onnx-{self.subfolder(precision, options)}"

    @classmethod
    def floor_precision(cls, source: "SourceModel") -> str:
        return "fp32"  # what the cpu target runs unquantized

    @classmethod
    def snippets(cls, plan: "RepoPlan") -> str:
        return SNIPPETS.format(repo=plan.repo_id, folder=plan.variants[0].location)

    @staticmethod
    def builder_input(source: "SourceModel", work_dir: Path) -> Path:
        """The folder the builder reads: the source itself, or a view of it whose config the 0.18
        builder can read (see :func:`hubquant.exporters.onnx_prequant.builder_config`)."""
        import json

        from hubquant.exporters.onnx_prequant import builder_config, link_companions

        config = builder_config(source.config)
        if config is None:
            return source.path
        view = work_dir / "builder-input"
        link_companions(source.path, view, weights=True)
        (view / "config.json").write_text(json.dumps(config, indent=2))
        return view

    def builder_command(
        self,
        source: "SourceModel",
        output: Path,
        precision: str,
        options: dict[str, Any],
        cache: Path,
        input_dir: Path | None = None,
    ) -> list[str]:
        """The builder's command line for one variant (exactly what a user would type)."""
        extra: list[str] = []
        if precision in QUANTIZED:
            extra += [
                f"block_size={options['block_size']}",
                f"algo_config={options['algo']}",
                f"is_symmetric={str(options['symmetric']).lower()}",
                f"accuracy_level={self.accuracy_level(precision, options)}",
            ]
            if not options["quantize_lm_head"]:
                extra.append("nodes_to_exclude=/lm_head/MatMul")
            if options["quantize_embeddings"]:
                extra.append("op_types_to_quantize=MatMul/Gather")
        if options.get("shared_embeddings") is not None:
            extra.append(f"shared_embeddings={str(options['shared_embeddings']).lower()}")
        # Through hubquant._launch: the builder itself, after hubquant's import work-arounds (_compat).
        command = python_module(
            "hubquant._launch",
            "onnxruntime_genai.models.builder",
            "-i",
            str(input_dir or source.path),
            "-o",
            str(output),
            "-p",
            precision,
            "-e",
            options["target"],
            "-c",
            str(cache),
        )
        return command + (["--extra_options", *extra] if extra else [])

    def route_key(self, source: "SourceModel", job: ExportJob) -> str | None:
        """The prequantized checkpoint this job is built from (its settings as a key), or None for the
        builder's direct route. A job asking for ``route: prequantized`` that cannot take it fails with the reason.
        """
        from hubquant.exporters.onnx_prequant import unsupported_reason

        route = job.options.get("route", "auto")
        reason = (
            "route: direct"
            if route == "direct"
            else unsupported_reason(source.config, source.path, precision=job.precision, options=job.options)
        )
        if reason and route == "prequantized":
            raise ExportError(
                f"the prequantized ONNX route does not apply: {reason}",
                format="onnx",
                precision=job.precision,
                hint="use route: auto or route: direct",
            )
        if reason:
            return None
        bits = 4 if job.precision == "int4" else 8
        head = "-head" if self.prequantize_lm_head(job.options) else ""
        return f"int{bits}-{job.options['block_size']}-{job.options['symmetric']}-{job.options['algo']}{head}"

    @staticmethod
    def prequantize_lm_head(options: dict[str, Any]) -> bool:
        """Whether the prequantized checkpoint carries the LM head quantized too: always when it is to be
        quantized, except with shared embeddings, which the builder ties only as both float or both
        quantized by itself."""
        return bool(options.get("quantize_lm_head", True)) and not options.get("shared_embeddings")

    @classmethod
    def builder_quantizes_lm_head(cls, options: dict[str, Any], own_lm_head: bool) -> bool:
        """Whether the builder must quantize the LM head itself, which makes it run its whole-graph
        quantizer pass (see :mod:`hubquant.exporters.onnx_lean`): the head is to be quantized, but the
        prequantized checkpoint cannot carry it — shared embeddings, or a checkpoint without an LM head
        of its own (tied embeddings; :func:`hubquant.exporters.onnx_prequant.lm_head_source`)."""
        wanted = bool(options.get("quantize_lm_head", True))
        return wanted and not (own_lm_head and cls.prequantize_lm_head(options))

    def prequantize(self, source: "SourceModel", job: ExportJob, target: Path) -> Path:
        """Write the prequantized checkpoint for ``job`` into ``target`` (in a child process)."""
        args = [
            str(source.path),
            str(target),
            "--bits",
            "4" if job.precision == "int4" else "8",
            "--block-size",
            str(job.options["block_size"]),
            "--algo",
            job.options["algo"],
        ]
        if not job.options["symmetric"]:
            args.append("--asymmetric")
        if self.prequantize_lm_head(job.options):
            args.append("--lm-head")
        result = run_child(python_module("hubquant.exporters.onnx_prequant", *args), name="onnx prequantize")
        if result.returncode != 0:
            raise ExportError(
                f"prequantizing for the ONNX builder failed: {result.tail[-1] if result.tail else result.returncode}",
                format="onnx",
                precision=job.precision,
                hint="set the option route: direct to let the builder quantize (needs far more memory)",
            )
        return target

    def export_one(self, source: "SourceModel", job: ExportJob, *, shared: Intermediates, progress: Progress) -> None:
        builder_in = shared.get(
            ("builder-input",), lambda: self.builder_input(source, shared.work_dir), job=job, users=lambda j: True
        )
        key = self.route_key(source, job)
        if key is not None:

            def build() -> Path:
                progress(f"onnx {job.precision}: quantizing the weights tensor by tensor for the builder")
                return self.prequantize(source, job, shared.work_dir / f"prequantized-{key}")

            builder_in = shared.get(
                ("prequantized", key),
                build,
                job=job,
                path=shared.work_dir / f"prequantized-{key}",
                users=lambda j: self._same_route(source, j, key),
            )
            job.settings = {"route": "prequantized", "builder_input": "olive"}
        progress(f"onnx {job.options['target']} {job.precision}: building with onnxruntime-genai's builder")
        command = self.builder_command(
            source, job.folder, job.precision, job.options, shared.work_dir / "cache", builder_in
        )
        result = run_child(command, name="onnx builder")
        if result.returncode != 0 or not (job.folder / "genai_config.json").is_file():
            reason = result.reason()
            unsupported = any(
                "not currently supported" in line or "NotImplementedError" in line for line in result.tail
            )
            raise ExportError(
                (
                    f"onnxruntime-genai's builder cannot export {source.architecture}: {reason}"
                    if unsupported
                    else f"onnxruntime-genai's builder failed: {reason}"
                ),
                format="onnx",
                precision=job.precision,
                hint="use another format for this model"
                if unsupported
                else "run with HUBQUANT_DEBUG=1 to see the builder's full output",
            )

    def _same_route(self, source: "SourceModel", job: ExportJob, key: str) -> bool:
        try:
            return self.route_key(source, job) == key
        except ExportError:
            return False

    @classmethod
    def check_runnable(cls, artifact: "Artifact") -> None:
        target = artifact.options.get("target", "cpu")
        if target != "cpu":
            raise ExportError(
                f"{artifact.path.name} is built for {target}; hubquant evaluates cpu variants only",
                format="onnx",
                precision=artifact.precision,
                hint="evaluate the cpu variant, or skip this one",
            )

    def runner(self, artifact: "Artifact", *, context_length: int) -> Runner:
        self.check_installed()
        self.check_runnable(artifact)
        return ONNXRunner(artifact.path, context_length=context_length)


SNIPPETS = """onnxruntime-genai:

```bash
hf download {repo} --include "{folder}/*" --local-dir .
```

```python
import onnxruntime_genai as og
model = og.Model("{folder}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Hello"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```"""


class ONNXRunner(Runner):
    """onnxruntime-genai's Generator, fed token ids directly."""

    def __init__(self, path: Path, *, context_length: int) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.model = og.Model(str(path))
        self.context_length = context_length
        self._running: Any = None

    def _generator(self, length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self._og.Generator(self.model, params)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        generator = self._generator(len(ids) + 1)
        generator.append_tokens(list(ids))
        return np.array(generator.get_output("logits"), dtype=np.float32)[0]

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        self._running = self._generator(len(ids) + room + 1)
        self._running.append_tokens(list(ids))
        return self._next()

    def step(self, token: int) -> int:
        self._running.append_tokens([token])
        return self._next()

    def _next(self) -> int:
        import numpy as np

        return int(np.argmax(np.asarray(self._running.get_output("logits"))[0, -1]))

    def close(self) -> None:
        self._running = None
        del self.model
