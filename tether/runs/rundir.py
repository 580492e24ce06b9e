"""A run directory: the lock that keeps two runs apart, the resolved config, metrics.jsonl.

RUN_DIR/config.yaml       the resolved config of the run
RUN_DIR/metrics.jsonl     one JSON object per logged step, `step` always present
RUN_DIR/checkpoints/      step-N/ (see tether.runs.checkpoint)
RUN_DIR/final/            the trained model, loadable with transformers
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tether.config import as_it_ran, config_differences, config_to_dict, config_yaml
from tether.errors import TetherError
from tether.runs.checkpoint import latest_checkpoint, list_checkpoints


class RunDirError(TetherError, RuntimeError):
    """The run dir cannot be used as asked (locked, not empty, config mismatch)."""


# Keys a resumed run may change: extending a run is the common reason to resume; the
# device and the parallel engine too: a checkpoint written on a GPU resumes on the CPU or
# another GPU, one written under FSDP under DDP or in one process (and a run dir whose
# config.yaml lacks these keys resumes with their defaults).
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.device",
    "train.deterministic",
    "parallel",
    "fsdp_cpu_offload",
)


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.final = self.path / "final"
        self._lock_fh = None

    def lock(self) -> None:
        """Exclusive for this process's lifetime; the kernel releases it if we are killed."""
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirError(
                f"run dir {self.path} is in use by {holder}; wait for it or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def prepare(self, config: Any, resume: bool) -> Path | None:
        """Lock, check the config against a resumed run's, write config.yaml.

        Returns the checkpoint to resume from (None for a fresh start). A fresh start into a
        dir that already has progress is refused rather than overwriting it.
        """
        self.lock()
        for stale in self.checkpoints.glob(".tmp-*"):  # a save cut off by a crash
            shutil.rmtree(stale, ignore_errors=True)
        saved_path = self.path / "config.yaml"
        has_progress = bool(list_checkpoints(self.checkpoints)) or self.final.exists()
        if not resume:
            if has_progress:
                raise RunDirError(
                    f"{self.path} already holds a run; pass --resume to continue it or choose "
                    "a new --out"
                )
            write_text_atomic(saved_path, config_yaml(config))
            return None
        if saved_path.is_file():
            saved = yaml.safe_load(saved_path.read_text()) or {}
            # A key the saved config lacks (added by a later tether) is read as its default,
            # or as what the run did where that differs (config.as_it_ran).
            saved = _with_defaults(config_to_dict(type(config)()), as_it_ran(saved))
            changed = [
                k
                for k in config_differences(saved, config_to_dict(config))
                if k not in RESUMABLE_CHANGES
            ]
            if changed:
                raise RunDirError(
                    f"--resume with a config that differs from {saved_path} in: "
                    f"{', '.join(changed)}. Resume with the same config (or none)."
                )
        # Atomic: a resume killed here (a kill can land anywhere) must find the old config, not
        # a truncated one that no longer says where the data is.
        write_text_atomic(saved_path, config_yaml(config))
        return latest_checkpoint(self.checkpoints)

    def saved_config_path(self) -> Path | None:
        path = self.path / "config.yaml"
        return path if path.is_file() else None


class MetricsLogger:
    """Appends one JSON line per logged step, and mirrors it to the trackers that
    `logging.report_to` names (tether.runs.trackers).

    On resume the log is cut back to the checkpoint's step, so steps replayed after a crash
    are not logged twice.
    """

    def __init__(self, run: RunDir, resume_step: int = 0, config: Any = None) -> None:
        from tether.runs.trackers import open_trackers

        self.path = run.metrics_path
        self.trackers = open_trackers(run.path, config) if config is not None else []
        truncate_jsonl(self.path, resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.log(step, numbers)

    def sync(self) -> None:
        """fsync before a checkpoint, so the log never lags the weights after a crash."""
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        for tracker in self.trackers:
            tracker.close()


class NullLogger:
    """The logger of every rank but the first in a torchrun job: one job, one log."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _with_defaults(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` with every key it lacks taken from `defaults`, at every depth."""
    out = dict(defaults)
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = _with_defaults(defaults[key], value) if nested else value
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a log (metrics.jsonl, samples.jsonl) that have a step; a line torn by a
    crash mid-write is skipped. A missing file reads as empty."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file, fsync and rename: a reader (or a resumed run) sees the old file
    or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (and drop torn lines), so steps replayed after
    a resume are not logged twice."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_jsonl(path) if r["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_values(path: Path) -> dict[str, Any]:
    """The last logged value of every key of a metrics.jsonl (`step` included); {} without
    one."""
    out: dict[str, Any] = {}
    if Path(path).is_file():
        for record in read_metrics(path):
            out |= record
    return out
