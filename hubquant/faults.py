"""A debug hook for fault-injection tests: pause or fail at a named stage, never by timing.

``HUBQUANT_FAULT=pause:STAGE`` makes hubquant, on reaching ``STAGE``, create the file
``$HUBQUANT_FAULT_DIR/STAGE.reached`` (holding its pid) and wait there — at most
``HUBQUANT_FAULT_WAIT`` seconds (60) — so a test can send SIGINT or SIGTERM exactly during that
stage. ``HUBQUANT_FAULT=raise:STAGE`` raises :class:`FaultInjected` there. Unset, every checkpoint
is a dictionary lookup and nothing else.

Stages: ``gguf-converting``, ``gguf-quantizing``.
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
    action, _, where = spec.partition(":")
    if where != stage:
        return
    if action == "raise":
        raise FaultInjected(f"fault injected at {stage}", hint=f"unset {ENV}")
    if action == "pause":
        marker = Path(os.environ.get("HUBQUANT_FAULT_DIR", ".")) / f"{stage}.reached"
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + float(os.environ.get("HUBQUANT_FAULT_WAIT", "60"))
        while time.monotonic() < deadline:  # a signal ends the wait (Python raises in the main thread)
            time.sleep(0.05)
