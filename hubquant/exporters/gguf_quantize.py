"""``llama_model_quantize`` in a child of its own:
``python -m hubquant.exporters.gguf_quantize INTERMEDIATE OUTPUT TYPE ANSWER [--imatrix NPZ] [--tensor-types JSON]``.

hubquant converts in-process (:func:`hubquant.exporters.gguf_tools.convert`), so by the time it
quantizes, its process holds torch, the converter and the heap they left. Quantizing in that
process took 6% longer than llama.cpp quantizing the same file in a fresh process (medians of three
at Phi-3.5-mini size: 170.5 against 161.0 s, ``benchmarks/results/scale-phi-3.5-mini-gguf.*``). This
child imports llama-cpp-python and nothing of torch, as the raw tool does; the parent waits, its
own memory small (~0.3 GiB) beside the child's.

The importance matrix travels as an ``.npz`` of float32 arrays and the per-tensor types as JSON,
both beside the output (and deleted after). A refusal llama.cpp logs (an imatrix it needs) comes
back in ANSWER as ``{"message", "hint"}``, so the parent raises the same :class:`ExportError` as
before. Signals: the parent stops the child (SIGTERM) when it is interrupted; Ctrl-C in a terminal
reaches the child too and ends it at once.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hubquant  # noqa: F401 - its import work-arounds first (hubquant._compat)
from hubquant.child import ChildResult, hand_back, python_module, run_child
from hubquant.errors import ExportError
from hubquant.faults import checkpoint

if TYPE_CHECKING:
    from hubquant.exporters.gguf_recipes import TensorTypes

log = logging.getLogger(__name__)


def quantize(
    intermediate: Path,
    output: Path,
    precision: str,
    *,
    imatrix: dict[str, Any] | None = None,
    tensor_types: TensorTypes | None = None,
    keep_split: bool = False,
    threads: int | None = None,
) -> Path:
    """Quantize a GGUF model with ``llama_model_quantize`` (in a child); return the first file written.

    Args:
        intermediate: the F16 (or F32/BF16) GGUF (its first shard when split).
        output: the file to write (``X.gguf``; with ``keep_split``, ``X-00001-of-0000N.gguf`` …).
        precision: a llama.cpp file type name (``Q4_K_M``).
        imatrix: GGUF tensor name → per-column importance (float32 array): ``ImportanceMatrix.means``.
        tensor_types: token-embedding, output and per-tensor types, passed as llama.cpp's own parameters.
        keep_split: write as many shards as the intermediate has.
        threads: quantization threads (default: every core).

    Raises:
        ExportError: llama.cpp refused or failed, or the child died (out of memory).
    """
    import numpy as np

    from hubquant.exporters.gguf_tools import shard_paths

    checkpoint("gguf-quantizing")
    started = time.perf_counter()
    # named whole: a model name has dots of its own (Phi-3.5-mini), which with_suffix would cut at
    answer, matrix, types = (output.with_name(f".{output.stem}-quantize.{e}") for e in ("answer", "imatrix", "types"))
    args = [str(intermediate), str(output), precision, str(answer), "--threads", str(threads or os.cpu_count() or 1)]
    try:
        if imatrix:
            with matrix.open("wb") as handle:  # np.savez would append .npz to a str name
                np.savez(handle, **{name: np.asarray(v, dtype=np.float32) for name, v in imatrix.items()})
            args += ["--imatrix", str(matrix)]
        if tensor_types:
            types.write_text(json.dumps(_types_json(tensor_types)), encoding="utf-8")
            args += ["--tensor-types", str(types)]
        if keep_split:
            args.append("--keep-split")
        result = run_child(python_module("hubquant.exporters.gguf_quantize", *args), name="llama quantize")
        refusal = json.loads(answer.read_text(encoding="utf-8")) if answer.is_file() else None
    finally:
        for path in (answer, matrix, types, answer.with_suffix(".tmp")):  # hand_back's temporary
            path.unlink(missing_ok=True)
    if result.returncode != 0:
        for partial in [output, *output.parent.glob(f"{glob.escape(output.stem)}-*-of-*.gguf")]:
            partial.unlink(missing_ok=True)  # what llama.cpp wrote before it stopped
        raise _failure(precision, result, refusal)
    if keep_split:
        output = output.with_name(f"{output.stem}-00001-of-{len(shard_paths(intermediate)):05d}.gguf")
    log.info("gguf %s: quantized in %.1f s", precision, time.perf_counter() - started)
    return output


def _failure(precision: str, result: ChildResult, refusal: dict[str, str] | None) -> ExportError:
    """The child's own account of llama.cpp's refusal, else how it died."""
    if refusal:
        return ExportError(refusal["message"], format="gguf", precision=precision, hint=refusal["hint"])
    died = "was killed (out of memory?)" if result.killed else f"failed: {result.reason()}"
    return ExportError(
        f"llama_model_quantize {died}",
        format="gguf",
        precision=precision,
        hint="run with HUBQUANT_DEBUG=1 to see llama.cpp's log",
    )


def _types_json(types: TensorTypes) -> dict[str, Any]:
    return {
        "token_embedding_type": types.token_embedding_type,
        "output_tensor_type": types.output_tensor_type,
        "overrides": [list(entry) for entry in types.overrides],
    }


def _quantize_here(
    intermediate: Path,
    target: Path,
    precision: str,
    *,
    threads: int,
    keep_split: bool,
    imatrix: dict[str, Any] | None,
    tensor_types: TensorTypes | None,
) -> int:
    """The call itself, in this process: llama.cpp's status."""
    import llama_cpp

    from hubquant.exporters.gguf_tools import route_llama_logs

    route_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision}")
    params.nthread = threads
    params.keep_split = keep_split
    keep_alive = _attach_imatrix(params, imatrix) if imatrix else []
    keep_alive += _attach_tensor_types(params, tensor_types) if tensor_types else []
    status = llama_cpp.llama_model_quantize(str(intermediate).encode(), str(target).encode(), ctypes.byref(params))
    del keep_alive
    return int(status)


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


def _attach_tensor_types(params: Any, types: TensorTypes) -> list[Any]:
    """Hand llama.cpp the per-tensor types (``tt_overrides`` ends with a null pattern); return what must stay alive."""
    import gguf
    import llama_cpp

    def ggml(name: str) -> int:
        return int(gguf.GGMLQuantizationType[name].value)

    if types.token_embedding_type:
        params.token_embedding_type = ggml(types.token_embedding_type)
    if types.output_tensor_type:
        params.output_tensor_type = ggml(types.output_tensor_type)
    if not types.overrides:
        return []
    entries = (llama_cpp.llama_model_tensor_override * (len(types.overrides) + 1))()
    keep_alive: list[Any] = [entries]
    for index, (pattern, kind) in enumerate(types.overrides):
        encoded = pattern.encode()
        keep_alive.append(encoded)
        entries[index].pattern = encoded
        entries[index].type = ggml(kind)
    entries[len(types.overrides)].pattern = None
    params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    return keep_alive


def _refusal(precision: str, status: int, logged: list[str]) -> dict[str, str]:
    """What llama_model_quantize's log says went wrong, for the parent's error."""
    reason = next((line.strip() for line in reversed(logged) if "fail" in line.lower()), f"status {status}")
    if "requires an imatrix" in reason or "requires an importance matrix" in reason:
        return {"message": f"llama.cpp needs an importance matrix for {precision}", "hint": "add --option imatrix=true"}
    reason = reason.split("failed to quantize: ", 1)[-1]
    return {
        "message": f"llama_model_quantize failed for {precision}: {reason}",
        "hint": "run with HUBQUANT_DEBUG=1 to see llama.cpp's log",
    }


def _arguments(argv: list[str]) -> Any:
    import argparse

    import numpy as np

    from hubquant.exporters.gguf_recipes import TensorTypes

    parser = argparse.ArgumentParser(prog="hubquant.exporters.gguf_quantize")
    for name in ("intermediate", "output", "precision", "answer"):
        parser.add_argument(name)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--imatrix")
    parser.add_argument("--tensor-types")
    parser.add_argument("--keep-split", action="store_true")
    args = parser.parse_args(argv)
    args.matrix = args.types = None
    if args.imatrix:
        with np.load(args.imatrix) as stored:
            args.matrix = {name: stored[name] for name in stored.files}
    if args.tensor_types:
        raw = json.loads(Path(args.tensor_types).read_text(encoding="utf-8"))
        overrides = [tuple(entry) for entry in raw["overrides"]]
        args.types = TensorTypes(raw["token_embedding_type"], raw["output_tensor_type"], overrides)
    return args


def main(argv: list[str]) -> int:
    from hubquant.exporters.gguf_tools import RECENT_LOG

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the C call at once
    # llama.cpp's log (routed to logging) goes to the parent's debug log, line by line
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
    args = _arguments(argv)
    output = Path(args.output)
    # with keep_split llama.cpp appends -00001-of-0000N.gguf to the name it is given
    target = output.with_suffix("") if args.keep_split else output
    status = _quantize_here(
        Path(args.intermediate),
        target,
        args.precision,
        threads=args.threads,
        keep_split=args.keep_split,
        imatrix=args.matrix,
        tensor_types=args.types,
    )
    if args.keep_split:
        done = any(output.parent.glob(f"{glob.escape(output.stem)}-00001-of-*.gguf"))
    else:
        done = output.is_file()
    if status != 0 or not done:
        hand_back(Path(args.answer), json.dumps(_refusal(args.precision, status, list(RECENT_LOG))).encode())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
