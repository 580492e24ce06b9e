"""What a checkpoint holds besides the weights, and how a run gets it back: the random
streams, the run's progress (step, data cursor, skipped steps) and the optimizer and
scheduler state.

Its own module because exact resume depends on saving and restoring these together: a
resumed run must continue the same random streams from the same data position with the same
optimizer moments, whether the checkpoint came from one process or a torchrun job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from tether.console import say
from tether.models.loading import load_trainable_state_dict, trainable_state_dict
from tether.runs import distributed
from tether.runs.checkpoint import (
    is_sharded,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random streams a run draws from: Python's, the CPU generator and, where the run
    has used a GPU, the generator of the GPU it runs on (the current device: each process
    uses one). Saving only that one lets a run resume on another number of GPUs."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Back to `state`. A GPU stream is restored onto the current GPU where there is one; a run
    resumed on the CPU has no use for it."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written by every GPU's generator: this process's GPU's
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


@dataclass
class Progress:
    """Where a run is: steps taken, examples consumed, steps skipped for non-finite values."""

    step: int = 0
    cursor: int = 0
    skipped: int = 0


def save_training_state(
    checkpoints_dir,
    model,
    optimizer,
    scheduler,
    progress: Progress,
    keep_last: int,
    extra: dict[str, Any] | None = None,
):
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {}}
    meta = {"cursor": progress.cursor, "skipped": progress.skipped}
    if distributed.is_distributed():
        meta["world_size"] = distributed.world().size
        return save_sharded_checkpoint(
            checkpoints_dir, progress.step, model, optimizer, state, meta, keep_last
        )
    state["optimizer"] = optimizer.state_dict()
    return save_checkpoint(
        checkpoints_dir, progress.step, trainable_state_dict(model), state, meta, keep_last
    )


def restore_training_state(path, model, optimizer, scheduler) -> tuple[Progress, dict[str, Any]]:
    """From a checkpoint of either kind: one process's, or a torchrun job's of any size."""
    if is_sharded(path):
        state, meta = load_sharded_checkpoint(path, model, optimizer)
    else:
        if distributed.fsdp_sharded(model):
            raise distributed.DistributedError(
                f"{path} was written by a single process; resume it with parallel: ddp "
                "(FSDP resumes checkpoints written under torchrun)"
            )
        tensors, state, meta = load_checkpoint(path)
        load_trainable_state_dict(model, tensors)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["rng"] is not None:
        restore_rng(state["rng"])
    progress = Progress(meta["step"], meta["cursor"], meta.get("skipped", 0))
    saved_ranks, ranks = meta.get("world_size", 1), distributed.world().size
    if saved_ranks != ranks and distributed.world().is_main:
        say(
            f"note: {path} was written by {saved_ranks} rank(s), resumed on {ranks}: same "
            "weights, optimizer and data position; rank 0 continues rank 0's random stream"
        )
    return progress, state.get("extra", {})
