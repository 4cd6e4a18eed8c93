"""A debug hook for fault-injection tests: pause or fail at a named stage, never by timing.

``HUBQUANT_FAULT=pause:STAGE`` makes hubquant, on reaching ``STAGE``, create the file
``$HUBQUANT_FAULT_DIR/STAGE.reached`` (holding its pid) and wait there — at most
``HUBQUANT_FAULT_WAIT`` seconds (60) — so a test can send SIGINT or SIGTERM exactly during that
stage. ``HUBQUANT_FAULT=raise:STAGE`` raises :class:`FaultInjected` there. Unset, every checkpoint
is a dictionary lookup and nothing else. Several stages: ``pause:gguf-converting,pause:interrupted``.

Stages: ``gguf-converting``, ``gguf-quantizing``, ``interrupted`` (the first SIGINT/SIGTERM was
received and the clean-up is about to start: a second signal there must end hubquant at once).
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
        marker = Path(os.environ.get("HUBQUANT_FAULT_DIR", ".")) / f"{stage}.reached"
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + float(os.environ.get("HUBQUANT_FAULT_WAIT", "60"))
        while time.monotonic() < deadline:  # a signal ends the wait (Python raises in the main thread)
            time.sleep(0.05)
