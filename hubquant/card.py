"""Model cards: one per Hub repo, rendered from ``data/card.md.j2`` with ``huggingface_hub.ModelCard``.

Metadata (``ModelCardData``): ``base_model`` + ``base_model_relation: quantized``, the format's
``library_name``, ``pipeline_tag``, the source's licence (with ``license_name``/``license_link``
when it is custom), tags, and ``model-index`` results (perplexity of each variant on the named
text) so the Hub shows them. The body is built from what the artifacts themselves recorded:
``manifest.json`` (tools, source) and ``eval.json`` (metrics, machine).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from hubquant.hub import RepoPlan

#: ``library_name`` per format, as the Hub's own libraries list spells them.
LIBRARY_NAMES = {"gguf": "gguf", "onnx": "onnxruntime-genai", "openvino": "openvino", "mlx": "mlx"}
FORMAT_NAMES = {"gguf": "GGUF (llama.cpp)", "onnx": "ONNX Runtime GenAI", "openvino": "OpenVINO IR", "mlx": "MLX"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class CardContext:
    """What a card needs beyond its own repo: the source, the siblings and the provenance."""

    source: dict[str, Any]
    base_model: str | None
    siblings: list["RepoPlan"] = field(default_factory=list)
    chart_path: str | None = None
    mlflow_runs: dict[str, str] = field(default_factory=dict)  # variant folder → run id
    ci_run_url: str | None = None
    license_name: str | None = None
    license_link: str | None = None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _size(size: int | None) -> str:
    if size is None:
        return "—"
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def device_advice(precisions: list[tuple[str, str]]) -> list[str]:
    """Which variant suits which device, for the (format, precision) pairs present."""
    lines = []
    low = [p for f, p in precisions if _bits(f, p) <= 5]
    mid = [p for f, p in precisions if 5 < _bits(f, p) <= 16]
    full = [p for f, p in precisions if _bits(f, p) > 16]
    if low:
        lines.append(f"Phones, IoT and small devices with little memory: {', '.join(low)} (4-bit class; smallest, "
                     "some quality lost — check the KL column).")
    if mid:
        lines.append(f"AI PCs and laptops with an NPU/GPU or plenty of RAM: {', '.join(mid)} (8-/16-bit; close to the "
                     "original).")
    if full:
        lines.append(f"Servers and reference runs: {', '.join(full)} (full precision; as good as the original, largest).")
    return lines


def _bits(fmt: str, precision: str) -> int:
    text = precision.lower()
    if any(t in text for t in ("fp32", "f32")):
        return 32
    if any(t in text for t in ("fp16", "f16", "bf16")):
        return 16
    match = re.search(r"(\d+)", text.replace("_k", ""))
    return int(match.group(1)) if match else 16


def snippets(plan: "RepoPlan") -> str:
    """Copy-paste commands per runtime for this repo's layout."""
    repo, first = plan.repo_id, plan.variants[0]
    if plan.format == "gguf":
        name = first.files[0][1]
        quant = first.precision
        return f"""llama.cpp:

```bash
llama-cli -hf {repo}:{quant} -p "Hello"
```

llama-cpp-python:

```python
from llama_cpp import Llama
llm = Llama.from_pretrained(repo_id="{repo}", filename="{name}")
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello"}}]))
```

Ollama:

```bash
ollama run hf.co/{repo}:{quant}
```"""
    if plan.format == "onnx":
        folder = first.location
        return f"""onnxruntime-genai:

```bash
hf download {repo} --include "{folder}/*" --local-dir .
```

```python
import onnxruntime_genai as og
model = og.Model("{folder}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Hello"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```"""
    if plan.format == "openvino":
        return f"""optimum-intel:

```python
from optimum.intel import OVModelForCausalLM
from transformers import AutoTokenizer
model = OVModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
inputs = tokenizer("Hello", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```

openvino-genai:

```bash
hf download {repo} --local-dir model
```

```python
import openvino_genai
pipe = openvino_genai.LLMPipeline("model", "CPU")
print(pipe.generate("Hello", max_new_tokens=64))
```"""
    return f"""mlx-lm:

```bash
pip install mlx-lm
mlx_lm.generate --model {repo} --prompt "Hello"
```

```python
from mlx_lm import load, generate
model, tokenizer = load("{repo}")
print(generate(model, tokenizer, prompt="Hello", max_tokens=64))
```"""


def card_rows(plan: "RepoPlan") -> tuple[list[dict[str, str]], dict[str, Any] | None, dict[str, Any] | None]:
    """Table rows of the repo's variants, the reference row, and one eval.json (for the settings)."""
    rows, reference, sample = [], None, None
    for variant in plan.variants:
        evaluation = variant.evaluation
        if evaluation is None:
            continue
        sample = sample or evaluation
        m = evaluation["metrics"]
        rows.append({"label": variant.label, "location": variant.location, "size": _size(m.get("size_bytes")),
                     "bpw": _fmt(m.get("bits_per_weight"), ".2f"), "ppl": _fmt(m.get("perplexity"), ".3f"),
                     "delta": _fmt(m.get("ppl_delta_pct"), "+.2f", "%"), "kl": _fmt(m.get("kl_mean"), ".2e"),
                     "top1": _fmt(None if m.get("top1_agreement") is None else 100 * m["top1_agreement"], ".1f", "%"),
                     "prefill": _fmt(m.get("prefill_tokens_per_second"), ".0f"),
                     "decode": _fmt(m.get("decode_tokens_per_second"), ".0f")})
        if reference is None:
            r = evaluation["reference"]
            reference = {"precision": evaluation["source"].get("dtype", "original"), "size": _size(r.get("size_bytes")),
                         "bpw": _fmt(r.get("bits_per_weight"), ".2f"), "ppl": _fmt(r.get("perplexity"), ".3f"),
                         "prefill": _fmt(r.get("prefill_tokens_per_second"), ".0f"),
                         "decode": _fmt(r.get("decode_tokens_per_second"), ".0f")}
    return rows, reference, sample


def build_card(plan: "RepoPlan", context: CardContext) -> "ModelCard":
    """The rendered card of one repo (metadata validated by ``huggingface_hub``'s own classes)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hubquant import __version__

    source = context.source
    rows, reference, sample = card_rows(plan)
    text_name = (sample or {}).get("text", {}).get("name", "")
    text_name = "hubquant-eval-text" if text_name == "builtin" else text_name
    eval_results = []
    for variant in plan.variants:
        if variant.evaluation is None or variant.evaluation["metrics"].get("perplexity") is None:
            continue
        eval_results.append(EvalResult(
            task_type="text-generation", task_name="Text generation", dataset_type=f"hubquant/{text_name}",
            dataset_name=f"{text_name} (hubquant evaluation text)", metric_type="perplexity",
            metric_name=f"Perplexity ({variant.label})",
            metric_value=round(float(variant.evaluation["metrics"]["perplexity"]), 4)))
    license_id = source.get("license") or None
    custom_license = license_id == "other" or (license_id is not None and not re.fullmatch(r"[\w.-]+", license_id))
    card_data = ModelCardData(
        base_model=context.base_model, base_model_relation="quantized" if context.base_model else None,
        library_name=LIBRARY_NAMES[plan.format], pipeline_tag="text-generation",
        license="other" if custom_license else license_id,
        license_name=(context.license_name or license_id) if custom_license else None,
        license_link=context.license_link if custom_license else None,
        tags=sorted({plan.format, LIBRARY_NAMES[plan.format], source.get("model_type") or "phi", "hubquant",
                     "quantized", *(v.precision.lower() for v in plan.variants)}),
        model_name=plan.repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results or None,
    )
    tools = {}
    for variant in plan.variants:
        tools.update(variant.manifest.get("tools", {}))
    source_id = context.base_model or (source.get("id") if source.get("revision") else None) or source.get("name")
    is_hub = bool(source_id and HUB_ID.match(source_id) and (context.base_model or source.get("revision")))
    provenance = []
    for variant in plan.variants:
        run = context.mlflow_runs.get(variant.folder)
        if run:
            provenance.append(f"{variant.label}: MLflow run `{run}`")
    if context.ci_run_url:
        provenance.append(f"Built in CI: {context.ci_run_url}")
    precisions = ", ".join(v.precision for v in plan.variants)
    description = (f"{FORMAT_NAMES[plan.format]} quantizations ({precisions}) of "
                   f"{('[' + source_id + '](https://huggingface.co/' + source_id + ')') if is_hub else '`' + str(source.get('name')) + '`'}"
                   f", a {source.get('architecture', 'Phi')} model with "
                   f"{_count(source.get('parameter_count') or 0)} parameters ({source.get('dtype')} weights), "
                   "built, measured and published by hubquant. Each variant was measured against the original "
                   "on the same text with the same tokenization; the table below has the figures.")
    template = importlib.resources.files("hubquant").joinpath("data/card.md.j2").read_text(encoding="utf-8")
    settings = (sample or {}).get("settings", {})
    machine = (sample or {}).get("machine", {})
    return ModelCard.from_template(
        card_data, template_str=template,
        repo_name=plan.repo_id.split("/")[-1], description=description, chart_path=context.chart_path,
        model_name=source.get("name"), rows=rows, reference=reference, text_name=f"`{text_name}`",
        eval_tokens=f"{(sample or {}).get('text', {}).get('tokens_scored', '?')} tokens scored",
        context=settings.get("context"), prompt_tokens=settings.get("prompt_tokens"),
        gen_tokens=settings.get("gen_tokens"),
        machine=f"{machine.get('cpu', 'an unknown CPU')} ({machine.get('cores', '?')} cores, {machine.get('system', '')})",
        device_advice=device_advice([(v.format, v.precision) for v in plan.variants]),
        snippets=snippets(plan),
        siblings=[{"repo_id": s.repo_id, "url": s.url, "what": f"{FORMAT_NAMES[s.format]} "
                   f"({', '.join(v.precision for v in s.variants)})"} for s in context.siblings
                  if s.repo_id != plan.repo_id],
        source_id=source_id if is_hub else source.get("name"),
        source_url=f"https://huggingface.co/{source_id}" if is_hub else None,
        source_revision=source.get("revision"), hubquant_version=__version__,
        tools=", ".join(f"{k} {v}" for k, v in sorted(tools.items())), provenance=provenance,
    )
