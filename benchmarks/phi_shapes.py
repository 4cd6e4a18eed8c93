"""Random-weight checkpoints with the exact shapes of published Phi models, for scale benchmarks.

Weights are written tensor by tensor straight into safetensors shards (bf16, N(0, 0.02)), so no
full copy of the model is ever in memory: peak memory is one tensor. The tokenizer is hubquant's
tiny one (Phi-3 SentencePiece or Phi-4 byte-level BPE); ``vocab_size`` in the config is the real
model's, so the embedding and LM head have the real size and every converter pads the vocabulary
as it does for the published checkpoints.

    python benchmarks/phi_shapes.py phi-3.5-mini /data/phi35-shape            # 3.82B, 7.64 GB
    python benchmarks/phi_shapes.py phi-3.5-mini /tmp/small --layers 2 --scale 8   # a scaled-down smoke shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import hubquant  # noqa: F401 - first: its import work-arounds (hubquant._compat) must precede transformers
from hubquant.safetensors_io import StreamingWriter

#: The published configurations (from each model's config.json on the Hub).
SHAPES: dict[str, dict] = {
    "phi-3.5-mini": {
        "style": "phi3",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
        "partial_rotary_factor": 1.0,
        "long_rope": True,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
    },
    "phi-4-mini": {
        "style": "phi4",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 200064,
        "tie_word_embeddings": True,
        "partial_rotary_factor": 0.75,
        "long_rope": True,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
    },
    "phi-4": {
        "style": "phi4",
        "hidden_size": 5120,
        "intermediate_size": 17920,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 10,
        "vocab_size": 100352,
        "tie_word_embeddings": False,
        "partial_rotary_factor": 1.0,
        "long_rope": False,
        "max_position_embeddings": 16384,
        "original_max_position_embeddings": 16384,
    },
}
SHARD_BYTES = 2_000_000_000
ROWS_PER_CHUNK = 256


def shape_config(name: str, *, layers: int | None = None, scale: int = 1) -> dict:
    """The shape, optionally scaled down (``scale`` divides widths, keeping multiples of 256)."""
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    if scale > 1:
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        shape["num_attention_heads"] = max(1, shape["num_attention_heads"] // scale)
        shape["num_key_value_heads"] = max(1, shape["num_key_value_heads"] // scale)
        shape["hidden_size"] = shape["num_attention_heads"] * head_dim
        shape["intermediate_size"] = max(256, shape["intermediate_size"] // scale // 256 * 256)
    return shape


def tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Phi3ForCausalLM's tensor names and shapes, in file order."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.qkv_proj.weight", (qkv, h)),
            (p + "self_attn.o_proj.weight", (h, shape["num_attention_heads"] * head_dim)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_up_proj.weight", (2 * f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def _bf16_rows(rng: np.random.Generator, rows: int, cols: int, norm: bool) -> bytes:
    values = np.ones((rows, cols), np.float32) if norm else rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_weights(folder: Path, shape: dict, *, seed: int = 0) -> int:
    """Write the shards and the index; return the number of parameters."""
    rng = np.random.default_rng(seed)
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in tensors(shape):
        nbytes = int(np.prod(dims)) * 2
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((name, dims))
        size += nbytes
    weight_map, total = {}, 0
    for index, shard in enumerate(plan, 1):
        file_name = f"model-{index:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1 else "model.safetensors"
        writer = StreamingWriter(folder / file_name, [(name, "BF16", dims) for name, dims in shard], {"format": "pt"})
        try:
            for name, dims in shard:
                rows, cols = (dims[0], dims[1]) if len(dims) == 2 else (1, dims[0])
                writer.write(
                    name,
                    (
                        _bf16_rows(rng, min(ROWS_PER_CHUNK, rows - start), cols, norm=len(dims) == 1)
                        for start in range(0, rows, ROWS_PER_CHUNK)
                    ),
                )
                weight_map[name] = file_name
                total += int(np.prod(dims))
        finally:
            writer.close()
    if len(plan) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2)
        )
    return total


def generate(name: str, output: Path, *, layers: int | None = None, scale: int = 1, seed: int = 0) -> Path:
    """Write a complete checkpoint folder (config, tokenizer, weights) at ``output``, atomically."""
    from transformers import Phi3Config

    from hubquant.artifact import atomic_folder
    from hubquant.tiny import _rope, _train_bytelevel_bpe, _train_sentencepiece, corpus_text

    shape = shape_config(name, layers=layers, scale=scale)
    with atomic_folder(output) as folder:
        text = corpus_text()[:600_000]
        (_train_sentencepiece if shape["style"] == "phi3" else _train_bytelevel_bpe)(text, folder)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        config = Phi3Config(
            vocab_size=shape["vocab_size"],
            hidden_size=shape["hidden_size"],
            intermediate_size=shape["intermediate_size"],
            num_hidden_layers=shape["num_hidden_layers"],
            num_attention_heads=shape["num_attention_heads"],
            num_key_value_heads=shape["num_key_value_heads"],
            max_position_embeddings=shape["max_position_embeddings"],
            original_max_position_embeddings=shape["original_max_position_embeddings"],
            rope_parameters=_rope(
                shape["hidden_size"], shape["num_attention_heads"], shape["partial_rotary_factor"], shape["long_rope"]
            ),
            tie_word_embeddings=shape["tie_word_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rms_norm_eps=1e-5,
        )
        config.architectures = ["Phi3ForCausalLM"]
        config.torch_dtype = "bfloat16"
        config.save_pretrained(folder)
        (folder / "generation_config.json").write_text(
            json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id})
        )
        count = write_weights(folder, shape, seed=seed)
        (folder / "README.md").write_text(
            f"---\nlicense: mit\n---\n# Random weights shaped like {name}\n\n"
            f"{count:,} parameters, bf16, N(0, 0.02). For benchmarks only.\n"
        )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--layers", type=int, help="fewer layers (a scaled-down shape)")
    parser.add_argument("--scale", type=int, default=1, help="divide widths by this (a scaled-down shape)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists():
        parser.error(f"{args.output} exists")
    free = shutil.disk_usage(args.output.parent if args.output.parent.exists() else tempfile.gettempdir()).free
    need = sum(int(np.prod(d)) * 2 for _, d in tensors(shape_config(args.shape, layers=args.layers, scale=args.scale)))
    if need * 1.05 > free:
        parser.error(f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    print(generate(args.shape, args.output, layers=args.layers, scale=args.scale, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
