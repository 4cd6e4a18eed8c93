"""Phi-4-multimodal to OpenVINO, run in the vision environment (:mod:`hubquant.vision_env`) as
``python -m hubquant.exporters.openvino_vision_worker export PLAN RESULT`` or ``… reference SOURCE OUT``.

``export``: optimum-intel's ``image-text-to-text`` export writes the model set openvino-genai and
``OVModelForVisualCausalLM`` load (language model, text embeddings, vision embeddings and projection, the
audio parts, tokenizer and detokenizer). fp16/fp32 variants are that export; int4/int8 variants start
from one fp32 export and NNCF compresses each IR data-free: the language model at the variant's precision
(int4: the Phi cookbook's INT4_SYM, group 64, ratio 0.6 unless the recipe sets group_size/sym/ratio), the
token embeddings and the picture and audio encoders at INT8_ASYM as optimum-intel does for vision models
(``vision_weights=unquantized`` keeps the encoders at fp32).

``reference``: the PyTorch model reads every built-in picture (:mod:`hubquant.phi4mm_inputs`) and keeps
its answer logits, the reference the OpenVINO floor is scored against. It runs with eager attention:
transformers' SDPA path marks the SigLIP encoder's attention causal (``is_causal = True`` on
``Phi4MultimodalVisionAttention``), so without a padding mask each patch would see only the patches
before it, which is not the model the checkpoint was trained as (nor what optimum-intel exports).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hubquant  # noqa: F401 - hides a torchvision that cannot load beside this torch
from hubquant.child import hand_back, release_memory, say
from hubquant.faults import checkpoint

TASK = "image-text-to-text"
LANGUAGE, TEXT_EMBEDDINGS = "openvino_language_model", "openvino_text_embeddings_model"
#: int4 settings of the Phi cookbook's OpenVINO recipe for the vision models.
COOKBOOK_INT4 = {"sym": True, "group_size": 64, "ratio": 0.6}
#: Options of the text route the vision route does not take (yet).
TEXT_ONLY = ("awq", "scale_estimation", "gptq", "dataset", "num_samples", "all_layers", "backup_precision")


def export_ir(source: str, folder: Path, dtype: str) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(source, folder, task=TASK, ov_config=OVConfig(dtype=dtype), convert_tokenizer=True)
    if not (folder / f"{LANGUAGE}.xml").is_file():
        raise RuntimeError(f"optimum-intel wrote no {LANGUAGE}.xml")


def settings_of(precision: str, options: dict[str, Any]) -> dict[str, Any]:
    """NNCF's settings for one variant, as the manifest records them."""
    unused = [key for key in TEXT_ONLY if options.get(key) not in (None, False)]
    if unused:
        raise ValueError(f"option {unused[0]} is not built for vision models; drop it (or build the text model)")
    encoders = options.get("vision_weights") or "int8"
    if precision == "int8":
        language = {"bits": 8, "sym": bool(options.get("sym")), "group_size": -1, "ratio": 1.0}
    else:  # setting any of them replaces the cookbook's settings, as any option replaces the text route's defaults
        given = {key: options[key] for key in ("sym", "group_size", "ratio") if options.get(key) is not None}
        language = {"bits": 4, **(COOKBOOK_INT4 if not given else {"sym": False, "group_size": 128, "ratio": 1.0})}
        language.update(given)
    return {**language, "vision_weights": encoders}


def compress_folder(folder: Path, settings: dict[str, Any]) -> None:
    """NNCF data-free compression of every IR in a copy of the fp32 export."""
    import nncf
    import openvino as ov

    core = ov.Core()
    for xml in sorted(folder.glob("openvino_*_model.xml")):
        if xml.stem in ("openvino_tokenizer", "openvino_detokenizer"):
            continue
        if xml.stem == LANGUAGE:
            if settings["bits"] == 8:
                mode = nncf.CompressWeightsMode.INT8_SYM if settings["sym"] else nncf.CompressWeightsMode.INT8_ASYM
                arguments: dict[str, Any] = {"mode": mode}
            else:
                mode = nncf.CompressWeightsMode.INT4_SYM if settings["sym"] else nncf.CompressWeightsMode.INT4_ASYM
                arguments = {"mode": mode, "group_size": settings["group_size"], "ratio": settings["ratio"]}
        elif settings["vision_weights"] == "int8" or xml.stem == TEXT_EMBEDDINGS:
            arguments = {"mode": nncf.CompressWeightsMode.INT8_ASYM}  # the token embeddings: int8, as optimum-intel
        else:
            continue
        model = nncf.compress_weights(core.read_model(xml), **arguments)
        staged = xml.with_name(xml.stem + ".tmp.xml")
        ov.save_model(model, staged, compress_to_fp16=False)
        del model
        xml.with_suffix(".bin").unlink()
        staged.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        staged.replace(xml)


def failure(exc: BaseException) -> dict[str, Any]:
    text = str(exc).strip().splitlines()
    return {
        "message": f"OpenVINO vision export failed: {type(exc).__name__}: {text[0] if text else ''}".rstrip(": "),
        "hint": getattr(exc, "hint", None) or "HUBQUANT_DEBUG=1 shows the exporter's log",
    }


def _one(plan: dict[str, Any], job: dict[str, Any], base: dict[str, Path]) -> dict[str, Any]:
    folder, precision = Path(job["folder"]), job["precision"]
    started = time.perf_counter()
    if precision in ("fp16", "fp32"):
        say(f"openvino {precision}: exporting the vision model set with optimum-intel")
        export_ir(plan["source"], folder, precision)
        if precision == "fp32":
            base.setdefault("fp32", folder)  # the compressed variants start from it: no second export
        return {"seconds": time.perf_counter() - started, "settings": {"vision_weights": precision}}
    settings = settings_of(precision, job["options"])
    shared = 0.0
    if "fp32" not in base:
        say("openvino: exporting the fp32 vision model set (once for every int4/int8 variant)")
        base["fp32"] = Path(plan["work_dir"]) / "openvino-vision-ir"
        export_ir(plan["source"], base["fp32"], "fp32")
        release_memory()
        shared = time.perf_counter() - started
    encoders = settings["vision_weights"]
    say(f"openvino {precision}: compressing with NNCF (language model {precision}, encoders {encoders})")
    began = time.perf_counter()
    shutil.copytree(base["fp32"], folder, dirs_exist_ok=True)
    compress_folder(folder, settings)
    return {"seconds": time.perf_counter() - began, "shared_seconds": shared, "settings": settings}


def export(plan: dict[str, Any]) -> dict[str, Any]:
    checkpoint("openvino-exporting")
    results: dict[str, Any] = {}
    base: dict[str, Path] = {}
    order = {"fp32": 0, "fp16": 1}  # an fp32 variant first: the int4/int8 variants are compressed from it
    for job in sorted(plan["jobs"], key=lambda job: order.get(job["precision"], 2)):
        try:
            results[job["name"]] = {"warnings": [], **_one(plan, job, base)}
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            results[job["name"]] = {"error": failure(exc)}
    if "fp32" in base and base["fp32"].parent == Path(plan["work_dir"]):
        shutil.rmtree(base["fp32"], ignore_errors=True)
    return results


def reference(source: Path, out: Path) -> None:
    """The PyTorch model's answer logits on every built-in picture, as ``image-logits-N.npy``."""
    import numpy as np
    import torch
    from transformers import Phi4MultimodalForCausalLM

    from hubquant.images import IMAGE_PROMPTS
    from hubquant.phi4mm_inputs import PromptIds, image_attention_mask, image_sizes, pixel_values

    model = Phi4MultimodalForCausalLM.from_pretrained(source, attn_implementation="eager", torch_dtype=torch.float32)
    model.eval()
    ids_of = PromptIds(source, model.config.vision_config.image_token_id)
    out.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(IMAGE_PROMPTS):
        head, answer = ids_of(prompt.question, prompt.answer)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([head + answer]),
                image_pixel_values=torch.from_numpy(pixel_values(prompt.pixels())),
                image_sizes=torch.from_numpy(image_sizes()),
                image_attention_mask=torch.from_numpy(image_attention_mask()),
            ).logits[0, len(head) - 1 : -1]
        np.save(out / f"image-logits-{index}.npy", logits.float().numpy())


def main(argv: list[str]) -> int:
    if argv[0] == "reference":
        reference(Path(argv[1]), Path(argv[2]))
        return 0
    plan_path, result_path = Path(argv[1]), Path(argv[2])
    plan = json.loads(plan_path.read_text())
    try:
        results = export(plan)
    except Exception as exc:  # noqa: BLE001 - a broken environment: every variant fails alike
        traceback.print_exc()
        results = {job["name"]: {"error": failure(exc)} for job in plan["jobs"]}
    hand_back(result_path, json.dumps(results, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
