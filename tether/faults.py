"""Fault injection for the crash-safety tests.

`TETHER_KILL_AT=POINT:STEP` makes the process SIGKILL itself when it reaches POINT at STEP
(`after_step`: after the optimizer step and its metrics; `during_save`: halfway through
writing a checkpoint). A real SIGKILL, not an exception, so nothing gets to clean up: the
test proves the run survives what a power cut or the OOM killer would do.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    target = os.environ.get("TETHER_KILL_AT")
    if target and target == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
