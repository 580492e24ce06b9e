"""Metric trackers besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

Each is imported only when `logging.report_to` names it, and a missing package is an error
when the run starts, not a silently lost log. A resumed run continues the same W&B or MLflow
run: the id each tracker gives is kept in RUN_DIR/trackers.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from tether.config import config_to_dict
from tether.errors import TetherError

IDS_FILE = "trackers.json"


class TrackerError(TetherError, RuntimeError):
    """A tracker named in logging.report_to cannot be used here."""


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _require(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"logging.report_to names {tracker}, which needs `pip install {tracker}`"
        ) from None


class TensorBoard:
    def __init__(self, run_path: Path, name: str, config: Any, saved_id: str | None) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.id = name
        self.writer = SummaryWriter(str(run_path / "tensorboard" / name))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_path: Path, name: str, config: Any, saved_id: str | None) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(
            project=config.logging.wandb_project,
            name=name,
            id=saved_id,
            resume="allow",
            dir=str(run_path),
            config=config_to_dict(config),
        )
        self.id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_path: Path, name: str, config: Any, saved_id: str | None) -> None:
        self.mlflow = _require("mlflow", "mlflow")
        if saved_id is None:
            self.mlflow.set_experiment(config.logging.wandb_project)
            run = self.mlflow.start_run(run_name=name)
            self.mlflow.log_params(_flat(config_to_dict(config)))
        else:
            run = self.mlflow.start_run(run_id=saved_id)
        self.id = run.info.run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)[:250]  # MLflow's limit on a param's value
    return out


def open_trackers(run_path: Path, config: Any) -> list[Tracker]:
    """The trackers `config.logging` names, each resuming its saved run where there is one."""
    ids_path = run_path / IDS_FILE
    saved = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    name = config.logging.run_name or run_path.resolve().name
    trackers = {
        key: TRACKER_CLASSES[key](run_path, name, config, saved.get(key))
        for key in config.logging.trackers()
    }
    ids = {key: tracker.id for key, tracker in trackers.items()}
    if ids != saved and ids:
        tmp = ids_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids))
        tmp.replace(ids_path)
    return list(trackers.values())
