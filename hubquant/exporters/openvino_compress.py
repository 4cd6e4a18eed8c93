"""NNCF's data-free weight compression without torch: ``python -m hubquant.exporters.openvino_compress SPEC RESULT``.

The OpenVINO worker (:mod:`hubquant.exporters.openvino_worker`) needs torch to export the
full-precision IR, and a process that has imported torch, transformers and optimum-intel holds
about 0.45 GiB more memory than one that has not — all of it still there while NNCF compresses, the
export's peak phase. So data-free variants (no calibration data) are compressed here, in a process
that never imports torch: the worker resolves each variant's configuration with optimum-intel's own
code, writes its JSON files and pickles the ``nncf.compress_weights`` arguments optimum-intel would
pass (SPEC); this process reads the IR, calls ``nncf.compress_weights`` with them, applies the two
run-time-info edits optimum-intel makes after compressing (drop an f16 KV-cache flag, record NNCF's
version) and saves the model as ``OVModelForCausalLM.save_pretrained`` does
(``openvino.save_model(…, compress_to_fp16=False)``). The weights come out byte-identical; the XML
differs only in the numbers OpenVINO gives unnamed nodes from a process-wide counter
(``Convert_6475`` here, ``Convert_22395`` after an export in the same process).

NNCF imports torch when it is installed only to register tensor functions for it, and skips them
when the import fails: torch is blocked before NNCF is imported, so it stays out of this process.
RESULT receives, per variant, the seconds it took and an error when it failed, and whether torch
was imported after all (it must not be; a test holds the worker to it).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hubquant.child import hand_back, say
from hubquant.faults import checkpoint

#: The file name of the compressed model in a variant folder (optimum-intel's).
MODEL_XML = "openvino_model.xml"


def without_node_numbers(xml: str) -> str:
    """An IR's XML with the numbers OpenVINO gives unnamed nodes (``Convert_6475`` → ``Convert_N``): what
    must match between this compressor's output and optimum-cli's."""
    return re.sub(r'(name="[A-Za-z]+)_[0-9]+"', r'\1_N"', xml)


def compress_one(ir_xml: Path, folder: Path, arguments: dict[str, Any], dq_group_size: int | None) -> None:
    """One variant: the shared IR compressed with optimum-intel's ``nncf.compress_weights`` arguments."""
    import nncf
    import openvino

    model = openvino.Core().read_model(ir_xml.resolve(), ir_xml.with_suffix(".bin").resolve())
    model = nncf.compress_weights(model, dataset=None, **arguments)
    if dq_group_size is not None:
        model.set_rt_info(str(dq_group_size), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    if model.has_rt_info(["runtime_options", "KV_CACHE_PRECISION"]):
        options = model.get_rt_info("runtime_options").value
        if options["KV_CACHE_PRECISION"] == "f16":  # optimum-intel lets a compressed model pick its KV cache type
            options.pop("KV_CACHE_PRECISION")
            model.set_rt_info(options, "runtime_options")
    model.set_rt_info(nncf.__version__, ["optimum", "nncf_version"])
    openvino.save_model(model, str(folder / MODEL_XML), compress_to_fp16=False)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from hubquant.exporters.openvino_worker import failure

    checkpoint("openvino-compressing")
    results: dict[str, Any] = {}
    ir_xml = Path(spec["ir"]) / MODEL_XML
    for job in spec["jobs"]:
        say(f"openvino {job['precision']}: compressing with NNCF")
        started = time.perf_counter()
        try:
            compress_one(ir_xml, Path(job["folder"]), job["arguments"], job["dq_group_size"])
            results[job["name"]] = {"seconds": time.perf_counter() - started}
        except Exception as exc:  # noqa: BLE001 - reported per variant
            traceback.print_exc()
            results[job["name"]] = {"error": failure(exc), "seconds": time.perf_counter() - started}
    shutil.rmtree(spec["ir"], ignore_errors=True)  # the last user of the temporary IR
    return results


def main(argv: list[str]) -> int:
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type] # before anything imports NNCF
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = pickle.loads(spec_path.read_bytes())  # written by hubquant's own worker in this run's work folder
    try:
        results = run(spec)
    except Exception as exc:  # noqa: BLE001 - e.g. a broken installation: every variant fails alike
        from hubquant.exporters.openvino_worker import failure

        traceback.print_exc()
        results = {job["name"]: {"error": failure(exc)} for job in spec["jobs"]}
    outcome = {"variants": results, "torch_imported": sys.modules.get("torch") is not None}
    hand_back(result_path, json.dumps(outcome, indent=2, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
