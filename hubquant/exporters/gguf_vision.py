"""GGUF for a Phi vision model: the picture encoder as llama.cpp's ``mmproj`` files, and the reader that
runs a variant on pictures through llama.cpp's ``mtmd`` (issue 19).

llama.cpp runs a vision model as two files: the language model (any GGUF type, built as for a text
model) and an ``mmproj`` GGUF holding the vision tower and the projector into the language model's
embeddings. GGUF publishers ship the ``mmproj`` at F16 and Q8_0 beside every quantized language model
(``llama-mtmd-cli -m MODEL.gguf --mmproj mmproj-….gguf``); hubquant writes both into every variant's
folder, once per run, so each folder runs on its own and the ``-GGUF`` repo holds each file once.

The reader feeds a picture and a prompt through ``mtmd_tokenize`` and ``mtmd_helper_eval_chunks``
(the picture becomes its embeddings, the text its tokens, as ``llama-mtmd-cli`` does), then the answer
token by token, keeping the next-token logits at every answer position.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import EvaluationError, ExportError

if TYPE_CHECKING:
    import numpy as np

    from hubquant.exporters.jobs import ExportJob, Intermediates
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

#: The mmproj types written beside every variant, most faithful first (as GGUF publishers ship them).
MMPROJ_TYPES = ("F16", "Q8_0")
#: The role of an mmproj file in a manifest (not a model file: the language model is what is quantized).
PROJECTOR_ROLE = "vision projector"
#: Context of the reader: the picture's tokens, the prompt and the answer.
READER_CONTEXT = 4096


def mmproj_file_name(source: SourceModel, precision: str) -> str:
    return f"mmproj-{source.name}-{precision}.gguf"


def convert_mmproj(source: SourceModel, output: Path, precision: str) -> Path:
    """Write the vision tower and projector as an ``mmproj`` GGUF with llama.cpp's converter (in-process).

    Raises:
        ExportError: the converter cannot write this model's projector.
    """
    import gguf
    import torch
    from conversion import ModelType, get_model_architecture, get_model_class

    from hubquant.exporters.gguf_tools import CONVERTER_TYPES, quiet_converter

    started = time.perf_counter()
    try:
        model_class = get_model_class(get_model_architecture(source.config, ModelType.MMPROJ), mmproj=True)
        with quiet_converter(), torch.inference_mode():
            model = model_class(
                source.path, getattr(gguf.LlamaFileType, CONVERTER_TYPES[precision]), output, model_name=source.name
            )
            model.write()
    except (NotImplementedError, ValueError, KeyError, AssertionError) as exc:
        raise ExportError(
            f"llama.cpp's converter cannot write the vision projector (mmproj) of {source.name}: {exc}",
            format="gguf",
            precision=precision,
            hint="check the checkpoint's vision_config and preprocessor_config.json (patch_size, "
            "min_num_patches, max_num_patches)",
        ) from None
    log.info("gguf mmproj %s: converted in %.1f s", precision, time.perf_counter() - started)
    return output


def add_projectors(source: SourceModel, job: ExportJob, *, shared: Intermediates) -> None:
    """Put the mmproj files (built once per run, shared by every variant) into the variant's folder."""
    written: dict[str, str] = {}
    folder = shared.work_dir / "mmproj"
    for precision in MMPROJ_TYPES:
        name = mmproj_file_name(source, precision)

        def build(precision: str = precision, name: str = name) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            return convert_mmproj(source, folder / name, precision)

        built = shared.get(("mmproj", precision), build, job=job, users=lambda j: True, path=folder / name)
        target = job.folder / name
        try:
            os.link(built, target)  # the same bytes in every folder; a copy where links cannot go
        except OSError:
            shutil.copyfile(built, target)
        job.roles[name] = PROJECTOR_ROLE
        written[precision] = name
    job.settings = {**(job.settings or {}), "mmproj": written}


def projectors(files: Any, settings: dict[str, Any] | None) -> dict[str, str]:
    """An artifact's mmproj files by type (most faithful first), from its manifest settings."""
    named = (settings or {}).get("mmproj") or {}
    present = {entry.path for entry in files}
    return {precision: named[precision] for precision in MMPROJ_TYPES if named.get(precision) in present}


class MtmdReader:
    """A GGUF language model with an mmproj, run on a picture and a prompt by llama.cpp's ``mtmd``."""

    def __init__(self, model: Path, mmproj: Path, *, context: int = READER_CONTEXT) -> None:
        from llama_cpp import Llama
        from llama_cpp import mtmd_cpp as mtmd

        from hubquant.exporters import gguf_tools

        gguf_tools.route_llama_logs()
        mtmd.mtmd_helper_log_set(gguf_tools.log_callback(), ctypes.c_void_p(0))  # mtmd's and clip's lines too
        self._mtmd = mtmd
        threads = os.cpu_count() or 1
        self._llama = Llama(model_path=str(model), n_ctx=context, n_batch=512, verbose=False, n_threads=threads, seed=0)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings = False, threads, False
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self._llama._model.model, params)
        if not self._ctx or not mtmd.mtmd_support_vision(self._ctx):
            self._llama.close()
            raise EvaluationError(
                f"llama.cpp's mtmd cannot load {mmproj.name} with {model.name}",
                hint="rebuild the variant with 'hubquant quantize --force'",
            )
        self.context = context

    def answer_logits(self, question: str, answer: str, pixels: np.ndarray) -> np.ndarray:
        """The logits before every answer token, given the picture and the question (teacher forcing)."""
        import llama_cpp
        import numpy as np

        from hubquant.images import prompt_text

        mtmd, ctx = self._mtmd, self._llama._ctx.ctx
        answer_ids = self._llama.tokenize(answer.encode(), add_bos=False, special=False)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        text = prompt_text(question, mtmd.mtmd_default_marker().decode()).encode()
        height, width, _ = pixels.shape
        buffer = (ctypes.c_uint8 * pixels.size).from_buffer_copy(np.ascontiguousarray(pixels).tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            prompt = mtmd.mtmd_input_text(text, len(text), True, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(prompt), bitmaps, 1) != 0:
                raise EvaluationError("llama.cpp's mtmd could not tokenize the picture prompt")
            past = llama_cpp.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(self._ctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(past)) != 0:
                raise EvaluationError("llama.cpp's mtmd could not evaluate the picture prompt")
            rows = [self._last_logits()]
            for token in answer_ids[:-1]:
                one = (llama_cpp.llama_token * 1)(token)
                if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                    raise EvaluationError("llama.cpp could not evaluate an answer token after the picture")
                rows.append(self._last_logits())
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
        return np.stack(rows)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp
        import numpy as np

        vocab = self._llama.n_vocab()
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llama._ctx.ctx, -1), shape=(vocab,)).copy()

    def close(self) -> None:
        self._mtmd.mtmd_free(self._ctx)
        self._llama.close()
