"""``python -m hubquant._launch [--mapped-weights] MODULE ARGS…``: run a tool's ``python -m MODULE`` with
hubquant's import work-arounds applied first (see :mod:`hubquant._compat`); ``--mapped-weights`` makes
the ONNX builder read its checkpoint through a memory map (:mod:`hubquant.exporters.onnx_mapped`)."""

from __future__ import annotations

import runpy
import sys

import hubquant  # noqa: F401 - applies the work-arounds
from hubquant.faults import checkpoint

#: The fault-injection stage of each tool this launcher runs (``HUBQUANT_FAULT=pause:onnx-building``).
STAGES = {"onnxruntime_genai.models.builder": "onnx-building"}

if __name__ == "__main__":
    mapped = sys.argv[1] == "--mapped-weights"  # the ONNX builder reads its checkpoint mapped (onnx_mapped)
    del sys.argv[1 : 1 + mapped]
    module = sys.argv[1]
    checkpoint(STAGES.get(module, f"launch-{module}"))
    if mapped:
        from hubquant.exporters.onnx_mapped import install

        install()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
