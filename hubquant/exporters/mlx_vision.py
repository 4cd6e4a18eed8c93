"""Phi-4 with a SigLIP2 tower (``Phi4ForCausalLMV``) as MLX, through mlx-vlm (issue 19).

mlx-vlm's ``phi4_siglip`` model reads this checkpoint's tensor names, but mlx-vlm 0.7.10 needs transformers
≥ 5.14, which hubquant's other formats cannot live beside. So the conversion, and every measurement of an MLX
vision variant, runs in the ``mlx-vision`` environment (:mod:`hubquant.vision_env`): ``python -m
hubquant.exporters.mlx_vision convert PLAN`` converts with ``mlx_vlm.convert``, and the evaluation worker
runs there too (:meth:`~hubquant.exporters.mlx.MLXExporter.worker_python`), reading text with
:class:`MLXVisionRunner` and pictures with :class:`MLXVisionReader`.

What mlx-vlm would get wrong on its own, fixed in a staged copy of the source (never in the user's folder):

- its loader rebuilds the language model's config from a ``text_config`` block alone, with its defaults
  (40 layers, hidden 5120) for every key the block lacks; a checkpoint that keeps the Phi-3 keys at the top
  level gets a ``text_config`` holding them;
- its ``phi4_siglip`` language model reads ``rope_theta`` (500000 when absent) where transformers 5 writes
  ``rope_parameters``; the top-level rope keys are written as for mlx-lm. It applies no long-rope scaling,
  so a long-rope checkpoint is refused rather than computed wrongly.

mlx-vlm keeps the vision tower and projector unquantized (as mlx-community's vision repos ship them), at the
variant's float type: fp32 for an fp32 variant, else the source's 16-bit type (fp16 for an fp32 source).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import ExportError
from hubquant.exporters.mlx_common import MLX_PRECISIONS, MLXRunner, mlx_rope_keys

if TYPE_CHECKING:
    import numpy as np

    from hubquant.exporters.base import ExportJob, Progress
    from hubquant.source import SourceModel

#: The language model's keys mlx-vlm's ``phi4_siglip`` reads from ``text_config``.
TEXT_KEYS = (
    "vocab_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "rms_norm_eps",
    "hidden_size",
    "num_key_value_heads",
    "rope_theta",
    "partial_rotary_factor",
    "rope_scaling",
    "model_type",
)
#: The picture marker mlx-vlm's Phi-4-SigLIP processor replaces with the picture's features.
IMAGE_MARKER = "<image>"
FLOAT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def vision_dtype(precision: str, source_dtype: str) -> str:
    """The float type of a variant's unquantized tensors (the vision tower and projector among them)."""
    bits, dtype, _ = MLX_PRECISIONS[precision]
    if dtype is not None:
        return dtype
    return source_dtype if source_dtype in ("float16", "bfloat16") else "float16"


def rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level rope keys phi4_siglip reads, as for mlx-lm.

    Raises:
        ExportError: the checkpoint uses long-rope scaling, which mlx-vlm's phi4_siglip does not apply.
    """
    keys = mlx_rope_keys(config)
    kind = (keys.get("rope_scaling") or config.get("rope_scaling") or {}).get("type")
    if kind not in (None, "linear", "default"):
        raise ExportError(
            f"mlx-vlm's phi4_siglip model applies no {kind} rope scaling: the converted model would compute "
            "wrong numbers",
            format="mlx",
            hint="build this model as GGUF, which carries its rope scaling",
        )
    return keys


def staged_source(source: Path, staging: Path) -> Path:
    """The source as mlx-vlm must read it: every file linked, ``config.json`` completed (see the module text)."""
    config = json.loads((source / "config.json").read_text())
    config.update(rope_keys(config))
    block = dict(config.get("text_config") or {})
    config["text_config"] = {**block, **{key: config[key] for key in TEXT_KEYS if key in config}}
    staging.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (staging / item.name).symlink_to(item.resolve())
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return staging


def convert_vision(source: SourceModel, job: ExportJob, *, progress: Progress) -> None:
    """Convert one variant with ``mlx_vlm.convert`` in the mlx-vision environment, into ``job.folder``."""
    from hubquant.child import run_child
    from hubquant.vision_env import MLX, ensure_env

    rope_keys(source.config)  # refused here, before the environment is made
    python = ensure_env(progress, MLX)
    bits, _, recipe = MLX_PRECISIONS[job.precision]
    dtype = vision_dtype(job.precision, source.dtype)
    plan = {
        "source": str(source.path),
        "output": str(job.folder),
        "bits": bits,
        "group_size": job.options["group_size"],
        "dtype": dtype,
        "recipe": recipe,
    }
    plan_path = job.folder / ".mlx-vision-plan.json"
    plan_path.write_text(json.dumps(plan))
    child = run_child([str(python), "-m", __name__, "convert", str(plan_path)], name="mlx-vlm convert")
    plan_path.unlink()
    if child.returncode != 0:
        raise ExportError(
            f"mlx_vlm.convert failed: {child.reason()}",
            format="mlx",
            precision=job.precision,
            hint="run with HUBQUANT_DEBUG=1 for the full log",
        )
    job.settings = {**(job.settings or {}), "vision_weights": FLOAT_NAMES[dtype]}
    if bits is not None:
        job.warnings.append(
            f"mlx-vlm keeps the vision tower and projector unquantized ({FLOAT_NAMES[dtype]}) in the weights file; "
            "its size counts them"
        )


def _convert(plan: dict[str, Any]) -> None:
    """The child's side: stage the source, convert into a scratch folder inside the output, move the files up."""
    import contextlib
    import io

    from mlx_vlm import convert

    output = Path(plan["output"])
    source = staged_source(Path(plan["source"]), output / ".source")
    scratch = output / ".mlx-vlm"
    bits = plan["bits"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-vlm prints its progress
            convert(
                hf_path=str(source),
                mlx_path=str(scratch),
                quantize=bits is not None,
                q_bits=bits or 4,
                q_group_size=plan["group_size"],
                dtype=plan["dtype"],
                quant_predicate=plan["recipe"],
                trust_remote_code=False,
            )
        for item in scratch.iterdir():
            shutil.move(str(item), output / item.name)
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _load(path: Path) -> Any:
    from mlx_vlm.utils import load_model  # in hubquant's child: the broken CUDA torchvision is already hidden

    return load_model(path)


def image_processor(path: Path) -> Any:
    """The image processor mlx-vlm's Phi-4-SigLIP processor makes for a NaFlex tower, in transformers' PIL form.

    mlx-vlm builds transformers' torchvision ``Siglip2ImageProcessor``; torchvision cannot load beside CPU torch
    here (STACK.md), and mlx-vlm then silently falls back to a bare tokenizer, which reads no picture. The PIL
    form takes the same settings (patch size, fewest and most patches, mean and std 0.5, bilinear resize);
    every MLX variant is read through it, so the figures compare like with like."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    config = json.loads((path / "config.json").read_text())
    return Siglip2ImageProcessorPil(
        patch_size=config["vision_config"]["patch_size"],
        max_num_patches=config.get("max_num_patches", 3600),
        min_num_patches=config.get("min_num_patches", 256),
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


class MLXVisionRunner(MLXRunner):
    """An MLX vision variant's language model on text (mlx-vlm's, fed token ids)."""

    def __init__(self, path: Path) -> None:
        import mlx.core as mx

        self._mx = mx
        self.model = _load(path).language_model
        self._cache: Any = None

    def _forward(self, ids: Any, cache: Any) -> Any:
        return self.model(ids, cache=cache).logits

    def _new_cache(self) -> Any:
        from mlx_vlm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)


class MLXVisionReader:
    """A variant reading a picture with its question as mlx-vlm's Phi-4-SigLIP does: the NaFlex patches from its
    image processor, the prompt's ``<image>`` replaced by the projected features; the logits before every
    answer token."""

    def __init__(self, path: Path) -> None:
        import mlx.core as mx
        from transformers import AutoTokenizer

        self._mx = mx
        self._model = _load(path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._images = image_processor(path)

    def answer_logits(self, question: str, answer: str, pixels: np.ndarray) -> np.ndarray:
        import numpy as np
        from mlx_vlm.models.phi4_siglip.processing_phi4_siglip import tokenizer_image_token
        from PIL import Image

        from hubquant.images import prompt_text

        mx, tokenizer = self._mx, self._tokenizer
        head = tokenizer_image_token(prompt_text(question, IMAGE_MARKER), tokenizer)
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
        ids = mx.array([head + answer_ids])
        image = self._images([Image.fromarray(pixels)], return_tensors="np")
        embeds = self._model.get_input_embeddings(
            ids,
            mx.array(image["pixel_values"]),
            spatial_shapes=mx.array(image["spatial_shapes"]),
            pixel_attention_mask=mx.array(image["pixel_attention_mask"]),
        ).inputs_embeds
        logits = self._model.language_model(ids, inputs_embeds=embeds).logits[0].astype(mx.float32)
        mx.eval(logits)
        total = logits.shape[0]
        return np.array(logits[total - len(answer_ids) - 1 : total - 1], dtype=np.float32)

    def close(self) -> None:
        del self._model


VISION_SNIPPETS = """mlx-vlm reads pictures with it:

```bash
pip install mlx-vlm
mlx_vlm.generate --model {repo} --image picture.png --prompt "Describe the picture." --max-tokens 64
```

```python
from mlx_vlm import load, generate
from mlx_vlm.prompt_utils import apply_chat_template
model, processor = load("{repo}")
prompt = apply_chat_template(processor, model.config, "Describe the picture.", num_images=1)
print(generate(model, processor, prompt, ["picture.png"], max_tokens=64).text)
```"""


def main(argv: list[str]) -> int:
    if argv[:1] != ["convert"] or len(argv) != 2:
        print("usage: python -m hubquant.exporters.mlx_vision convert PLAN.json", file=sys.stderr)
        return 2
    _convert(json.loads(Path(argv[1]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
