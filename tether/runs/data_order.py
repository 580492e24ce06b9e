"""Which examples each optimizer step draws: seeded, resumable, optionally length-grouped.

Its own module because the data order is pure arithmetic on a cursor, a seed and the
example lengths (no model, no optimizer), so tests and benchmarks reproduce a run's batches
without setting up a run, and a resumed run draws exactly the batches an uninterrupted one
would have.
"""

from __future__ import annotations

import functools
import math

import torch

from tether.config import TrainConfig


def examples_per_step(train: TrainConfig) -> int:
    """Examples drawn per step of `fit`: a batch per micro-step, grad_accum micro-steps."""
    return train.batch_size * train.grad_accum


def total_steps(train: TrainConfig, num_examples: int, per_step: int | None = None) -> int:
    if train.max_steps:
        return train.max_steps
    per_step = per_step or examples_per_step(train)
    return train.epochs * max(1, math.ceil(num_examples / per_step))


# Steps per length-sorted "megabatch" (as in Hugging Face's LengthGroupedSampler): large enough
# that each step's examples have similar lengths, small enough to stay close to a shuffle.
LENGTH_GROUP_STEPS = 64


@functools.lru_cache(maxsize=4)
def epoch_order(
    num_examples: int,
    seed: int,
    epoch: int,
    lengths: tuple[int, ...] | None = None,
    step_size: int = 1,
) -> list[int]:
    """A seeded shuffle of range(num_examples), one per epoch.

    With `lengths`, each optimizer step (`step_size` consecutive positions of the run's
    cursor) draws examples of similar length, so a batch padded to its longest row wastes
    little compute. Steps are counted from the start of the run, so an epoch whose length is
    not a multiple of step_size opens with a few positions that complete the previous
    epoch's last step, and ends with the positions that start the next one; those stay as
    shuffled. The full steps in between come from megabatches of LENGTH_GROUP_STEPS steps,
    each sorted by length and cut into steps, and the steps are shuffled again so lengths
    do not rise and fall in a sawtooth.

    Cached (a run asks for the same epoch's order at every step); callers must not mutate
    the returned list, and `lengths` is a tuple so that it can be a cache key.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    if lengths is None or step_size >= num_examples:
        return order
    head = (-epoch * num_examples) % step_size  # finishes a step begun in the last epoch
    full = (num_examples - head) // step_size * step_size
    body, tail = order[head : head + full], order[head + full :]
    mega = LENGTH_GROUP_STEPS * step_size
    steps: list[list[int]] = []
    for start in range(0, len(body), mega):
        chunk = sorted(body[start : start + mega], key=lambda i: lengths[i], reverse=True)
        steps += [chunk[k : k + step_size] for k in range(0, len(chunk), step_size)]
    shuffled = torch.randperm(len(steps), generator=generator).tolist()
    return order[:head] + [i for s in shuffled for i in steps[s]] + tail


def example_indices(
    cursor: int,
    count: int,
    num_examples: int,
    seed: int,
    lengths: tuple[int, ...] | None = None,
) -> list[int]:
    """The `count` examples after `cursor` examples consumed, over seeded per-epoch orders.

    The data position of a run is this one integer, so a resumed run draws exactly the
    batches an uninterrupted run would have drawn, across epoch boundaries too. With
    `lengths`, each epoch's order is length-grouped in steps of `count` (see epoch_order).
    """
    out: list[int] = []
    order_epoch, order = -1, []
    for position in range(cursor, cursor + count):
        epoch, index = divmod(position, num_examples)
        if epoch != order_epoch:
            order_epoch = epoch
            order = epoch_order(num_examples, seed, epoch, lengths, count)
        out.append(order[index])
    return out
