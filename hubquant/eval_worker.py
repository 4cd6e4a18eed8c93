"""The child process that measures one variant (or the reference): ``python -m hubquant.eval_worker JOB.json``.

Running each measurement in its own process keeps memory and speed figures separate: a runtime's
allocations never leak into the next variant's peak RSS. The job file says what to load and where
the cached reference logits are; the result is written as JSON to the path the job names.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


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


def _speed(runner: Any, windows: Any, prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
    """Prefill and decode speed, greedy, after one short warm-up run."""
    prompt = [int(t) for t in windows.reshape(-1)[:prompt_tokens]]
    runner.timed_generation(prompt[: max(2, len(prompt) // 4)], 2)  # warm-up: caches, thread pools
    prefill, decode = runner.timed_generation(prompt, gen_tokens)
    return {"prefill_tokens_per_second": len(prompt) / prefill if prefill > 0 else None,
            "decode_tokens_per_second": gen_tokens / decode if decode > 0 and gen_tokens else None}


def run_reference(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from hubquant.evaluate import TorchRunner, window_nll
    from hubquant.source import resolve_source

    folder = Path(job["folder"])
    windows = np.load(folder / "windows.npy")
    started = time.perf_counter()
    runner = TorchRunner(resolve_source(job["source"]), weights=job.get("weights", "fp32"))
    load = time.perf_counter() - started
    speed = _speed(runner, windows, job["prompt_tokens"], job["gen_tokens"])
    rss = _peak_rss_mb()
    nll = []
    for index, window in enumerate(windows):
        logits = runner.logits(window.tolist())
        np.save(folder / f"logits-{index}.npy", logits.astype(np.float32))
        nll.append(window_nll(logits, window.tolist()))
    scored = np.concatenate(nll)
    return {"perplexity": float(np.exp(scored.mean())), "load_seconds": load, "peak_rss_mb": rss,
            "weights": job.get("weights", "fp32"), "why": job.get("why", ""), **speed,
            "text": {"tokens_scored": int(scored.size), "windows": int(len(windows)), "context": int(windows.shape[1])}}


def run_artifact(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from hubquant.artifact import load_artifact
    from hubquant.evaluate import kl_divergence, window_nll
    from hubquant.exporters import get_exporter

    reference = Path(job["reference"])
    windows = np.load(reference / "windows.npy")
    artifact = load_artifact(job["artifact"])
    started = time.perf_counter()
    runner = get_exporter(artifact.format)().runner(artifact, context_length=int(job["context"]))
    load = time.perf_counter() - started
    speed = _speed(runner, windows, job["prompt_tokens"], job["gen_tokens"])
    rss = _peak_rss_mb()
    nll, kl, agree = [], [], []
    forward = 0.0
    for index, window in enumerate(windows):
        ids = window.tolist()
        tick = time.perf_counter()
        logits = runner.logits(ids)
        forward += time.perf_counter() - tick
        ref = np.load(reference / f"logits-{index}.npy")
        vocab = min(ref.shape[-1], logits.shape[-1])  # runtimes may pad the vocabulary differently
        logits, ref = logits[:, :vocab], ref[:, :vocab]
        nll.append(window_nll(logits, ids))
        kl.append(kl_divergence(ref[:-1], logits[:-1]))
        agree.append(ref[:-1].argmax(-1) == logits[:-1].argmax(-1))
    runner.close()
    scored, divergence = np.concatenate(nll), np.concatenate(kl)
    return {"perplexity": float(np.exp(scored.mean())), "kl_mean": float(divergence.mean()),
            "kl_p99": float(np.percentile(divergence, 99)), "top1_agreement": float(np.concatenate(agree).mean()),
            "load_seconds": load, "peak_rss_mb": rss, **speed, "forward_seconds": forward,
            "worker_seconds": time.perf_counter() - job["started"]}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.DEBUG if os.environ.get("HUBQUANT_DEBUG") else logging.WARNING)
    job = {**json.loads(Path(argv[0]).read_text()), "started": time.perf_counter()}
    from hubquant.errors import HubquantError

    try:
        result = run_reference(job) if job["kind"] == "reference" else run_artifact(job)
    except HubquantError as exc:
        result = {"error": exc.message, "hint": exc.hint}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
