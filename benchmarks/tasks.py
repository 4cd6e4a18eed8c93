"""What a multiple-choice task costs per runtime: seconds per 100 examples through hubquant's lm-eval adapter.

Real task datasets need the Hub, so the task is synthetic with a real task's *shape*: each example
is a context of ``--context-tokens`` and ``--choices`` endings of ``--ending-tokens`` each (tokens of
the source's tokenizer, cut from hubquant's built-in text). ``arc`` (ARC-Easy: about 40 + 4 × 6)
and ``hellaswag`` (about 80 + 4 × 30) are presets. Every runner — the PyTorch reference and each
artifact — scores the same ``--limit`` examples in its own child process, exactly as
``hubquant eval --tasks`` does; the report separates loading from scoring.

    python benchmarks/tasks.py SOURCE ARTIFACT... --shape arc --limit 20 --out benchmarks/results/tasks-tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import hubquant  # noqa: F401 - first: its import work-arounds (hubquant._compat) must precede transformers

SHAPES = {"arc": (40, 6, 4), "hellaswag": (80, 30, 4)}


def write_task(folder: Path, source: Path, *, count: int, context: int, ending: int, choices: int) -> Path:
    """A multiple-choice task of ``count`` examples with the given token lengths (answer: choice 0)."""
    from importlib.resources import files

    from transformers import AutoTokenizer

    from hubquant.tasks import write_choice_task

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer.encode(files("hubquant").joinpath("data/eval.txt").read_text(), add_special_tokens=False)
    need = context + choices * ending
    rows, start = [], 0
    for _ in range(count):
        if start + need > len(ids):
            start = 0
        piece = ids[start : start + need]
        start += need
        cut = [piece[context + k * ending : context + (k + 1) * ending] for k in range(choices)]
        rows.append(
            {
                "question": tokenizer.decode(piece[:context]),
                "choices": [tokenizer.decode(c).strip() for c in cut],
                "answer": 0,
            }
        )
    return write_choice_task(folder, "hubquant_shaped_mc", rows)


def measure(source: Path, artifacts: list[Path], *, shape: str, limit: int, max_length: int) -> dict:
    from hubquant.eval_worker import run_worker
    from hubquant.source import resolve_source
    from hubquant.tasks import TaskSettings, resolve_tasks
    from hubquant.torch_runner import reference_weights

    context, ending, choices = SHAPES[shape]
    resolved = resolve_source(str(source))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hubquant-task-bench-") as tmp:
        task = write_task(Path(tmp) / "task", source, count=limit, context=context, ending=ending, choices=choices)
        plan = resolve_tasks(TaskSettings((str(task),), limit=limit, max_length=max_length))
        runners: list[tuple[str, dict]] = [("reference", {"weights": reference_weights(resolved)[0]})]
        runners += [(path.name, {"artifact": str(path)}) for path in artifacts]
        for label, runner in runners:
            print(f"{label}: scoring {limit} examples", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = run_worker({**plan.job(resolved, max_length, **runner), "label": label}, Path(tmp))
            rows.append(
                {
                    "runner": label,
                    "examples": result["examples"],
                    "forward_passes": result["forward_passes"],
                    "forward_tokens": result["forward_tokens"],
                    "load_seconds": round(result["load_seconds"], 2),
                    "score_seconds": round(result["seconds"], 2),
                    "child_seconds": round(time.perf_counter() - started, 2),
                    "seconds_per_100_examples": round(100 * result["seconds"] / max(result["examples"], 1), 1),
                    "ms_per_token": round(1000 * result["seconds"] / max(result["forward_tokens"], 1), 2),
                }
            )
    return {
        "shape": {"name": shape, "context_tokens": context, "ending_tokens": ending, "choices": choices},
        "limit": limit,
        "source": {"path": str(source), "parameters": resolved.parameter_count, "dtype": resolved.dtype},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/tasks.py", *sys.argv[1:]]),
        "rows": rows,
    }


def markdown(report: dict) -> str:
    shape = report["shape"]
    lines = [
        f"Task cost, {shape['name']} shape ({shape['context_tokens']} + {shape['choices']} × "
        f"{shape['ending_tokens']} tokens), {report['limit']} examples, "
        f"{report['source']['parameters'] / 1e9:.2f}B parameters — `{report['command']}` ({report['date']})",
        "",
        "| runner | load s | scoring s | s / 100 examples | forward passes | ms / token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['runner']} | {r['load_seconds']} | {r['score_seconds']} | {r['seconds_per_100_examples']} | "
            f"{r['forward_passes']} | {r['ms_per_token']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="*")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="arc")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, help="Write OUT.json and OUT.md.")
    args = parser.parse_args(argv)
    report = measure(args.source, args.artifacts, shape=args.shape, limit=args.limit, max_length=args.max_length)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # OUT may hold dots of its own (tasks-phi-3.5-mini): the suffixes are appended, never replaced
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
