"""``python -m hubquant._launch MODULE ARGS…``: run a tool's ``python -m MODULE`` with hubquant's
import work-arounds applied first (see :mod:`hubquant._compat`), and for the ONNX builder the
skip of its quantizer pass when nothing is left to quantize (:mod:`hubquant.exporters.onnx_lean`)."""

from __future__ import annotations

import runpy
import sys

import hubquant  # noqa: F401 - applies the work-arounds
from hubquant.faults import checkpoint

#: The fault-injection stage of each tool this launcher runs (``HUBQUANT_FAULT=pause:onnx-building``).
STAGES = {"onnxruntime_genai.models.builder": "onnx-building"}

if __name__ == "__main__":
    module = sys.argv[1]
    checkpoint(STAGES.get(module, f"launch-{module}"))
    if module == "onnxruntime_genai.models.builder":
        from hubquant.exporters.onnx_lean import install

        install()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
