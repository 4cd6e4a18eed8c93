"""Measuring every variant the same way: one token stream, the same windows, the same metrics.

The text is tokenized once with the source's Hugging Face tokenizer and those ids are fed to every
runtime (runtime tokenizers split SentencePiece whitespace differently). The ids are cut into
non-overlapping windows of ``context`` tokens (the remainder shorter than a window is dropped);
a window's first token is context only, every later token is scored. The reference — the source in
PyTorch, fp32 on CPU — is run once per (source, text, windows) and its logits are cached on disk.
Each variant is measured in its own child process (:mod:`hubquant.eval_worker`), so one variant's
memory never shows up in another's figure.

Metrics (names shared by ``eval.json``, the table, MLflow and model cards):

=============================  ======================================================================
``size_bytes``                 bytes on disk of the variant's files (manifest excluded)
``bits_per_weight``            ``size_bytes * 8 / parameter_count`` of the source
``compression_ratio``          source weight bytes / ``size_bytes``
``perplexity``                 ``exp(mean NLL)`` over every scored token of every window
``ppl_delta``                  ``perplexity - reference perplexity``
``ppl_delta_pct``              ``100 * ppl_delta / reference perplexity``
``kl_mean``                    mean over scored positions of KL(reference ‖ variant) next-token distributions (nats)
``kl_p99``                     99th percentile of that per-position KL
``top1_agreement``             fraction of positions where the variant's argmax equals the reference's
``load_seconds``               wall time to load the variant into its runtime
``prefill_tokens_per_second``  ``prompt_tokens`` / time to process the prompt (greedy, after a warm-up)
``decode_tokens_per_second``   ``gen_tokens`` / time to generate them one by one after the prompt
``peak_rss_mb``                peak resident memory (MiB) of the child process through load and generation
``export_seconds``             the variant's own export step, from its manifest
=============================  ======================================================================

The reference row has the same fields (its KL is 0 and agreement 1 by definition).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.resources
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import ArtifactError, HubquantError, MissingDependencyError, SourceError

if TYPE_CHECKING:
    import numpy as np

    from hubquant.artifact import Artifact
    from hubquant.exporters.base import Progress, Runner
    from hubquant.source import SourceModel

log = logging.getLogger(__name__)

BUILTIN_TEXT = "eval.txt"
#: Calibration (importance matrices) uses a different built-in text, so no variant is scored on
#: the words it was calibrated with.
BUILTIN_CALIBRATION_TEXT = "calibration.txt"
EVAL_FILE = "eval.json"
EVAL_SCHEMA = "hubquant.eval/1"
#: Bump when a metric's computation changes: cached references are rebuilt.
REFERENCE_VERSION = 1

METRICS: dict[str, str] = {
    "size_bytes": "bytes on disk", "bits_per_weight": "bits per source weight",
    "compression_ratio": "source size / variant size", "perplexity": "exp(mean NLL) on the text",
    "ppl_delta": "perplexity − reference", "ppl_delta_pct": "100 × ppl_delta / reference",
    "kl_mean": "mean KL(reference ‖ variant), nats", "kl_p99": "99th percentile KL, nats",
    "top1_agreement": "share of positions with the reference's argmax", "load_seconds": "load time, s",
    "prefill_tokens_per_second": "prompt tokens/s", "decode_tokens_per_second": "generated tokens/s",
    "peak_rss_mb": "peak resident memory, MiB", "export_seconds": "export time, s",
}


class EvaluationError(HubquantError, ValueError):
    """The evaluation cannot run on the given text or artifacts."""


# -- the text and its token stream ------------------------------------------------------------
@dataclass(frozen=True)
class EvalText:
    """The evaluation text: its name (``builtin``, a path or a dataset spec) and content."""

    name: str
    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def read_text(path: str | Path | None, *, builtin: str = BUILTIN_TEXT) -> str:
    """The text at ``path``, or the built-in text ``builtin`` (evaluation by default) when ``path`` is None.

    Raises:
        EvaluationError: unreadable or empty text.
    """
    if path is None:
        return importlib.resources.files("hubquant.data").joinpath(builtin).read_text(encoding="utf-8")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"cannot read text {path}: {exc}", hint="pass a readable UTF-8 text file") from None
    if not text.strip():
        raise EvaluationError(f"text {path} is empty", hint="pass a text with at least one window of tokens")
    return text


def load_dataset_text(spec: str, *, max_chars: int = 2_000_000) -> str:
    """Join the ``text`` column of a ``datasets`` dataset given as ``NAME[:CONFIG[:SPLIT]]``.

    Raises:
        MissingDependencyError: ``datasets`` is not installed.
        EvaluationError: the dataset cannot be loaded (offline, unknown) or has no text column.
    """
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("--dataset needs the 'datasets' library", extra="datasets") from None
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types
        raise EvaluationError(f"cannot load dataset {spec}: {type(exc).__name__}: {exc}",
                              hint="check the name and that the Hub is reachable, or pass --text FILE") from None
    column = "text" if "text" in data.column_names else next(
        (c for c in data.column_names if str(data.features[c]) in ("Value('string')", "Value(dtype='string', id=None)")),
        None)
    if column is None:
        raise EvaluationError(f"dataset {spec} has no text column ({', '.join(data.column_names)})",
                              hint="pick a dataset with a 'text' column")
    parts, total = [], 0
    for row in data[column]:
        parts.append(row)
        total += len(row)
        if total >= max_chars:
            break
    return "\n".join(parts)


def eval_text(*, text_path: str | Path | None = None, dataset: str | None = None) -> EvalText:
    """The text to evaluate on: a file, a dataset, or the built-in default."""
    if text_path is not None and dataset is not None:
        raise EvaluationError("--text and --dataset cannot be combined", hint="choose one source of text")
    if dataset is not None:
        return EvalText(name=f"dataset:{dataset}", content=load_dataset_text(dataset))
    if text_path is not None:
        return EvalText(name=str(text_path), content=read_text(text_path))
    return EvalText(name="builtin", content=read_text(None))


def token_windows(ids: Sequence[int], context: int) -> list[list[int]]:
    """Non-overlapping windows of exactly ``context`` ids; the remainder shorter than a window is dropped.

    Raises:
        EvaluationError: fewer ids than one window.
    """
    if context < 2:
        raise EvaluationError(f"context length {context} is too small", hint="use a context length of at least 2")
    count = len(ids) // context
    if count == 0:
        raise EvaluationError(f"the text has {len(ids)} tokens, fewer than one window of {context}",
                              hint="use a longer text or a smaller --context")
    return [list(ids[i * context : (i + 1) * context]) for i in range(count)]


def tokenize(source: "SourceModel", text: str) -> list[int]:
    """Token ids of ``text`` from the source's Hugging Face tokenizer (no BOS/EOS added)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load the tokenizer of {source.name}: {exc}", path=source.path,
                          hint="check the tokenizer files of the source") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# -- scoring ----------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes the system can still give (``MemAvailable``), None where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reference_weights(source: "SourceModel", requested: str = "auto") -> tuple[str, str]:
    """How the reference holds its weights, and why: ``fp32`` or ``source`` (the checkpoint's dtype).

    The reference always computes in float32. ``fp32`` widens every weight once (4 bytes per
    parameter: 15.3 GB for Phi-3.5-mini); ``source`` keeps the linear layers' weights as stored
    (2 bytes for bf16) and widens each one as its layer runs. Widening bf16/f16 to float32 is
    exact, so both give the same logits; ``source`` costs the widening on every forward pass.
    ``auto`` takes fp32 when it fits in 80% of the memory available now.
    """
    if requested != "auto":
        return requested, "asked for"
    if source.dtype == "float32":
        return "fp32", "the checkpoint is float32"
    need = source.parameter_count * 4 * 1.1
    free = available_memory()
    if free is None or need <= 0.8 * free:
        return "fp32", f"a float32 copy ({need / 2**30:.1f} GiB) fits in memory"
    return "source", (f"a float32 copy ({need / 2**30:.1f} GiB) would not fit in 80% of the "
                      f"{free / 2**30:.1f} GiB available; weights stay {source.dtype}, computed in float32")


class TorchRunner:
    """The unquantized source in PyTorch, computed in float32 on CPU: the reference every variant is
    compared with. ``weights`` says how it holds the weights (see :func:`reference_weights`)."""

    def __init__(self, source: "SourceModel", *, weights: str = "fp32") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        if weights == "source" and source.dtype in ("bfloat16", "float16"):
            self._model = AutoModelForCausalLM.from_pretrained(source.path, dtype=getattr(torch, source.dtype))
            _widen_all_but_linear_weights(self._model)
        else:
            self._model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        self._model.eval()

    def logits(self, ids: Sequence[int]) -> "np.ndarray":
        with self._torch.inference_mode():
            out = self._model(input_ids=self._torch.tensor([list(ids)])).logits[0]
        return out.float().numpy()

    def timed_generation(self, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
        torch = self._torch
        with torch.inference_mode():
            started = time.perf_counter()
            out = self._model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
            prefill = time.perf_counter() - started
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            started = time.perf_counter()
            for _ in range(new_tokens):
                out = self._model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()
            decode = time.perf_counter() - started
        return prefill, decode

    def close(self) -> None:
        del self._model


def _widen_all_but_linear_weights(model: Any) -> None:
    """float32 activations everywhere; linear weights stay 16-bit and are widened as each layer runs."""
    import functools

    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    narrow = {id(m.weight) for m in linears} - embedded  # a weight tied to an embedding is widened once
    for parameter in model.parameters():
        if id(parameter) not in narrow and parameter.is_floating_point():
            parameter.data = parameter.data.float()
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.float()

    def forward(module: Any, x: Any) -> Any:
        bias = None if module.bias is None else module.bias.float()
        return torch.nn.functional.linear(x, module.weight.float(), bias)

    for module in linears:
        module.forward = functools.partial(forward, module)
    model.config.dtype = torch.float32


def log_softmax(logits: "np.ndarray") -> "np.ndarray":
    """Log-probabilities over the vocabulary, in float64 so tiny divergences are not lost to rounding."""
    import numpy as np

    scores = logits.astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: "np.ndarray", window: Sequence[int]) -> "np.ndarray":
    """Negative log-likelihood of tokens 1…n-1 of a window given the logits of positions 0…n-2."""
    import numpy as np

    targets = np.asarray(window[1:])
    return -log_softmax(logits[:-1])[np.arange(len(targets)), targets]


def kl_divergence(reference_logits: "np.ndarray", logits: "np.ndarray") -> "np.ndarray":
    """KL(reference ‖ variant) at every position: how far the variant's next-token distribution moved."""
    import numpy as np

    p, q = log_softmax(reference_logits), log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def perplexity(runner: "Runner | TorchRunner", windows: list[list[int]]) -> float:
    """Perplexity of ``runner`` over ``windows`` (see the module docstring for the definition)."""
    import numpy as np

    nll = np.concatenate([window_nll(runner.logits(window), window) for window in windows])
    return float(np.exp(nll.mean()))


# -- running the measurements ----------------------------------------------------------------
@dataclass
class EvalSettings:
    """How a variant is measured; identical for every variant of a comparison."""

    context: int = 512
    max_windows: int | None = None
    prompt_tokens: int = 64
    gen_tokens: int = 32
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: How the reference holds its weights (it always computes in float32): auto, fp32 or source.
    reference_weights: str = "auto"

    def key(self) -> dict[str, Any]:
        return {"context": self.context, "max_windows": self.max_windows}


@dataclass
class EvalRow:
    """One row of the comparison: the reference or one variant."""

    label: str
    format: str
    precision: str
    metrics: dict[str, float | int | None]
    path: str | None = None
    reference: bool = False
    gate: dict[str, Any] = field(default_factory=lambda: {"passed": True, "reasons": []})
    options: dict[str, Any] = field(default_factory=dict)
    #: Caveats the exporter recorded in the manifest (fallback tensors, rope limits …).
    warnings: list[str] = field(default_factory=list)


def machine_facts() -> dict[str, Any]:
    """What the speed and memory figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def _run_worker(job: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / f"job-{time.perf_counter_ns()}.json"
    result_path = spec_path.with_suffix(".result.json")
    spec_path.write_text(json.dumps({**job, "result": str(result_path)}))
    # The child runs this very hubquant, even when it is not the installed one.
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    completed = subprocess.run([sys.executable, "-m", "hubquant.eval_worker", str(spec_path)],
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0 or not result_path.is_file():
        tail = (completed.stderr or "").strip().splitlines()[-3:]
        raise EvaluationError(f"evaluating {job.get('label')} failed: {' / '.join(tail) or 'no output'}",
                              hint="run with HUBQUANT_DEBUG=1 for the full log")
    result = json.loads(result_path.read_text())
    if "error" in result:
        raise EvaluationError(f"evaluating {job.get('label')} failed: {result['error']}",
                              hint=result.get("hint") or "run with HUBQUANT_DEBUG=1 for the full log")
    return result


def reference_cache_dir(source: "SourceModel", text: EvalText, settings: EvalSettings) -> Path:
    from hubquant.tiny import cache_root

    key = hashlib.sha256(json.dumps({"source": source.fingerprint, "text": text.sha256, "windows": settings.key(),
                                     "v": REFERENCE_VERSION}, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "reference" / key


def reference(source: "SourceModel", text: EvalText, settings: EvalSettings, *, work: Path,
              progress: "Progress") -> tuple[Path, dict[str, Any]]:
    """The cached reference for (source, text, windows): a folder of per-window logits plus its row.

    Computed once in a child process and reused until the source, the text or the window
    settings change.
    """
    import numpy as np

    from hubquant.artifact import atomic_folder

    folder = reference_cache_dir(source, text, settings)
    meta_path = folder / "reference.json"
    if meta_path.is_file():
        progress(f"reference: reusing cached logits ({folder})")
        return folder, json.loads(meta_path.read_text())
    windows = token_windows(tokenize(source, text.content), settings.context)
    if settings.max_windows:
        windows = windows[: settings.max_windows]
    progress(f"reference: PyTorch logits for {len(windows)} window(s) of {settings.context} tokens (cached after)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(folder) as staging:
            np.save(staging / "windows.npy", np.asarray(windows, dtype=np.int64))
            weights, why = reference_weights(source, settings.reference_weights)
            progress(f"reference: weights held as {weights} ({why}); computed in float32")
            result = _run_worker({"kind": "reference", "label": "reference", "source": str(source.path),
                                  "weights": weights, "why": why,
                                  "folder": str(staging), "prompt_tokens": settings.prompt_tokens,
                                  "gen_tokens": settings.gen_tokens, "context": settings.context}, work)
            (staging / "reference.json").write_text(json.dumps(result))
    except FileExistsError:  # another process cached it meanwhile
        pass
    return folder, json.loads(meta_path.read_text())


def _gate(row: EvalRow, *, max_ppl_delta: float | None, max_kl: float | None) -> None:
    reasons = []
    delta, kl = row.metrics.get("ppl_delta_pct"), row.metrics.get("kl_mean")
    if max_ppl_delta is not None and delta is not None and delta > max_ppl_delta:
        reasons.append(f"Δ perplexity {delta:+.2f}% > {max_ppl_delta}%")
    if max_kl is not None and kl is not None and kl > max_kl:
        reasons.append(f"KL {kl:.4g} > {max_kl}")
    row.gate = {"passed": not reasons, "reasons": reasons, "max_ppl_delta_pct": max_ppl_delta, "max_kl": max_kl}


def check_artifact_source(artifact: "Artifact", source: "SourceModel") -> None:
    """Refuse to compare an artifact with a source it was not built from."""
    built_from = artifact.manifest.get("source", {}).get("fingerprint")
    if built_from != source.fingerprint:
        raise ArtifactError(
            f"{artifact.path.name} was built from another source than {source.name} (fingerprints differ)",
            path=artifact.path, hint="pass the --source the artifact was quantized from, or rebuild the artifact")


def evaluate(artifacts: list["Artifact"], source: "SourceModel", *, text: EvalText, settings: EvalSettings,
             max_ppl_delta: float | None = None, max_kl: float | None = None,
             progress: "Progress | None" = None, reuse: bool = False) -> list[EvalRow]:
    """Measure every artifact against the cached reference; write ``eval.json`` beside each.

    With ``reuse``, an artifact whose ``eval.json`` was measured on the same artifact (cache key),
    text and settings is not measured again (``hubquant publish`` resuming after a failure).

    Returns the rows, the reference first, then the variants by decreasing size.

    Raises:
        ArtifactError: an artifact was built from another source.
        EvaluationError: the text is too short, or a runtime failed.
    """
    from hubquant.exporters import get_exporter

    say = progress or (lambda line: None)
    for artifact in artifacts:
        check_artifact_source(artifact, source)
        exporter = get_exporter(artifact.format)
        exporter.check_installed()
        exporter.check_runnable(artifact)
    weight_bytes = sum((source.path / name).stat().st_size for name in source.weight_files)
    with tempfile.TemporaryDirectory(prefix="hubquant-eval-") as tmp:
        work = Path(tmp)
        ref_folder, ref_result = reference(source, text, settings, work=work, progress=say)
        base_ppl = ref_result["perplexity"]
        text_facts = {"name": text.name, "sha256": text.sha256, **ref_result["text"]}
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(source.dtype, source.dtype)
        ref_row = EvalRow(label=f"reference {short}", format="pytorch", precision=source.dtype,
                          reference=True, path=str(source.path),
                          options={"compute": "float32", "weights": ref_result.get("weights", "fp32"),
                                   "why": ref_result.get("why", "")}, metrics={
                              "size_bytes": weight_bytes, "bits_per_weight": weight_bytes * 8 / source.parameter_count,
                              "compression_ratio": 1.0, "perplexity": base_ppl, "ppl_delta": 0.0,
                              "ppl_delta_pct": 0.0, "kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0,
                              **{k: ref_result[k] for k in ("load_seconds", "prefill_tokens_per_second",
                                                            "decode_tokens_per_second", "peak_rss_mb")},
                              "export_seconds": None})
        rows = [ref_row]
        labels = variant_labels(artifacts)
        for artifact in sorted(artifacts, key=lambda a: -a.size_bytes):
            label = labels[artifact.path]
            previous = _previous_evaluation(artifact, text, settings) if reuse else None
            if previous is not None:
                say(f"{label}: reusing its evaluation (same artifact, text and settings)")
                row = EvalRow(label=label, format=artifact.format, precision=artifact.precision,
                              path=str(artifact.path), options=artifact.manifest["variant"]["options"],
                              warnings=list(artifact.manifest.get("warnings", [])), metrics=previous["metrics"])
                _gate(row, max_ppl_delta=max_ppl_delta, max_kl=max_kl)
                rows.append(row)
                continue
            say(f"{label}: measuring in a child process")
            result = _run_worker({"kind": "artifact", "label": label, "artifact": str(artifact.path),
                                  "reference": str(ref_folder), "context": settings.context,
                                  "prompt_tokens": settings.prompt_tokens, "gen_tokens": settings.gen_tokens}, work)
            size = artifact.size_bytes
            ppl = result["perplexity"]
            row = EvalRow(label=label, format=artifact.format, precision=artifact.precision, path=str(artifact.path),
                          options=artifact.manifest["variant"]["options"],
                          warnings=list(artifact.manifest.get("warnings", [])), metrics={
                              "size_bytes": size, "bits_per_weight": size * 8 / source.parameter_count,
                              "compression_ratio": weight_bytes / size, "perplexity": ppl,
                              "ppl_delta": ppl - base_ppl, "ppl_delta_pct": 100.0 * (ppl - base_ppl) / base_ppl,
                              **{k: result[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "load_seconds",
                                                        "prefill_tokens_per_second", "decode_tokens_per_second",
                                                        "peak_rss_mb")},
                              "export_seconds": artifact.manifest.get("export_seconds")})
            _gate(row, max_ppl_delta=max_ppl_delta, max_kl=max_kl)
            timing = {"worker_seconds": result["worker_seconds"], "forward_seconds": result["forward_seconds"]}
            write_eval_json(artifact, row, source=source, text=text_facts, settings=settings, reference_row=ref_row,
                            timing=timing)
            rows.append(row)
    return rows


def _previous_evaluation(artifact: "Artifact", text: EvalText, settings: EvalSettings) -> dict[str, Any] | None:
    path = artifact.path / EVAL_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = (document.get("schema") == EVAL_SCHEMA and document.get("cache_key") == artifact.manifest.get("cache_key")
            and document.get("text", {}).get("sha256") == text.sha256
            and document.get("settings") == {"context": settings.context, "max_windows": settings.max_windows,
                                             "prompt_tokens": settings.prompt_tokens, "gen_tokens": settings.gen_tokens})
    return document if same else None


def write_eval_json(artifact: "Artifact", row: EvalRow, *, source: "SourceModel", text: dict[str, Any],
                    settings: EvalSettings, reference_row: EvalRow, timing: dict[str, float]) -> Path:
    """Write ``eval.json`` beside the artifact (atomically) so later stages read it, not re-run it."""
    from hubquant import __version__

    document = {
        "schema": EVAL_SCHEMA,
        "hubquant_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variant": {"label": row.label, "format": row.format, "precision": row.precision, "options": row.options},
        "cache_key": artifact.manifest.get("cache_key"),
        "source": {"id": source.source_id, "revision": source.revision, "fingerprint": source.fingerprint,
                   "parameter_count": source.parameter_count, "dtype": source.dtype},
        "text": text,
        "settings": {"context": settings.context, "max_windows": settings.max_windows,
                     "prompt_tokens": settings.prompt_tokens, "gen_tokens": settings.gen_tokens},
        "machine": machine_facts(),
        "metrics": row.metrics,
        "reference": reference_row.metrics,
        "gate": row.gate,
        "warnings": row.warnings,
        # How long measuring took: the whole child process, and the part that was the runtime's
        # forward passes over the windows (the rest is loading, the speed test and scoring).
        "timing": timing,
    }
    path = artifact.path / EVAL_FILE
    tmp = path.with_name(f".{EVAL_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def rows_as_json(rows: list[EvalRow], *, text: EvalText, settings: EvalSettings) -> dict[str, Any]:
    """The ``hubquant eval --json`` document (schema: ``hubquant/data/eval-table.schema.json``)."""
    return {
        "schema": "hubquant.eval-table/1",
        "text": {"name": text.name, "sha256": text.sha256},
        "settings": {"context": settings.context, "max_windows": settings.max_windows,
                     "prompt_tokens": settings.prompt_tokens, "gen_tokens": settings.gen_tokens},
        "machine": machine_facts(),
        "rows": [{"label": r.label, "format": r.format, "precision": r.precision, "reference": r.reference,
                  "path": r.path, "metrics": r.metrics, "gate": r.gate, "warnings": r.warnings} for r in rows],
    }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt(value: float | int | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def variant_labels(artifacts: list["Artifact"]) -> dict[Path, str]:
    """Short row labels (``gguf Q4_K_M``); variants sharing one get their folder's distinguishing suffix."""
    plain = {a.path: f"{a.format} {a.precision}" + ("+imatrix" if a.manifest["variant"]["options"].get("imatrix") else "")
             for a in artifacts}
    counts = collections.Counter(plain.values())
    labels = {}
    for artifact in artifacts:
        label = plain[artifact.path]
        if counts[label] > 1:
            name = artifact.path.name
            prefix = f"{artifact.format}-"
            label = f"{artifact.format} {name[len(prefix):] if name.startswith(prefix) else name}"
        labels[artifact.path] = label
    return labels


def render_table(rows: list[EvalRow]) -> str:
    """The comparison table; fits a 100-column terminal. A ✗ marks a variant that fails the gate."""
    width = min(max([21] + [len(r.label) + (0 if r.gate["passed"] else 2) for r in rows]), 30)
    header = (f"{'variant':<{width}} {'size':>7} {'bpw':>5} {'ppl':>8} {'Δppl':>7} {'KL':>8} {'KL p99':>8} "
              f"{'top1':>6} {'pre t/s':>7} {'dec t/s':>7} {'RSS MB':>6}")
    lines = [header, "─" * len(header)]
    for row in rows:
        m = row.metrics
        size = m["size_bytes"] / 1e6
        size_text = f"{size:.1f}MB" if size < 1000 else f"{size / 1000:.2f}GB"
        label = row.label if row.gate["passed"] else f"✗ {row.label}"
        lines.append(
            f"{_clip(label, width):<{width}} {size_text:>7} {_fmt(m['bits_per_weight'], '.2f'):>5} {_fmt(m['perplexity'], '.3f'):>8} "
            f"{_fmt(m['ppl_delta_pct'], '+.2f') + '%':>7} {_fmt(m['kl_mean'], '.2e'):>8} {_fmt(m['kl_p99'], '.2e'):>8} "
            f"{_fmt(100 * m['top1_agreement'], '.1f') + '%':>6} {_fmt(m['prefill_tokens_per_second'], '.0f'):>7} "
            f"{_fmt(m['decode_tokens_per_second'], '.0f'):>7} {_fmt(m['peak_rss_mb'], '.0f'):>6}")
    for row in rows:
        for warning in row.warnings:
            lines.append(f"! {row.label}: {warning}")
    failed = [r for r in rows if not r.gate["passed"]]
    for row in failed:
        lines.append(f"✗ {row.label}: fails the quality gate ({'; '.join(row.gate['reasons'])})")
    return "\n".join(lines)
