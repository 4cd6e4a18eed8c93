"""Image-conditioned fidelity of a vision variant (issue 19): how far quantization moves the answers the
model gives about pictures, measured in the runtime that reads them.

Every built-in picture (:mod:`hubquant.images`) is read with its question, and the answer is fed token
by token; at every answer position the variant's next-token distribution is compared with the same
position of the runtime's unquantized form (the language model at full precision with the most faithful
projector, its *floor*): KL and top-1 agreement, each with its standard error over the answer tokens.
The variant is read once with each projector it ships (``mmproj`` F16 and Q8_0 for GGUF), so the card
tells what the quantized language model costs and what the smaller projector adds.

No PyTorch class runs ``Phi4ForCausalLMV`` (transformers has none), so its figures compare with the
runtime's own unquantized form only; the runtime's deviation from the original on pictures is not
measured, and the card says so. ``Phi4MultimodalForCausalLM`` has one: the reference run also reads the
pictures in PyTorch (in the vision environment, on the very ids and pixels the variants read), and every
variant is compared with it too, so the floor's figure against it is the runtime's own deviation.
Each prompt is also read with another picture of the set: the *image
effect* (KL between the answers given the right picture and a wrong one) says how much the picture
moves the answer at all, the scale a quantization KL is read against.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.records import ImageResults, ImageScore

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact

#: What the figures compare with when PyTorch reads the pictures too, said on the cards.
WITH_REFERENCE = (
    "'KL from quantization' compares each variant with {runtime}'s own unquantized form ({floor}); 'KL from the "
    "original' compares it with PyTorch's {architecture} (transformers 4.53.3, eager attention) on the same ids "
    "and pixels, so the floor's figure there is the runtime's own deviation, never counted as quantization loss"
)
#: What the quantization-only figures compare with, said on the cards.
NO_REFERENCE = (
    "No PyTorch reference reads the pictures (transformers has no class for {architecture}): these figures "
    "compare each variant with {runtime}'s own unquantized form ({floor}), not with the original model"
)


def _read_all(reader: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every prompt's answer logits with its own picture, and with the next picture of the set."""
    from hubquant.images import IMAGE_PROMPTS

    own, swapped = [], []
    for index, prompt in enumerate(IMAGE_PROMPTS):
        own.append(reader.answer_logits(prompt.question, prompt.answer, prompt.pixels()))
        other = IMAGE_PROMPTS[(index + 1) % len(IMAGE_PROMPTS)]
        swapped.append(reader.answer_logits(prompt.question, prompt.answer, other.pixels()))
    return own, swapped


def _originals(reference: Path) -> list[np.ndarray] | None:
    """The PyTorch model's answer logits on the pictures, where the reference run read them."""
    import numpy as np

    from hubquant.images import IMAGE_PROMPTS

    if not (reference / "image-logits-0.npy").is_file():
        return None
    return [np.load(reference / f"image-logits-{index}.npy") for index in range(len(IMAGE_PROMPTS))]


def _against(own: list[np.ndarray], bases: list[np.ndarray]) -> dict[str, Any]:
    """KL (base ‖ own) and top-1 agreement over every answer token, with their standard errors."""
    import numpy as np

    from hubquant.stats import kl_divergence, mean, proportion

    vocab = min(bases[0].shape[-1], own[0].shape[-1])
    pairs = [(a[:, :vocab], b[:, :vocab]) for a, b in zip(own, bases, strict=True)]
    kl = np.concatenate([kl_divergence(b, a) for a, b in pairs])
    agree = np.concatenate([b.argmax(-1) == a.argmax(-1) for a, b in pairs])
    return {"kl_mean": mean(kl).pair(), "top1": proportion(agree).pair()}


def reference_pictures(source: Any, folder: Path) -> None:
    """The reference run's side: PyTorch reads the pictures too, where a transformers class runs the model."""
    if source.architecture == "Phi4MultimodalForCausalLM":
        from hubquant.exporters.openvino_vision import picture_reference

        picture_reference(source.path, folder)


def score_images(artifact: Artifact, job: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's side: read the pictures with each projector; keep the floor's logits or compare with them.

    Returns None for a text model (or a format that reads no pictures)."""
    import numpy as np

    from hubquant.exporters import get_exporter
    from hubquant.images import IMAGE_PROMPTS
    from hubquant.stats import kl_divergence, mean

    exporter = get_exporter(artifact.format)()
    projectors = exporter.image_projectors(artifact)
    if not artifact.manifest.source.vision_parts or not projectors:
        return None
    keep = Path(job["keep_logits"]) if job.get("keep_logits") else None
    floor = Path(job["floor"]) if job.get("floor") else None
    if floor is not None and not (floor / "image-logits-0.npy").is_file():
        floor = None  # a floor measured before pictures were read: no picture figures against it
    scores: dict[str, Any] = {}
    bases: list[np.ndarray] | None = None
    originals = _originals(Path(job["reference"])) if job.get("reference") else None
    if floor is not None:
        bases = [np.load(floor / f"image-logits-{index}.npy") for index in range(len(IMAGE_PROMPTS))]
    for position, projector in enumerate(projectors):
        reader = exporter.image_reader(artifact, projector)
        try:
            own, swapped = _read_all(reader)
        finally:
            reader.close()
        effect = np.concatenate([kl_divergence(a, b) for a, b in zip(own, swapped, strict=True)])
        entry: dict[str, Any] = {"image_effect_kl": mean(effect).pair(), "answer_tokens": int(effect.size)}
        if originals is not None:
            entry["reference"] = _against(own, originals)
        if keep is not None and position == 0:  # the floor: its most faithful projector's answers
            for index, logits in enumerate(own):
                np.save(keep / f"image-logits-{index}.npy", logits.astype(np.float32))
            bases = own  # its other projectors are scored against them: the projector's quantization alone
        elif bases is not None:
            entry["floor"] = _against(own, bases)
        scores[projector] = entry
    return {"projectors": scores, "prompts": len(IMAGE_PROMPTS)}


def image_results(
    result: dict[str, Any] | None, *, floor: str | None, runtime: str, architecture: str
) -> ImageResults | None:
    """The record of a worker's picture figures (None when it read none)."""
    if not result:
        return None
    rows = []
    referenced = False
    for projector, entry in result["projectors"].items():
        effect, base = entry["image_effect_kl"], entry.get("floor") or {}
        kl, top1 = base.get("kl_mean") or [None, None], base.get("top1") or [None, None]
        original = entry.get("reference") or {}
        ref_kl, ref_top1 = original.get("kl_mean") or [None, None], original.get("top1") or [None, None]
        referenced = referenced or bool(original)
        rows.append(
            ImageScore(
                projector=projector,
                answer_tokens=entry["answer_tokens"],
                image_effect_kl=effect[0],
                image_effect_kl_stderr=effect[1],
                quant_kl_mean=kl[0],
                quant_kl_mean_stderr=kl[1],
                quant_top1_agreement=top1[0],
                quant_top1_agreement_stderr=top1[1],
                ref_kl_mean=ref_kl[0],
                ref_kl_mean_stderr=ref_kl[1],
                ref_top1_agreement=ref_top1[0],
                ref_top1_agreement_stderr=ref_top1[1],
            )
        )
    words = WITH_REFERENCE if referenced else NO_REFERENCE
    baseline = words.format(architecture=architecture, runtime=runtime, floor=floor or "not measured")
    return ImageResults(prompts=result["prompts"], scores=rows, baseline=baseline)
