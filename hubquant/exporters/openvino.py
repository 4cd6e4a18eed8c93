"""OpenVINO IR through optimum-intel's exporter and NNCF weight compression.

The work runs in a child process (:mod:`hubquant.exporters.openvino_worker`): the export's peak
memory leaves with it and NNCF's console tables go to hubquant's debug log. Within one run the
full-precision IR that every int4/int8 variant starts from is exported once (like the temporary IR
``optimum-cli export openvino`` writes) and each compressed variant is made from it as
``OVModelForCausalLM.from_pretrained(ir, quantization_config=…)`` makes it; fp16/fp32 are exported
directly. Data-free compression runs in a second child that never imports torch
(:mod:`hubquant.exporters.openvino_compress`), so the run's peak — NNCF compressing — holds less
memory than ``optimum-cli`` does; calibrated compression stays in the worker, which needs torch for
its data. Every artifact folder runs in both ``optimum.intel.OVModelForCausalLM`` and
``openvino_genai.LLMPipeline``: IR, ``openvino_tokenizer``/``openvino_detokenizer``, configs and
the chat template.

int4 defaults follow optimum-intel: when no compression option is set, its own table of
per-model configurations (keyed by Hub id, e.g. ``microsoft/Phi-3.5-mini-instruct``) applies,
else its generic default (asymmetric, group 128, ratio 1.0). Setting any compression option
replaces the defaults, exactly as the CLI does. Data-aware methods (AWQ, scale estimation, GPTQ,
data-aware mixed precision) calibrate on hubquant's built-in calibration text unless
``dataset=`` names a text file or one of optimum-intel's datasets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from hubquant.child import ChildResult, python_module, run_child
from hubquant.errors import ExportError, MissingDependencyError, RecipeError
from hubquant.exporters.base import Exporter, ExporterOptions, ExportJob, Progress, Runner
from hubquant.exporters.openvino_vision import INFERENCE_PRECISION, decoder_feed  # shared with the vision reader

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact
    from hubquant.repos import RepoPlan
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: Options that shape int4 compression; setting any of them replaces optimum-intel's defaults.
INT4_OPTIONS = ("group_size", "sym", "ratio", "all_layers", "awq", "scale_estimation", "gptq", "backup_precision")
#: Options that only make sense for int4/int8 (compression at all).
COMPRESSION_OPTIONS = INT4_OPTIONS + ("dataset", "num_samples", "calibration_context", "vision_weights")
#: Calibration datasets optimum-intel knows for LLMs (downloaded through ``datasets``).
NAMED_DATASETS = ("wikitext2", "c4", "c4-new", "gsm8k", "auto")
#: What the worker leaves in the work folder for the torch-free compressor (:mod:`.openvino_compress`).
COMPRESS_SPEC = "openvino-compress.pkl"


class OpenVINOOptions(ExporterOptions):
    group_size: Literal[-1, 16, 32, 64, 128, 256] | None = Field(
        None, description="int4: weights per quantization group (-1 = per channel; default: optimum-intel's, 128)"
    )
    sym: bool | None = Field(None, description="int4/int8: symmetric quantization (default: asymmetric)")
    ratio: float | None = Field(
        None, gt=0, le=1, description="int4: share of layers in int4, the rest in the backup precision"
    )
    all_layers: bool | None = Field(None, description="int4: also compress embeddings and the LM head to int4")
    awq: bool = Field(False, description="int4: activation-aware weight quantization (calibrated)")
    scale_estimation: bool = Field(False, description="int4: scale estimation (calibrated)")
    gptq: bool = Field(False, description="int4: GPTQ (calibrated; slow)")
    backup_precision: Literal["int8_asym", "int8_sym", "none"] | None = Field(
        None, description="int4: precision of the layers ratio leaves out"
    )
    dataset: str | None = Field(
        None,
        description="calibration: a text file, or an optimum-intel dataset name (wikitext2, c4, auto); "
        "default: hubquant's built-in calibration text",
    )
    num_samples: int | None = Field(None, ge=1, le=4096, description="calibration: number of samples")
    calibration_context: int = Field(128, ge=16, le=8192, description="calibration: tokens per sample from a text file")
    defaults: Literal["model", "none"] = Field(
        "model", description="int4 with no compression option: 'model' uses optimum-intel's per-model table"
    )
    vision_weights: Literal["int8", "unquantized"] | None = Field(
        None,
        description="vision models, int4/int8: the picture (and audio) encoders' weights, int8 like optimum-intel "
        "(default) or left unquantized (fp32)",
    )


class OpenVINOExporter(Exporter):
    name = "openvino"
    description = "OpenVINO IR (optimum-intel + NNCF; OVModelForCausalLM, openvino-genai)"
    extra = "openvino"
    required_modules = ("optimum.intel", "nncf", "openvino", "openvino_tokenizers", "openvino_genai")
    scratch_share = 1.0  # the full-precision IR
    precisions = {
        "int4": "4-bit NNCF weight compression",
        "int8": "8-bit NNCF weight compression (per channel)",
        "fp16": "16-bit float weights",
        "fp32": "32-bit float",
    }
    generic_precisions = {"int4": "int4", "int8": "int8", "fp16": "fp16", "fp32": "fp32"}
    full_precisions = ("fp32",)  # fp16 rounds every constant: it is compared with fp32 like any variant
    Options = OpenVINOOptions
    tool_distributions = (
        "optimum-intel",
        "optimum",
        "nncf",
        "openvino",
        "openvino-tokenizers",
        "transformers",
        "torch",
    )
    library_name = "openvino"
    display_name = "OpenVINO IR"
    repo_template = "{model}-{variant}-ov"
    repo_layout = "repo-per-variant"
    floor_bytes_per_parameter = 6.2  # fp32 at f32 inference: 23.4 GB for 3.8B parameters
    writes_in_order = True  # the serializer streams the .bin, then the .xml; the shared IR is in the work folder
    plot_marker = "^"
    vision_architectures = ("Phi4MultimodalForCausalLM",)  # see hubquant.exporters.openvino_vision
    floor_projector = "fp32"

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        assert isinstance(options, OpenVINOOptions)
        defaults = OpenVINOOptions()
        changed = [key for key in COMPRESSION_OPTIONS if getattr(options, key) != getattr(defaults, key)]
        if precision in ("fp16", "fp32") and (changed or options.defaults != "model"):
            key = changed[0] if changed else "defaults"
            raise RecipeError(
                f"OpenVINO option {key} only applies to int4/int8",
                key=f"options.{key}",
                hint=f"drop {key} for {precision}",
            )
        if precision == "int8":
            int4_only = [key for key in changed if key in INT4_OPTIONS and key != "sym"]
            if int4_only:
                raise RecipeError(
                    f"OpenVINO option {int4_only[0]} only applies to int4 (int8 is per channel, every layer)",
                    key=f"options.{int4_only[0]}",
                    hint=f"drop {int4_only[0]} for int8",
                )
        data_aware = options.awq or options.scale_estimation or options.gptq
        if (options.dataset or options.num_samples) and precision == "int8":
            raise RecipeError(
                "OpenVINO int8 weight compression takes no calibration data",
                key="options.dataset",
                hint="drop dataset/num_samples for int8",
            )
        if (
            options.dataset
            and options.dataset not in NAMED_DATASETS + ("builtin",)
            and not Path(options.dataset).expanduser().is_file()
        ):
            raise RecipeError(
                f"calibration dataset '{options.dataset}' is neither a text file nor a dataset optimum-intel knows",
                key="options.dataset",
                allowed=["builtin", "a path to a text file", *NAMED_DATASETS],
            )
        if options.gptq and options.awq:
            raise RecipeError("NNCF cannot combine GPTQ with AWQ", key="options.gptq", hint="pick one of awq, gptq")
        if data_aware and options.group_size == -1:
            raise RecipeError(
                "AWQ, scale estimation and GPTQ need a group size",
                key="options.group_size",
                hint="set group_size to 32, 64 or 128",
            )
        if options.backup_precision is not None and (options.ratio is None or options.ratio == 1):
            raise RecipeError(
                "backup_precision only matters with ratio below 1",
                key="options.backup_precision",
                hint="set ratio (e.g. 0.8) or drop backup_precision",
            )

    def folder_name(self, source: "SourceModel", precision: str, options: dict[str, Any]) -> str:
        """``openvino-int4-sym-g64-r0.8-awq-se``: the precision and every option that was set."""
        parts = [f"openvino-{precision}"]
        if options.get("sym") is not None:
            parts.append("sym" if options["sym"] else "asym")
        if options.get("group_size") is not None:
            parts.append("per-channel" if options["group_size"] == -1 else f"g{options['group_size']}")
        if options.get("ratio") is not None:
            parts.append(f"r{options['ratio']:g}")
        if options.get("all_layers"):
            parts.append("all-layers")
        parts += [
            flag for key, flag in (("awq", "awq"), ("scale_estimation", "se"), ("gptq", "gptq")) if options.get(key)
        ]
        if options.get("backup_precision"):
            parts.append(f"backup-{options['backup_precision'].replace('_', '-')}")
        if options.get("dataset"):
            parts.append("cal-" + _slug(options["dataset"]))
        if options.get("num_samples"):
            parts.append(f"n{options['num_samples']}")
        if options.get("calibration_context", 128) != 128:
            parts.append(f"ctx{options['calibration_context']}")
        if options.get("defaults") == "none":
            parts.append("no-defaults")
        if options.get("vision_weights") == "unquantized":
            parts.append("vision-fp32")
        return "-".join(parts)

    @classmethod
    def floor_precision(cls, source: SourceModel) -> str:
        # fp32, not fp16: optimum-intel's fp16 export rounds every constant, and at Phi-3.5-mini shape that
        # alone scored KL 2.5e-4 against the reference where fp32 scored 9e-11 (llama.cpp's F16: 1.5e-5).
        # The floor is the runtime's own deviation, so it must not carry a rounding of its own.
        return "fp32"

    @classmethod
    def variant_notes(cls, artifact: Artifact) -> list[str]:
        settings = artifact.manifest.settings or {}
        if not settings.get("dataset"):
            return []
        parts = []
        if settings.get("num_samples"):
            tokens = settings.get("sample_tokens")
            parts.append(f"{settings['num_samples']} samples" + (f" of {tokens} tokens" if tokens else ""))
        if settings.get("sha256"):
            parts.append(f"sha256 `{settings['sha256'][:12]}`")
        detail = ", ".join(parts)
        return [f"data-aware compression calibrated on {settings['dataset']}" + (f" ({detail})" if detail else "")]

    def export(
        self, source: "SourceModel", jobs: list[ExportJob], *, work_dir: Path, progress: Progress
    ) -> dict[str, BaseException | None]:
        """Every variant in one child process, so the full-precision IR is exported once for all."""
        self.check_installed()
        if source.is_vision:
            from hubquant.exporters.openvino_vision import encoder_roles, export_vision

            outcome, child = export_vision(source, jobs, work_dir=work_dir, progress=progress)
            for job in jobs:
                job.roles.update(encoder_roles(job.folder))
            return self._results(jobs, outcome, dict.fromkeys(outcome, child), child)
        for job in jobs:
            if job.options.get("vision_weights"):
                raise RecipeError(
                    "OpenVINO option vision_weights applies to vision models only",
                    key="options.vision_weights",
                    hint=f"drop it for {source.name}, a text model",
                )
        plan = {
            "source": str(source.path),
            "source_id": source.source_id,
            "work_dir": str(work_dir),
            "jobs": [
                {"name": job.name, "folder": str(job.folder), "precision": job.precision, "options": job.options}
                for job in jobs
            ],
        }
        plan_path, result_path = work_dir / "openvino-plan.json", work_dir / "openvino-result.json"
        plan_path.write_text(json.dumps(plan, indent=2))
        child = run_child(
            python_module("hubquant.exporters.openvino_worker", str(plan_path), str(result_path)),
            name="openvino worker",
            progress=progress,
        )
        outcome = json.loads(result_path.read_text()) if result_path.is_file() else {}
        children = dict.fromkeys(outcome, child)
        if any(entry.get("deferred") for entry in outcome.values()):
            self._compress_deferred(work_dir, outcome, children, progress)
        return self._results(jobs, outcome, children, child)

    def _results(
        self, jobs: list[ExportJob], outcome: dict[str, Any], children: dict[str, ChildResult], child: ChildResult
    ) -> dict[str, BaseException | None]:
        """Each job's error (None when built), with the worker's timings, warnings and settings recorded."""
        results: dict[str, BaseException | None] = {}
        for job in jobs:
            entry = outcome.get(job.name)
            if entry is None:
                results[job.name] = self._crash_error(job, children.get(job.name, child))
                continue
            job.seconds = entry.get("seconds", 0.0)
            job.shared_seconds = entry.get("shared_seconds", 0.0)
            job.warnings.extend(entry.get("warnings", []))
            job.settings = entry.get("settings")
            error = entry.get("error")
            results[job.name] = (
                None
                if error is None
                else ExportError(error["message"], format="openvino", precision=job.precision, hint=error.get("hint"))
            )
        return results

    @staticmethod
    def _compress_deferred(
        work_dir: Path, outcome: dict[str, Any], children: dict[str, ChildResult], progress: Progress
    ) -> None:
        """The data-free variants the worker prepared, compressed by the torch-free compressor."""
        spec_path, compressed_path = work_dir / COMPRESS_SPEC, work_dir / "openvino-compressed.json"
        compressor = run_child(
            python_module("hubquant.exporters.openvino_compress", str(spec_path), str(compressed_path)),
            name="openvino compressor",
            progress=progress,
        )
        finished = json.loads(compressed_path.read_text())["variants"] if compressed_path.is_file() else {}
        for name, entry in outcome.items():
            if not entry.pop("deferred", False):
                continue
            children[name] = compressor
            if name not in finished:  # the compressor stopped before this variant: a crash error
                outcome[name] = None
                continue
            entry["seconds"] = entry.get("seconds", 0.0) + finished[name].get("seconds", 0.0)
            if finished[name].get("error"):
                entry["error"] = finished[name]["error"]

    @staticmethod
    def _crash_error(job: ExportJob, child: ChildResult) -> ExportError:
        if child.killed:
            return ExportError(
                "the OpenVINO export was killed (out of memory?)",
                format="openvino",
                precision=job.precision,
                hint="free memory, or export fewer variants at once; HUBQUANT_DEBUG=1 shows the log",
            )
        return ExportError(
            f"the OpenVINO export stopped: {child.reason()}",
            format="openvino",
            precision=job.precision,
            hint="run with HUBQUANT_DEBUG=1 to see the exporter's full output",
        )

    def runner(self, artifact: "Artifact", *, context_length: int) -> Runner:
        self.check_installed()
        from hubquant.exporters.openvino_vision import OpenVINOVisionRunner, is_vision_folder

        return OpenVINOVisionRunner(artifact.path) if is_vision_folder(artifact.path) else OpenVINORunner(artifact.path)

    @classmethod
    def image_projectors(cls, artifact: "Artifact") -> list[str]:
        """A vision variant reads pictures with the encoders it ships, named by their weights (INT8, FP32)."""
        from hubquant.exporters.openvino_vision import is_vision_folder

        if not is_vision_folder(artifact.path):
            return []
        return [str((artifact.manifest.settings or {}).get("vision_weights") or "fp32").replace("unquantized", "fp32")]

    def image_reader(self, artifact: "Artifact", projector: str) -> Any:
        from hubquant.exporters.openvino_vision import OpenVINOVisionReader

        return OpenVINOVisionReader(artifact.path)

    @classmethod
    def snippets(cls, plan: "RepoPlan") -> str:
        if plan.variants and plan.variants[0].artifact.manifest.source.vision_parts:
            from hubquant.exporters.openvino_vision import VISION_SNIPPETS

            return VISION_SNIPPETS.format(repo=plan.repo_id)
        return SNIPPETS.format(repo=plan.repo_id)


SNIPPETS = """optimum-intel:

```python
from optimum.intel import OVModelForCausalLM
from transformers import AutoTokenizer
model = OVModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("Hello", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```

openvino-genai:

```bash
hf download {repo} --local-dir model
```

```python
import openvino_genai
pipe = openvino_genai.LLMPipeline("model", "CPU")
print(pipe.generate("Hello", max_new_tokens=64))
```"""


def _slug(value: str) -> str:
    import hashlib

    name = Path(value).stem if ("/" in value or "." in value) else value
    clean = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:24]
    return f"{clean}-{hashlib.sha256(value.encode()).hexdigest()[:6]}" if ("/" in value or "." in value) else clean


def import_optimum_intel() -> Any:
    """Import optimum.intel, turning the known torchvision breakage into a clear error.

    optimum-intel depends on torchvision; pip's torchvision wheel is a CUDA build that cannot load
    beside CPU torch ("operator torchvision::nms does not exist"), and transformers then fails to
    import its model classes. LLM export never uses torchvision.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except RuntimeError as exc:
        import importlib.metadata

        raise MissingDependencyError(
            f"torchvision {importlib.metadata.version('torchvision')} cannot load beside torch "
            f"{importlib.metadata.version('torch')} ({exc})",
            extra="openvino",
            hint="LLM export never uses torchvision: pip uninstall -y torchvision",
        ) from None
    import optimum.intel

    return optimum.intel


class OpenVINORunner(Runner):
    """The exported IR on the OpenVINO runtime's CPU plugin at fp32 inference precision: logits,
    prefill and decode steps on one infer request (the stateful model keeps its KV cache in the
    request's state between steps).

    It feeds the four inputs an optimum-intel stateful decoder takes (``input_ids``,
    ``attention_mask``, ``position_ids``, ``beam_idx``) exactly as ``OVModelForCausalLM`` does, without
    importing optimum-intel, transformers or torch: those imports cost ~10 s per measured variant and
    their memory would count in the variant's peak RSS, which openvino-genai's users never pay.
    """

    def __init__(self, path: Path) -> None:
        import openvino as ov

        self.path = path
        xml = path / "openvino_model.xml"
        if not xml.is_file():
            raise ExportError(
                f"{path} has no openvino_model.xml", format="openvino", hint="point at a folder hubquant built"
            )
        core = ov.Core()
        model = core.read_model(xml)
        self._inputs = {port.get_any_name() for port in model.inputs}
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION, "PERFORMANCE_HINT": "LATENCY"}
        self.model = core.compile_model(model, "CPU", config)
        self._request = self.model.create_infer_request()
        self._length = 0

    def _forward(self, ids: Sequence[int], *, fresh: bool) -> "np.ndarray":
        """Logits ``[len(ids), vocab]`` after feeding ``ids`` (from an empty state when ``fresh``)."""
        import numpy as np

        if fresh:
            self._request.reset_state()
            self._length = 0
        new = np.asarray([list(ids)], dtype=np.int64)
        total = self._length + new.shape[1]
        self._request.infer({"input_ids": new, **decoder_feed(self._inputs, self._length, total)})
        self._length = total
        return self._request.get_tensor("logits").data[0]

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        return np.array(self._forward(ids, fresh=True), dtype=np.float32)

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        return int(self._forward(ids, fresh=True)[-1].argmax())

    def step(self, token: int) -> int:
        return int(self._forward([token], fresh=False)[-1].argmax())

    def close(self) -> None:
        del self._request, self.model
