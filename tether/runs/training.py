"""The optimizer-step loop every training stage shares, and the set-up around it: the run
dir, threads, seeds and tokenizer (`begin_run`), the optimizer, schedule and logger, resumed
or fresh (`start_optimization`), and the final save.

The loop lives here and its parts elsewhere (`optim`, `data_order`, `state`) so that this
module reads as the order of events in a step: draw the examples, run the stage's step,
clip and step, guard against NaN, log, evaluate, checkpoint. A stage calls `fit` once.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from tether.config import TrainConfig
from tether.console import say
from tether.errors import RewardError, TetherError
from tether.hardware import (
    cuda_memory,
    describe,
    is_out_of_memory,
    keep_freed_memory,
    resolve_device,
    set_threads,
    use_bf16,
    use_deterministic,
)
from tether.models.loading import load_tokenizer, model_device
from tether.runs import distributed, faults
from tether.runs.card import write_model_card
from tether.runs.checkpoint import latest_checkpoint
from tether.runs.data_order import example_indices, examples_per_step, total_steps
from tether.runs.optim import clip_and_step, make_optimizer, make_scheduler
from tether.runs.rundir import MetricsLogger, NullLogger, RunDir
from tether.runs.state import (
    Progress,
    restore_rng,
    restore_training_state,
    rng_state,
    save_training_state,
    seed_everything,
)


def is_due(step: int, every: int, last_step: int) -> bool:
    """True at every `every`-th step (when every > 0) and at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


@dataclass
class RunStart:
    """A locked run dir, the checkpoint to resume from (or None), the device every model of
    the run sits on, its precision, and the tokenizer."""

    run: RunDir
    resume_from: Any
    device: torch.device
    bf16: bool
    tokenizer: Any


def begin_run(cfg: Any, out, resume: bool) -> RunStart:
    """Pick the device, lock and check the run dir, set threads and seeds, load the
    tokenizer: the first lines of every stage, before its data is validated and its model
    loaded. The first line printed says where the run computes and in which precision.

    In a torchrun job each rank takes its own GPU (`cuda:LOCAL_RANK`); rank 0 locks and
    prepares the run dir and the others follow its decision (which checkpoint to resume
    from); a refusal on rank 0 ends the job.
    """
    device = resolve_device(cfg.train.device)
    use_deterministic(cfg.train.deterministic)  # before any GPU work: cuBLAS reads it then
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device: RNG state, NCCL, new tensors
    world = distributed.init_from_env(device)
    bf16 = use_bf16(cfg.train.precision, device)
    if world.is_main:
        ranks = f" (and {world.size - 1} more ranks)" if world.size > 1 else ""
        say(f"tether: running on {describe(device, bf16)}{ranks}")
    run = RunDir(out)
    resume_from = run.prepare(cfg, resume) if world.is_main else None
    resume_from = distributed.broadcast(resume_from)
    set_threads(cfg.train.threads)
    keep_freed_memory()
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    return RunStart(run, resume_from, device, bf16, tokenizer)


@dataclass
class Optimization:
    """What a training loop carries from step to step. `extra` is the stage's own state from
    the checkpoint resumed (KL controller, score statistics), empty on a fresh start."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress
    logger: MetricsLogger | NullLogger
    extra: dict[str, Any]


def start_optimization(
    run: RunDir,
    cfg: Any,
    model: torch.nn.Module,
    num_examples: int,
    resume_from,
    per_step: int | None = None,
    lr_by_prefix: dict[str, float] | None = None,
) -> Optimization:
    """Optimizer, schedule, progress (restored from `resume_from` if given) and the logger."""
    optimizer = make_optimizer(model, cfg.optim, lr_by_prefix)
    scheduler = make_scheduler(optimizer, cfg.optim, total_steps(cfg.train, num_examples, per_step))
    progress, extra = Progress(), {}
    if resume_from is not None:
        progress, extra = restore_training_state(resume_from, model, optimizer, scheduler)
        say(f"resumed from {resume_from} (step {progress.step})")
    # Without a checkpoint the run starts over, so even a step-0 record (the baseline eval)
    # of a run killed before its first save is dropped: it is about to be logged again.
    keep_through = progress.step if resume_from is not None else -1
    logger: MetricsLogger | NullLogger = NullLogger()
    if distributed.world().is_main:  # one log per job
        logger = MetricsLogger(run, keep_through, cfg)
    return Optimization(optimizer, scheduler, progress, logger, extra)


def save_final(
    parallel: distributed.Parallel,
    save: Callable[[torch.nn.Module], None],
    run: RunDir,
    cfg: Any,
) -> None:
    """Rank 0 writes `final/` from whole weights (under FSDP every rank gathers them first),
    then its model card (tether.runs.card)."""
    with parallel.full_weights() as model:
        if distributed.world().is_main:
            save(model)
            write_model_card(run, cfg)
    distributed.barrier()


StepFn = Callable[[list[int]], tuple[dict[str, float], int]]


class NonFiniteError(TetherError, RuntimeError):
    """Training produced NaN/inf gradients train.max_bad_steps times in a row."""


class OutOfMemoryStop(TetherError, RuntimeError):
    """A training step ran out of memory; the message names the keys that lower it."""


def memory_remedy(cfg: Any) -> str:
    """The config keys that shrink a step's memory, for this stage's config."""
    keys = ["a smaller train.batch_size or a larger train.grad_accum (the micro-batch)"]
    if hasattr(cfg, "rollout"):
        keys.append("rollout.generation_batch_size")
        keys.append("rollout.max_new_tokens")
    keys.append("data.max_length")
    if hasattr(cfg.model, "gradient_checkpointing") and not cfg.model.gradient_checkpointing:
        keys.append("model.gradient_checkpointing: true")
    return ", ".join(keys)


# What the progress bar shows, where a stage logs it.
PROGRESS_KEYS = {
    "train/loss": "loss",
    "reward/score_mean": "score",
    "kl/mean": "kl",
    "train/lr": "lr",
    "throughput/tokens_per_s": "tok_s",
}


def fit(
    desc: str,
    cfg: Any,
    run: RunDir,
    model: torch.nn.Module,
    opt: Optimization,
    num_examples: int,
    step_fn: StepFn,
    **options: Any,
) -> None:
    """`run_steps` below, releasing the run dir's lock when it raises (a reward error, a NaN stop,
    Ctrl-C): the process may go on, and a caller that fixes the cause can resume in place."""
    try:
        run_steps(desc, cfg, run, model, opt, num_examples, step_fn, **options)
    except BaseException:
        opt.logger.close()
        run.unlock()
        raise


def run_steps(
    desc: str,
    cfg: Any,
    run: RunDir,
    model: torch.nn.Module,
    opt: Optimization,
    num_examples: int,
    step_fn: StepFn,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    lengths: Sequence[int] | None = None,
    per_step: int | None = None,
    steps_itself: bool = False,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    until: Callable[[], bool] | None = None,
) -> None:
    """The optimizer-step loop every offline stage shares.

    `step_fn(indices)` runs forward and backward over the examples of one optimizer step
    (its own micro-batching) and returns (metrics, tokens processed). In a torchrun job
    `indices` are the whole step's, the same on every rank: step_fn runs its rank's share
    (`distributed.shard`), normalises losses by the step's global count and returns the
    job's metrics; the tokens it returns are its own, summed here. This loop draws the
    indices, clips, steps, logs, evaluates, checkpoints and reports progress. `lengths` (token
    count per example) turns on length-grouped steps when `data.group_by_length` is set.

    An online stage draws `per_step` prompts per step and, with `steps_itself`, takes its own
    optimizer steps inside `step_fn` (PPO: epochs x minibatches); `extra_state()` is saved
    with every checkpoint and comes back as `opt.extra` on resume. `until()` true ends the
    run before its last step (PPO's spent KL budget): the step that made it so is saved,
    and a resumed run that ended so takes no more steps.
    """
    train, progress, logger = cfg.train, opt.progress, opt.logger
    per_step = per_step or examples_per_step(train)
    last_step = total_steps(train, num_examples, per_step)
    if eval_fn is not None and progress.step == 0:  # the baseline later evals are read against
        logger.log(0, eval_fn())
    # A tuple, so that epoch_order can cache on it.
    grouped = tuple(lengths) if lengths is not None and cfg.data.group_by_length else None
    bar = tqdm(
        total=last_step,
        initial=progress.step,
        desc=desc,
        unit="step",
        disable=not distributed.world().is_main,
    )
    save = functools.partial(_save, run, model, opt, train.keep_last, extra_state)
    device = model_device(model)
    bad_in_a_row = 0
    ended = until or (lambda: False)
    while progress.step < last_step and not ended():
        started = time.perf_counter()
        indices = example_indices(progress.cursor, per_step, num_examples, train.seed, grouped)
        metrics, tokens = _step_or_save(step_fn, indices, run, progress, save, cfg)
        metrics["train/lr"] = opt.scheduler.get_last_lr()[0]
        if not steps_itself:
            metrics["train/grad_norm"] = clip_and_step(
                model, opt.optimizer, cfg.optim.max_grad_norm
            )
        bad_in_a_row = _guard_non_finite(metrics, progress, bad_in_a_row, train, logger)
        opt.scheduler.step()
        progress.step += 1
        progress.cursor += len(indices)
        _add_step_metrics(metrics, progress.cursor / num_examples, started, tokens)
        metrics |= cuda_memory(device)
        last = progress.step if ended() else last_step  # a run that ends early ends here
        _evaluate_and_log(metrics, progress.step, last, train, eval_fn, logger)
        bar.update(1)
        bar.set_postfix(
            {name: f"{metrics[key]:.4g}" for key, name in PROGRESS_KEYS.items() if key in metrics}
        )
        if is_due(progress.step, train.save_every, last):
            save()
        faults.maybe_kill("after_step", progress.step)
    bar.close()
    logger.close()


def _save(
    run: RunDir,
    model: torch.nn.Module,
    opt: Optimization,
    keep_last: int,
    extra_state: Callable[[], dict[str, Any]] | None,
) -> None:
    """A checkpoint of the run as it stands. Metrics first: a checkpoint never claims steps
    the log lacks."""
    opt.logger.sync()
    extra = extra_state() if extra_state else None
    save_training_state(
        run.checkpoints, model, opt.optimizer, opt.scheduler, opt.progress, keep_last, extra
    )


def _step_or_save(
    step_fn: StepFn,
    indices: list[int],
    run: RunDir,
    progress: Progress,
    save: Callable[[], None],
    cfg: Any,
) -> tuple[dict[str, float], int]:
    """`step_fn(indices)`; when a reward fails, the state the step started from is saved (in
    one process) before the error goes on, so the run resumes exactly here once it is fixed.
    A step that runs out of memory saves nothing (it may have stepped part of the way): the
    last checkpoint stays the one to resume from, and the error names what to lower."""
    rng_at_start = rng_state()
    try:
        return step_fn(indices)
    except RewardError as e:
        # A reward fails before this step changes any weight, so the weights and optimizer
        # are the step's starting state; restoring the RNG makes the rest of it so too.
        if distributed.world().size > 1:  # the other ranks wait in a collective: no save
            raise RewardError(
                f"{e} [fix the reward, then --resume from the last checkpoint]"
            ) from e
        restore_rng(rng_at_start)
        if progress.step and not (run.checkpoints / f"step-{progress.step}").exists():
            save()
        saved = f"state saved at step {progress.step}" if progress.step else "nothing to save"
        raise RewardError(f"{e} [{saved}; fix the reward, then --resume]") from e
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        last = latest_checkpoint(run.checkpoints)
        kept = f"{last} is kept" if last else "no checkpoint yet"
        raise OutOfMemoryStop(
            f"step {progress.step + 1} ran out of memory ({type(e).__name__}); lower "
            f"{memory_remedy(cfg)}, then --resume ({kept})"
        ) from e


def _guard_non_finite(
    metrics: dict[str, float],
    progress: Progress,
    bad_in_a_row: int,
    train: TrainConfig,
    logger: MetricsLogger | NullLogger,
) -> int:
    """Count a step whose update was skipped for NaN/inf (a non-finite gradient norm, or
    updates the stage skipped itself) and return the run of such steps so far; raises
    NonFiniteError, after logging the step, at train.max_bad_steps in a row."""
    bad = metrics.get("guard/skipped_updates", 0) > 0 or not math.isfinite(
        metrics.get("train/grad_norm", 0.0)
    )
    bad_in_a_row = bad_in_a_row + 1 if bad else 0
    progress.skipped += bad
    metrics["guard/skipped_steps"] = progress.skipped
    if bad_in_a_row >= train.max_bad_steps:
        logger.log(progress.step + 1, metrics)
        logger.close()
        raise NonFiniteError(
            f"{bad_in_a_row} steps in a row (up to step {progress.step + 1}) had NaN/inf "
            "gradients and were skipped; the weights are those of step "
            f"{progress.step + 1 - bad_in_a_row} and the checkpoints hold no NaN. Check "
            "the reward and the data for NaN/inf; if the updates themselves diverge, start "
            "a new run with a lower optim.lr or train.precision: fp32."
        )
    return bad_in_a_row


def _add_step_metrics(
    metrics: dict[str, float], epoch: float, started: float, tokens: float
) -> None:
    """The epoch reached, the step's wall time and the job's token throughput (every rank's
    tokens: each step_fn returns its own)."""
    metrics["train/epoch"] = epoch
    metrics["time/step_s"] = time.perf_counter() - started
    tokens = float(distributed.all_sum(tokens))
    metrics["throughput/tokens_per_s"] = tokens / metrics["time/step_s"]


def _evaluate_and_log(
    metrics: dict[str, float],
    step: int,
    last_step: int,
    train: TrainConfig,
    eval_fn: Callable[[], dict[str, float]] | None,
    logger: MetricsLogger | NullLogger,
) -> None:
    """Evaluate when due, and log the step when due or evaluated: an evaluation is always
    logged with the training metrics of its step."""
    evaluated = eval_fn is not None and is_due(step, train.eval_every, last_step)
    if evaluated:
        metrics.update(eval_fn())
    if evaluated or is_due(step, train.log_every, last_step):
        logger.log(step, metrics)
