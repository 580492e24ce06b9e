"""Fault injection for the crash-safety tests.

`TETHER_KILL_AT=POINT:STEP` makes the process SIGKILL itself when it reaches POINT at STEP
(`after_step`: after the optimizer step, its metrics and any checkpoint of that step;
`during_save`: halfway through writing a checkpoint); `TETHER_INTERRUPT_AT=POINT:STEP` sends
it SIGINT there instead, as a user's Ctrl-C would. `TETHER_KILL_AFTER_S=SECONDS` kills it
that long after the CLI starts, wherever it is: loading, mid-step, mid-write. A real
SIGKILL, not an exception, so nothing gets to clean up: the tests prove a run survives what a
power cut or the OOM killer would do.
"""

from __future__ import annotations

import os
import signal
import threading


def maybe_kill(point: str, step: int) -> None:
    here = f"{point}:{step}"
    if os.environ.get("TETHER_KILL_AT") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("TETHER_INTERRUPT_AT") == here:
        os.kill(os.getpid(), signal.SIGINT)


def arm_kill_timer() -> None:
    seconds = os.environ.get("TETHER_KILL_AFTER_S")
    if seconds:
        timer = threading.Timer(float(seconds), os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
