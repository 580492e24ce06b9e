"""tether's messages (what a run loads, where it runs, what it skipped) go through Python's
`logging`, under the `tether` logger, so a notebook or an application can quiet, redirect or
format them: `logging.getLogger("tether").setLevel(logging.WARNING)`.

Until someone configures that logger, tether gives it one handler, which writes above the
progress bars (tqdm.write) instead of through them.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

log = logging.getLogger("tether")


class _AboveProgressBars(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # a handler must never raise into the run
            self.handleError(record)


if not log.handlers:
    log.addHandler(_AboveProgressBars())
    log.setLevel(logging.INFO)
    log.propagate = False


def say(message: str) -> None:
    """A progress message: what a run did that a user should know (INFO)."""
    log.info(message)


def warn(message: str) -> None:
    """Something a user should act on, though the run goes on (WARNING)."""
    log.warning(message)
