"""The child process that measures one variant (or the reference): ``python -m hubquant.eval_worker JOB.json``.

Running each measurement in its own process keeps memory and speed figures separate: a runtime's
allocations never leak into the next variant's peak RSS. The job says what to load, where the
cached reference logits are, where its runtime's floor logits are (to score the quantization
alone), and whether to keep its own logits (when it *is* a runtime's floor). The result is JSON
at the path the job names: per-token summaries with standard errors, speed, load time and memory.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.child import python_module, run_child
from hubquant.errors import EvaluationError, HubquantError
from hubquant.faults import checkpoint

if TYPE_CHECKING:
    import numpy as np

    from hubquant.exporters.base import Runner


def _peak_rss_mb() -> float:
    """This process's own peak RSS. ``VmHWM`` belongs to the current address space; ``ru_maxrss``
    would also carry the high-water mark of the parent it was forked from (Linux keeps it across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _speed(runner: Runner, windows: np.ndarray, job: dict[str, Any]) -> dict[str, Any]:
    speed = runner.measure_speed(windows.reshape(-1)[: job["prompt_tokens"]].tolist(), job["gen_tokens"])
    return {
        "prefill_tokens_per_second": speed.prefill_tokens_per_second,
        "decode_tokens_per_second": speed.decode_tokens_per_second,
        "speed_note": speed.note,
    }


def _checked(logits: np.ndarray, label: str) -> np.ndarray:
    import numpy as np

    from hubquant.errors import EvaluationError

    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=-1).sum())
        raise EvaluationError(
            f"{label} produced non-finite logits (NaN or Inf) at {bad} of {len(logits)} positions",
            hint="the variant is broken: check the source weights and rebuild it with --force",
        )
    return logits


def run_reference(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from hubquant.source import resolve_source
    from hubquant.stats import perplexity, window_nll
    from hubquant.torch_runner import TorchRunner

    folder = Path(job["folder"])
    windows = np.load(folder / "windows.npy")
    started = time.perf_counter()
    source = resolve_source(job["source"])
    runner = TorchRunner(source, weights=job.get("weights", "fp32"))
    load = time.perf_counter() - started
    speed = _speed(runner, windows, job)
    rss = _peak_rss_mb()
    nll = []
    for index, window in enumerate(windows):
        logits = _checked(runner.logits(window.tolist()), "the reference")
        np.save(folder / f"logits-{index}.npy", logits.astype(np.float32))
        nll.append(window_nll(logits, window.tolist()))
    scored = np.concatenate(nll)
    np.save(folder / "nll.npy", scored)
    from hubquant.image_fidelity import reference_pictures

    reference_pictures(source, folder)
    return {
        "perplexity": perplexity(scored).pair(),
        "load_seconds": load,
        "peak_rss_mb": rss,
        "weights": job.get("weights", "fp32"),
        "why": job.get("why", ""),
        **speed,
        "text": {"tokens_scored": int(scored.size), "windows": int(len(windows)), "context": int(windows.shape[1])},
    }


def _score(runner: Runner, windows: np.ndarray, job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Every window through the runtime; per-token values against the reference and the floor."""
    import numpy as np

    from hubquant.stats import compare, kl_divergence, perplexity, window_nll

    reference = Path(job["reference"])
    floor = Path(job["floor"]) if job.get("floor") else None
    keep = Path(job["keep_logits"]) if job.get("keep_logits") else None
    values: dict[str, list[np.ndarray]] = {
        k: [] for k in ("nll", "kl", "agree", "floor_nll", "floor_kl", "floor_agree")
    }
    forward = 0.0
    for index, window in enumerate(windows):
        ids = window.tolist()
        tick = time.perf_counter()
        logits = _checked(runner.logits(ids), job["label"])
        forward += time.perf_counter() - tick
        if keep is not None:
            np.save(keep / f"logits-{index}.npy", logits.astype(np.float32))
        ref = np.load(reference / f"logits-{index}.npy")
        logits = logits[:, : ref.shape[-1]]  # runtimes may pad the vocabulary differently
        values["nll"].append(window_nll(logits, ids))
        baselines = [("", ref)]
        if floor is not None:
            baselines.append(("floor_", np.load(floor / f"logits-{index}.npy")))
        for prefix, base in baselines:
            vocab = min(base.shape[-1], logits.shape[-1])
            ours, theirs = logits[:-1, :vocab], base[:-1, :vocab]
            values[prefix + "kl"].append(kl_divergence(theirs, ours))
            values[prefix + "agree"].append(theirs.argmax(-1) == ours.argmax(-1))
            if prefix:
                values["floor_nll"].append(window_nll(base[:, :vocab], ids))
    joined = {k: np.concatenate(v) for k, v in values.items() if v}
    scores: dict[str, Any] = {"perplexity": perplexity(joined["nll"]).pair(), "tokens": int(joined["nll"].size)}
    scores["reference"] = compare(
        joined["nll"], joined["kl"], joined["agree"], np.load(reference / "nll.npy")
    ).as_dict()
    if floor is not None:
        scores["floor"] = compare(
            joined["nll"], joined["floor_kl"], joined["floor_agree"], joined["floor_nll"]
        ).as_dict()
    return scores, forward


def run_artifact(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from hubquant.artifact import load_artifact
    from hubquant.exporters import get_exporter

    windows = np.load(Path(job["reference"]) / "windows.npy")
    artifact = load_artifact(job["artifact"])
    started = time.perf_counter()
    runner = get_exporter(artifact.format)().runner(artifact, context_length=int(job["context"]))
    load = time.perf_counter() - started
    speed = _speed(runner, windows, job)
    rss = _peak_rss_mb()
    scores, forward = _score(runner, windows, job)
    runner.close()
    from hubquant.image_fidelity import score_images

    image = score_images(artifact, job)
    return {
        **scores,
        **({"image": image} if image else {}),
        "load_seconds": load,
        "peak_rss_mb": rss,
        **speed,
        "forward_seconds": forward,
        "worker_seconds": time.perf_counter() - job["started"],
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.DEBUG if os.environ.get("HUBQUANT_DEBUG") else logging.WARNING)
    job = {**json.loads(Path(argv[0]).read_text()), "started": time.perf_counter()}
    checkpoint("evaluating")
    try:
        if job["kind"] == "tasks":
            from hubquant.task_worker import run_tasks_job

            result = run_tasks_job(job)
        else:
            result = run_reference(job) if job["kind"] == "reference" else run_artifact(job)
    except HubquantError as exc:
        result = {"error": exc.message, "hint": exc.hint}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# -- the parent's side ------------------------------------------------------------------------------
def run_worker(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one measurement in this module, as a child process, and return its result.

    Raises:
        EvaluationError: the child failed or reported an error.
    """
    spec_path = work / f"job-{time.perf_counter_ns()}.json"
    result_path = spec_path.with_suffix(".result.json")
    spec_path.write_text(json.dumps({**job, "result": str(result_path)}))
    command = python_module("hubquant.eval_worker", str(spec_path))
    if job.get("artifact"):  # a runtime that cannot be imported here is measured in its own environment
        from hubquant.artifact import load_artifact
        from hubquant.exporters import get_exporter

        artifact = load_artifact(job["artifact"])
        command[0] = get_exporter(artifact.format).worker_python(artifact) or command[0]
    child = run_child(command, name=f"eval {job.get('label')}")
    if child.returncode != 0 or not result_path.is_file():
        tail = " / ".join(child.tail[-3:]) or "no output"
        if child.killed:
            tail = "killed (out of memory?)"
        raise EvaluationError(
            f"evaluating {job.get('label')} failed: {tail}", hint="run with HUBQUANT_DEBUG=1 for the full log"
        )
    result = json.loads(result_path.read_text())
    if "error" in result:
        raise EvaluationError(
            f"evaluating {job.get('label')} failed: {result['error']}",
            hint=result.get("hint") or "run with HUBQUANT_DEBUG=1 for the full log",
        )
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
