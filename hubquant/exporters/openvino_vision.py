"""Phi-4-multimodal (transformers' ``Phi4MultimodalForCausalLM``) as OpenVINO IR, and how it is read (issue 19).

The export runs in the vision environment (:mod:`hubquant.vision_env`, transformers 4.53.3) as
:mod:`hubquant.exporters.openvino_vision_worker`. Each variant folder is the model set optimum-intel's
``OVModelForVisualCausalLM`` loads: ``openvino_language_model`` (takes ``inputs_embeds``),
``openvino_text_embeddings_model``, ``openvino_vision_embeddings_model`` (SigLIP), ``openvino_vision_projection_model``,
the audio models, the tokenizer IRs and the configs.

hubquant reads a variant with the OpenVINO runtime directly, as :class:`~hubquant.exporters.openvino.OpenVINORunner`
reads a text IR: the IRs fed exactly as ``OVModelForVisualCausalLM`` feeds them for a one-crop picture (the
encoder's features with the row separators ``sub_GN`` and the global separator ``glb_GN`` from config.json,
the crop before the global view, projected into the prompt's image-token places). Importing optimum-intel
would need transformers 4.53.3 in the measuring process. A test checks that the logits are the ones
``OVModelForVisualCausalLM`` gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.child import run_child
from hubquant.errors import ExportError
from hubquant.exporters.runner import Runner

if TYPE_CHECKING:
    import numpy as np

    from hubquant.exporters.base import ExportJob, Progress
    from hubquant.source import SourceModel

ARCHITECTURE = "Phi4MultimodalForCausalLM"
#: Inference precision every OpenVINO evaluation runs at, so figures compare across machines
#: (CPUs with AMX/AVX512-FP16 would otherwise default to bf16/f16 compute).
INFERENCE_PRECISION = "f32"
LANGUAGE, TEXT_EMBEDDINGS = "openvino_language_model.xml", "openvino_text_embeddings_model.xml"
VISION_EMBEDDINGS, VISION_PROJECTION = "openvino_vision_embeddings_model.xml", "openvino_vision_projection_model.xml"


def decoder_feed(inputs: set[str], start: int, total: int) -> dict[str, Any]:
    """What an optimum-intel stateful decoder takes beside its tokens or embeddings, for positions
    ``start`` … ``total - 1`` after ``start`` already in its state (as ``OVModelForCausalLM`` feeds it)."""
    import numpy as np

    feed: dict[str, Any] = {}
    if "attention_mask" in inputs:
        feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
    if "position_ids" in inputs:
        feed["position_ids"] = np.arange(start, total, dtype=np.int64)[None, :]
    if "beam_idx" in inputs:
        feed["beam_idx"] = np.zeros(1, dtype=np.int32)
    return feed


def is_vision_folder(path: Path) -> bool:
    return (path / LANGUAGE).is_file()


def encoder_roles(folder: Path) -> dict[str, str]:
    """The picture and audio encoders' IRs: shipped beside the language model, not counted in its size (as a
    GGUF's mmproj is not), so size and bits per weight describe the quantized language model."""
    if not folder.is_dir():
        return {}
    roles = {}
    for path in folder.iterdir():
        if path.name.startswith("openvino_vision_") and path.suffix in (".xml", ".bin"):
            roles[path.name] = "vision encoder"
        elif path.name.startswith("openvino_audio_") and path.suffix in (".xml", ".bin"):
            roles[path.name] = "audio encoder"
    return roles


def export_vision(
    source: SourceModel, jobs: list[ExportJob], *, work_dir: Path, progress: Progress
) -> tuple[dict[str, Any], Any]:
    """Run the worker in the vision environment; its per-variant outcome and the child's result."""
    from hubquant.vision_env import ensure_env

    python = ensure_env(progress)
    plan = {
        "source": str(source.path),
        "work_dir": str(work_dir),
        "jobs": [
            {"name": job.name, "folder": str(job.folder), "precision": job.precision, "options": job.options}
            for job in jobs
        ],
    }
    plan_path, result_path = work_dir / "openvino-vision-plan.json", work_dir / "openvino-vision-result.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    worker = "hubquant.exporters.openvino_vision_worker"
    command = [str(python), "-m", worker, "export", str(plan_path), str(result_path)]
    child = run_child(command, name="openvino vision worker", progress=progress)
    return (json.loads(result_path.read_text()) if result_path.is_file() else {}), child


def picture_reference(source: Path, out: Path) -> None:
    """The PyTorch model's answer logits on the built-in pictures, into ``out`` (in the vision environment)."""
    from hubquant.errors import EvaluationError
    from hubquant.vision_env import ensure_env

    python = ensure_env()
    command = [str(python), "-m", "hubquant.exporters.openvino_vision_worker", "reference", str(source), str(out)]
    child = run_child(command, name="picture reference")
    if child.returncode != 0:
        raise EvaluationError(
            f"the PyTorch reference could not read the pictures: {child.reason()}",
            hint="run with HUBQUANT_DEBUG=1 for the full log",
        )


class _Compiled:
    """The variant's IRs compiled for the CPU at fp32 inference precision."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        if not is_vision_folder(path):
            raise ExportError(f"{path} has no {LANGUAGE}", format="openvino", hint="point at a folder hubquant built")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION, "PERFORMANCE_HINT": "LATENCY"}
        language = core.read_model(path / LANGUAGE)
        self.inputs = {port.get_any_name() for port in language.inputs}
        self.language = core.compile_model(language, "CPU", config).create_infer_request()
        self.embed = core.compile_model(path / TEXT_EMBEDDINGS, "CPU", config)
        self.path, self.core, self.config = path, core, config
        self.length = 0

    def forward(self, embeds: np.ndarray, *, fresh: bool) -> np.ndarray:
        """Logits after feeding ``embeds`` ``[1, n, hidden]`` (from an empty state when ``fresh``)."""

        if fresh:
            self.language.reset_state()
            self.length = 0
        total = self.length + embeds.shape[1]
        self.language.infer({"inputs_embeds": embeds, **decoder_feed(self.inputs, self.length, total)})
        self.length = total
        return self.language.get_tensor("logits").data[0]

    def text(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        return np.array(self.embed(np.asarray([list(ids)], dtype=np.int64))[0], dtype=np.float32)


class OpenVINOVisionRunner(Runner):
    """A Phi-4-multimodal variant's language model on text: text embeddings, then the language model."""

    def __init__(self, path: Path) -> None:
        self._model = _Compiled(path)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        return np.array(self._model.forward(self._model.text(ids), fresh=True), dtype=np.float32)

    def prefill(self, ids: Sequence[int], *, room: int) -> int:
        return int(self._model.forward(self._model.text(ids), fresh=True)[-1].argmax())

    def step(self, token: int) -> int:
        return int(self._model.forward(self._model.text([token]), fresh=False)[-1].argmax())

    def close(self) -> None:
        del self._model


class OpenVINOVisionReader:
    """A variant reading a built-in picture with its question; the logits before every answer token."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        from hubquant.phi4mm_inputs import PromptIds

        self._model = _Compiled(path)
        core, config = self._model.core, self._model.config
        self._vision = core.compile_model(path / VISION_EMBEDDINGS, "CPU", config)
        self._projection = core.compile_model(path / VISION_PROJECTION, "CPU", config)
        settings = json.loads((path / "config.json").read_text())
        hidden = settings["vision_config"]["hidden_size"]
        self._sub = np.asarray(settings["sub_GN"], dtype=np.float32).reshape(1, 1, hidden)
        self._glb = np.asarray(settings["glb_GN"], dtype=np.float32).reshape(1, hidden)
        self._ids = PromptIds(path, int(settings["vision_config"]["image_token_id"]))

    def _picture(self, pixels: np.ndarray) -> np.ndarray:
        """The picture's projected features, in the order the prompt's image tokens take them."""
        import numpy as np

        from hubquant.phi4mm_inputs import image_attention_mask, pixel_values

        crops = pixel_values(pixels)[0]  # [global, crop]
        mask = image_attention_mask()[0]
        positions = np.tile(np.arange(mask[0].size, dtype=np.int64), (len(crops), 1))  # no padding: 0 … n-1
        features = self._vision({"pixel_values": crops, "patch_attention_mask": mask, "patch_position_ids": positions})
        features = np.asarray(features[0], dtype=np.float32)  # [2, side², hidden]
        side = int(round(features.shape[1] ** 0.5))

        def with_rows(grid: np.ndarray) -> np.ndarray:  # a separator after every row of features
            rows = grid.reshape(side, side, -1)
            return np.concatenate([rows, np.repeat(self._sub, side, axis=0)], axis=1).reshape(-1, rows.shape[-1])

        merged = np.concatenate([with_rows(features[1]), self._glb, with_rows(features[0])])[None]
        return np.asarray(self._projection(merged)[0], dtype=np.float32)[0]

    def answer_logits(self, question: str, answer: str, pixels: np.ndarray) -> np.ndarray:
        """The logits before every answer token, given the picture and the question (teacher forcing)."""
        import numpy as np

        head, answer_ids = self._ids(question, answer)
        ids = head + answer_ids
        embeds = self._model.text(ids)
        places = np.flatnonzero(np.asarray(ids) == self._ids.image_token_id)
        embeds[0, places] = self._picture(pixels)
        logits = self._model.forward(embeds, fresh=True)
        return np.array(logits[len(head) - 1 : len(ids) - 1], dtype=np.float32)

    def close(self) -> None:
        del self._model, self._vision, self._projection


VISION_SNIPPETS = """optimum-intel (with transformers<=4.53.3, which its Phi-4-multimodal class requires):

```python
from PIL import Image
from optimum.intel import OVModelForVisualCausalLM
from transformers import AutoProcessor
model = OVModelForVisualCausalLM.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
inputs = processor(text="<|user|><|image|>What is in the picture?<|end|><|assistant|>",
                   images=[Image.open("picture.png")], return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```

openvino-genai's `VLMPipeline` (2026.4) does not take `phi4_multimodal` yet: it runs `phi4mm`, the remote-code
form of the same model."""
