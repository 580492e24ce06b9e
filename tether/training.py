"""The steps every training stage shares: optimizer, schedule, precision, RNG, data order,
checkpoint and resume. Written once here; the stage loops call them.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from tether.checkpoint import load_checkpoint, save_checkpoint
from tether.config import OptimConfig, TrainConfig
from tether.models import bf16_available, load_trainable_state_dict, trainable_state_dict


def set_threads(threads: int) -> None:
    available = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    torch.set_num_threads(threads or available)


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_available())


def autocast(enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast over float32 master weights (matmuls in bf16, reductions in fp32)."""
    if not enabled:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up to 1, then cosine or linear decay to 0 at `total_steps`, or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def fn(step: int) -> float:
        return lr_multiplier(step, total_steps, optim.warmup_steps, optim.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def total_steps(train: TrainConfig, num_examples: int) -> int:
    if train.max_steps:
        return train.max_steps
    per_step = train.batch_size * train.grad_accum
    return train.epochs * max(1, math.ceil(num_examples / per_step))


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def example_indices(cursor: int, count: int, num_examples: int, seed: int) -> list[int]:
    """The `count` examples after `cursor` examples consumed, over seeded per-epoch shuffles.

    The data position of a run is this one integer, so a resumed run draws exactly the
    batches an uninterrupted run would have drawn, across epoch boundaries too.
    """
    out: list[int] = []
    order_epoch, order = -1, []
    for position in range(cursor, cursor + count):
        epoch, index = divmod(position, num_examples)
        if epoch != order_epoch:
            order_epoch, order = epoch, epoch_order(num_examples, seed, epoch)
        out.append(order[index])
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where a run is: optimizer steps taken and examples consumed."""

    step: int = 0
    cursor: int = 0


def save_training_state(
    checkpoints_dir,
    model,
    optimizer,
    scheduler,
    progress: Progress,
    keep_last: int,
    extra: dict[str, Any] | None = None,
):
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "extra": extra or {},
    }
    meta = {"cursor": progress.cursor}
    return save_checkpoint(
        checkpoints_dir, progress.step, trainable_state_dict(model), state, meta, keep_last
    )


def restore_training_state(path, model, optimizer, scheduler) -> tuple[Progress, dict[str, Any]]:
    tensors, state, meta = load_checkpoint(path)
    load_trainable_state_dict(model, tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return Progress(step=meta["step"], cursor=meta["cursor"]), state.get("extra", {})


def clip_and_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float,
) -> float:
    """Clip (if asked), step, zero grads; returns the pre-clip gradient norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(
        params, max_grad_norm if max_grad_norm > 0 else float("inf")
    )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def is_due(step: int, every: int, last_step: int) -> bool:
    """True at every `every`-th step (when every > 0) and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)
