"""A debug hook for fault-injection tests: pause or fail at a named stage, never by timing.

``HUBQUANT_FAULT=pause:STAGE`` makes hubquant, on reaching ``STAGE``, create the file
``$HUBQUANT_FAULT_DIR/STAGE.reached`` (holding its pid) and wait there — until the file
``STAGE.release`` appears beside it, at most ``HUBQUANT_FAULT_WAIT`` seconds (60) — so a test can
send SIGINT or SIGTERM exactly during that stage, or change the world (stop a server) and let it
go on. ``HUBQUANT_FAULT=raise:STAGE`` raises :class:`FaultInjected` there. Several stages:
``pause:gguf-converting,pause:interrupted``. Unset, every checkpoint is a dictionary lookup and
nothing else.

Stages (the process that reaches each: hubquant's own, or the child named):

- ``gguf-converting`` — llama.cpp's converter (in-process); ``gguf-quantizing`` — just before the
  quantizer's child starts; ``llama-quantizing`` — the child inside ``llama_model_quantize`` itself
  (its first log line);
- ``onnx-prequantizing`` — the child writing the prequantized checkpoint; ``onnx-building`` — the
  child running onnxruntime-genai's builder;
- ``openvino-exporting`` — the OpenVINO worker child (export, calibrated NNCF compression);
  ``openvino-compressing`` — the torch-free child compressing the data-free variants;
- ``evaluating`` — each evaluation child (the reference and every variant);
- ``hub-committing`` — just before each commit to the Hub (in-process);
- ``interrupted`` — the first SIGINT/SIGTERM was received and the clean-up is about to start: a
  second signal there must end hubquant at once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hubquant.errors import FaultInjected

ENV = "HUBQUANT_FAULT"


def checkpoint(stage: str) -> None:
    """Pause or fail here when ``HUBQUANT_FAULT`` names this stage."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    actions = [action for action, _, where in (item.partition(":") for item in spec.split(",")) if where == stage]
    if not actions:
        return
    action = actions[0]
    if action == "raise":
        raise FaultInjected(f"fault injected at {stage}", hint=f"unset {ENV}")
    if action == "pause":
        folder = Path(os.environ.get("HUBQUANT_FAULT_DIR", "."))
        (folder / f"{stage}.reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + float(os.environ.get("HUBQUANT_FAULT_WAIT", "60"))
        # bounded; a signal ends the wait too (Python raises in the main thread)
        while time.monotonic() < deadline and not (folder / f"{stage}.release").exists():
            time.sleep(0.05)
