"""The ONNX builder's low-memory route: give it a prequantized checkpoint instead of the bf16 one.

Fed a bf16 checkpoint, onnxruntime-genai's builder loads the whole model with transformers, then
turns every weight into an fp32 protobuf before ONNX Runtime's weight-only quantizer runs over the
whole graph: about 19 GiB of anonymous memory for Phi-3.5-mini (3.8B), more than a 16 GB runner
has. The builder also reads prequantized checkpoints (``quantization_config.quant_method`` =
``olive``: ``qweight``/``scales``/``qzeros`` already in MatMulNBits layout) and then only copies
the packed weights. This module writes such a checkpoint one tensor at a time, quantizing each
decoder weight with the *same functions* the builder's own RTN/k-quant path calls
(``onnxruntime.quantization.neural_compressor.weight_only.quant_tensor`` and
``make_matmul_weight_only_node``), so the MatMulNBits weights and scales come out byte-identical
to the builder's direct route, and so do the logits (tested). With ``--lm-head`` a model's own LM
head is prequantized the same way (a tied one stays the builder's): then nothing is left for the
builder's whole-graph quantizer pass, which :mod:`hubquant.exporters.onnx_lean` skips, and the
builder never holds its graph twice. The
projections are written unfused (the builder fuses q/k/v again), and symmetric q/k/v carry
MatMulNBits' implied zero point explicitly, because the builder's olive reader needs zero points to
fuse them.

Run as a child process (``python -m hubquant.exporters.onnx_prequant SRC OUT …``) so its
per-tensor buffers leave with it; it never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hubquant.faults import checkpoint
from hubquant.safetensors_io import StreamingWriter, checkpoint_files, read_float32, read_header, read_raw

#: Decoder weights the builder turns into MatMulNBits (Phi-3/3.5/4/4-mini naming).
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))\.weight$")
ARCHITECTURES = ("Phi3ForCausalLM",)
ALGOS = ("rtn", "k_quant")
LM_HEAD = "lm_head.weight"
#: Weights per quantizer call (256 MB as float32): a larger weight is read and quantized in row chunks.
CHUNK_ELEMENTS = 1 << 26
SKIP_FILES = {"config.json"}


def builder_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The config the 0.18 builder can read, or None when the source's own one will do.

    The builder reads a long-rope model's mscale policy from ``rope_parameters["type"]``;
    transformers 5 saves only ``rope_type`` there, and the builder then stops with
    ``KeyError: 'type'``. The returned config carries both keys.
    """
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or rope.get("rope_type") != "longrope" or "type" in rope:
        return None
    return dict(config, rope_parameters={**rope, "type": rope["rope_type"]})


def link_companions(source: Path, view: Path, *, weights: bool) -> None:
    """Link the source's files into ``view`` (never config.json; weight files only with ``weights``),
    so the user's folder is never touched."""
    view.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        weight_file = item.suffix == ".safetensors" or item.name == "model.safetensors.index.json"
        skip = item.name in SKIP_FILES or item.name.startswith(".") or (weight_file and not weights)
        if not skip and not (view / item.name).exists():
            os.symlink(item.resolve(), view / item.name)


def unsupported_reason(config: dict[str, Any], folder: Path, *, precision: str, options: dict[str, Any]) -> str | None:
    """Why this source/variant cannot take the prequantized route (None when it can)."""
    if precision not in ("int4", "int8"):
        return f"{precision} is not a weight-only quantized precision"
    if options.get("target", "cpu") != "cpu":
        return f"the {options.get('target')} target is built directly"
    if options.get("algo") not in ALGOS:
        return f"algo {options.get('algo')} is MLAS's quantizer, applied by the builder itself"
    if options.get("quantize_embeddings"):
        return "quantized embeddings are applied by the builder itself"
    if not set(config.get("architectures") or []) & set(ARCHITECTURES):
        return f"{(config.get('architectures') or ['?'])[0]} is not one the prequantized route maps"
    if config.get("quantization_config"):
        return "the source is already quantized"
    files = checkpoint_files(folder)
    if not files:
        return "the source has no safetensors weights"
    for path in files:
        for entry in read_header(path)[0]:
            if LINEAR.match(entry.name) and (len(entry.shape) != 2 or entry.shape[1] % options["block_size"]):
                return f"{entry.name} {entry.shape} does not split into blocks of {options['block_size']}"
            if entry.dtype not in ("BF16", "F16", "F32") and entry.name.endswith(".weight"):
                return f"{entry.name} is stored as {entry.dtype}"
    return None


def quantize(
    weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool, algo: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One (out, in) float32 weight → (qweight (out, in·bits/8), scales (out, blocks), qzeros or None).

    Exactly what ``rtn_quantize`` does for one MatMul, through the same ORT functions.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.neural_compressor.weight_only import (
        make_matmul_weight_only_node,
        quant_tensor,
        quant_tensor_k_quant_cuda,
    )

    out_features, in_features = weight.shape
    k_blocks = in_features // block_size
    if algo == "k_quant":
        q_weight, scale, zero_point = quant_tensor_k_quant_cuda(weight, bits, block_size)
    else:
        q_weight, scale, zero_point = quant_tensor(weight, bits, block_size, "sym" if symmetric else "asym", "uint", 1)
    node = onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="w")
    _, initializers = make_matmul_weight_only_node(
        node=node,
        weight_shape=(in_features, out_features),
        num_bits=bits,
        group_size=block_size,
        k_blocks=k_blocks,
        q_weight=q_weight.astype("uint8"),
        scale=scale.astype(np.float32),
        zero_point=zero_point if (not symmetric or algo == "k_quant") else None,
    )
    arrays = {init.name: numpy_helper.to_array(init) for init in initializers}
    qweight = arrays[f"w_Q{bits}G{block_size}"].reshape(out_features, -1)
    scales = arrays["w_scale"].reshape(out_features, k_blocks)
    qzeros = arrays.get("w_zp")
    return qweight, scales, (qzeros.reshape(out_features, -1) if qzeros is not None else None)


def implied_zeros(rows: int, k_blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits' implied zero point (2**(bits-1)) written out, packed as it packs zero points.

    The builder's olive reader concatenates q/k/v zero points to fuse them, so symmetric q/k/v
    projections carry this explicit copy; the same values give the same products.
    """
    middle = 1 << (bits - 1)
    return np.full((rows, (k_blocks * bits + 7) // 8), middle | (middle << 4) if bits == 4 else middle, dtype=np.uint8)


def _needs_zeros(base: str, zeros: bool) -> bool:
    return zeros or base.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))


def _row_split(name: str, rows: int, config: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The separate projections a fused weight is written as: ``[(base name, first row, end row)]``.

    The builder's olive loader splits fused ``qkv_proj``/``gate_up_proj`` zero points at the wrong
    rows (it halves the row count as if they were packed along the output axis), so hubquant writes
    the projections separately; the builder fuses q/k/v again itself. Quantization blocks run along
    the input axis, so splitting rows changes no byte.
    """
    base = name.removesuffix(".weight")
    if base.endswith("self_attn.qkv_proj"):
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        q_size = config["num_attention_heads"] * head_dim
        kv_size = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
        stem = base.removesuffix("qkv_proj")
        return [
            (stem + "q_proj", 0, q_size),
            (stem + "k_proj", q_size, q_size + kv_size),
            (stem + "v_proj", q_size + kv_size, rows),
        ]
    if base.endswith("mlp.gate_up_proj"):
        stem = base.removesuffix("gate_up_proj")
        return [(stem + "gate_proj", 0, rows // 2), (stem + "up_proj", rows // 2, rows)]
    return [(base, 0, rows)]


def _quantized_layout(
    name: str, shape: tuple[int, ...], config: dict[str, Any], *, bits: int, block_size: int, zeros: bool
) -> list[tuple[str, str, tuple[int, ...]]]:
    out_features, in_features = shape
    k_blocks = in_features // block_size
    layout = []
    for base, first, end in _row_split(name, out_features, config):
        rows = end - first
        layout += [
            (f"{base}.qweight", "U8", (rows, in_features * bits // 8)),
            (f"{base}.scales", "F32", (rows, k_blocks)),
        ]
        if _needs_zeros(base, zeros):
            layout.append((f"{base}.qzeros", "U8", (rows, (k_blocks * bits + 7) // 8)))
    return layout


@dataclass(frozen=True)
class _Settings:
    bits: int
    block_size: int
    symmetric: bool
    algo: str
    zeros: bool
    config: dict[str, Any]
    #: ``lm_head.weight`` when the LM head is quantized here too
    lm_head: str | None = None

    def targets(self, name: str) -> list[str | None]:
        """What one source tensor is written as: ``None`` for itself unchanged, else the name of the
        weight it is quantized as."""
        return [name] if LINEAR.match(name) or name == self.lm_head else [None]


def lm_head_source(source: Path, config: dict[str, Any]) -> str | None:
    """``lm_head.weight`` when the checkpoint has its own LM head, else None.

    A model that ties its embeddings keeps the builder's own LM head quantization: given a quantized
    LM head, the builder ties the embedding lookup to it (``GatherBlockQuantized``) and cannot read
    the olive layout's scales for that.
    """
    if config.get("tie_word_embeddings"):
        return None
    names = {entry.name for path in checkpoint_files(source) for entry in read_header(path)[0]}
    return LM_HEAD if LM_HEAD in names else None


def _quantize_entry(
    path: Path, entry: Any, settings: _Settings, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One weight quantized, read and quantized ``chunk_elements`` weights of rows at a time.

    Quantization blocks run along the input axis, so each output row is quantized on its own: the
    chunks concatenated are the bytes of the whole weight quantized at once (tested), without the
    whole weight's float32 copy and the quantizer's temporaries at once (Phi-4's LM head: 2 GB).
    """
    rows, columns = entry.shape
    step = max(1, chunk_elements // columns)
    parts = [
        quantize(
            read_float32(path, entry, rows=(first, min(first + step, rows))),
            bits=settings.bits,
            block_size=settings.block_size,
            symmetric=settings.symmetric,
            algo=settings.algo,
        )
        for first in range(0, rows, step)
    ]
    qweight, scales, qzeros = (list(part) for part in zip(*parts, strict=True))
    return (np.concatenate(qweight), np.concatenate(scales), None if qzeros[0] is None else np.concatenate(qzeros))


def _drain(writer: StreamingWriter, pending: list[tuple[str, Future | bytes]], limit: int, settings: _Settings) -> None:
    """Write finished tensors in file order until at most ``limit`` are still pending."""
    while len(pending) > limit:
        name, job = pending.pop(0)
        if isinstance(job, bytes):
            writer.write(name, job)
            continue
        qweight, scales, qzeros = job.result()
        for base, first, end in _row_split(name, qweight.shape[0], settings.config):
            writer.write(f"{base}.qweight", qweight[first:end])
            writer.write(f"{base}.scales", scales[first:end])
            if _needs_zeros(base, settings.zeros):
                zeros = (
                    qzeros[first:end]
                    if qzeros is not None
                    else implied_zeros(end - first, scales.shape[1], settings.bits)
                )
                writer.write(f"{base}.qzeros", zeros)


def _write_shard(pool: ThreadPoolExecutor, path: Path, output: Path, settings: _Settings, workers: int) -> int:
    """One safetensors file of the checkpoint, quantized tensor by tensor in ``workers`` threads."""
    entries, _ = read_header(path)
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    for entry in entries:
        for target in settings.targets(entry.name):
            if target is None:
                layout.append((entry.name, entry.dtype, entry.shape))
            else:
                layout += _quantized_layout(
                    target,
                    entry.shape,
                    settings.config,
                    bits=settings.bits,
                    block_size=settings.block_size,
                    zeros=settings.zeros,
                )
    writer = StreamingWriter(output / path.name, layout, {"format": "pt"})
    pending: list[tuple[str, Future | bytes]] = []
    quantized = 0
    for entry in entries:
        for target in settings.targets(entry.name):
            if target is None:
                pending.append((entry.name, read_raw(path, entry)))
            else:
                pending.append((target, pool.submit(_quantize_entry, path, entry, settings)))
                quantized += 1
            _drain(writer, pending, workers, settings)
    _drain(writer, pending, 0, settings)
    writer.close()
    return quantized


def write_prequantized(
    source: Path,
    output: Path,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    algo: str,
    lm_head: bool = False,
    workers: int = 0,
    log=print,
) -> dict[str, Any]:
    """Write the olive-format checkpoint of ``source`` into ``output`` (an empty or new folder); with
    ``lm_head``, the LM head is quantized too."""
    checkpoint("onnx-prequantizing")
    output.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    # as rtn_quantize: symmetric RTN writes no zero points
    settings = _Settings(
        bits=bits,
        block_size=block_size,
        symmetric=symmetric,
        algo=algo,
        zeros=not symmetric or algo == "k_quant",
        config=config,
        lm_head=lm_head_source(source, config) if lm_head else None,
    )
    workers = workers or min(4, os.cpu_count() or 1)
    started = time.perf_counter()
    quantized = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path in checkpoint_files(source):
            quantized += _write_shard(pool, path, output, settings, workers)
            log(f"prequantized {path.name}")
    link_companions(source, output, weights=False)
    config = builder_config(config) or config
    config["quantization_config"] = {
        "quant_method": "olive",
        "bits": bits,
        "group_size": block_size,
        "sym": symmetric,
        "desc_act": False,
    }
    (output / "config.json").write_text(json.dumps(config, indent=2))
    return {
        "tensors_quantized": quantized,
        "lm_head": settings.lm_head is not None,
        "seconds": round(time.perf_counter() - started, 2),
        "workers": workers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hubquant.exporters.onnx_prequant")
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--asymmetric", action="store_true")
    parser.add_argument("--algo", choices=ALGOS, default="rtn")
    parser.add_argument("--lm-head", action="store_true", help="quantize the LM head too")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_prequantized(
        args.source,
        args.output,
        bits=args.bits,
        block_size=args.block_size,
        symmetric=not args.asymmetric,
        algo=args.algo,
        lm_head=args.lm_head,
        workers=args.workers,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
