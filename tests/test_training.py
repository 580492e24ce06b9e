"""The data order every offline stage draws from: seeded, resumable, optionally length-grouped."""

import platform
import random
import resource
import subprocess
import sys

import pytest

from tether.runs.data_order import LENGTH_GROUP_STEPS, epoch_order, example_indices
from tether.runs.optim import lr_multiplier


def padded_tokens(order: list[int], lengths: list[int], step: int) -> int:
    """Tokens a right-padded batch computes: every row padded to its step's longest."""
    return sum(
        max(lengths[i] for i in order[s : s + step]) * len(order[s : s + step])
        for s in range(0, len(order), step)
    )


def test_every_epoch_is_a_permutation_with_and_without_grouping():
    lengths = tuple(random.Random(i).randint(5, 300) for i in range(203))
    for grouped in (None, lengths):
        orders = [epoch_order(203, seed=3, epoch=e, lengths=grouped, step_size=8) for e in (0, 1)]
        assert all(sorted(o) == list(range(203)) for o in orders)
        assert orders[0] != orders[1]  # a new shuffle each epoch


def test_grouping_cuts_padding_and_keeps_the_order_seeded():
    rng = random.Random(0)
    lengths = tuple(rng.randint(20, 256) for _ in range(8 * LENGTH_GROUP_STEPS * 3))
    plain = epoch_order(len(lengths), seed=1, epoch=0)
    grouped = epoch_order(len(lengths), seed=1, epoch=0, lengths=lengths, step_size=8)
    assert grouped == epoch_order(len(lengths), seed=1, epoch=0, lengths=lengths, step_size=8)
    real = sum(lengths)
    # Uniform lengths in [20, 256]: a random batch of 8 pads to ~230; grouped steps to ~own length.
    assert padded_tokens(plain, lengths, 8) > 1.5 * real
    assert padded_tokens(grouped, lengths, 8) < 1.05 * real
    # Steps are shuffled after grouping: step lengths do not simply fall within a megabatch.
    step_max = [max(lengths[i] for i in grouped[s : s + 8]) for s in range(0, 8 * 64, 8)]
    assert step_max != sorted(step_max, reverse=True)


def test_consecutive_steps_cover_each_epoch_once_even_across_the_boundary():
    lengths = tuple(random.Random(i).randint(5, 100) for i in range(50))
    for grouped in (None, lengths):
        # 12 does not divide 50: the 5th step straddles epochs 0 and 1.
        drawn = [i for c in range(0, 96, 12) for i in example_indices(c, 12, 50, 7, grouped)]
        assert sorted(drawn[:50]) == list(range(50))
        assert len(set(drawn[50:96])) == 46  # epoch 1 so far: no repeats


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert lr_multiplier(0, 10, 2, "cosine") == 0.5
    assert lr_multiplier(1, 10, 2, "cosine") == 1.0
    assert lr_multiplier(2, 10, 2, "cosine") == 1.0
    assert abs(lr_multiplier(6, 10, 2, "cosine") - 0.5) < 1e-12
    assert lr_multiplier(10, 10, 2, "cosine") == 0.0
    assert lr_multiplier(6, 10, 2, "linear") == 0.5


def test_grouped_steps_stay_aligned_when_steps_do_not_divide_the_epoch():
    """203 examples in steps of 8: every step of every epoch, drawn at the run's cursor, is
    length-grouped except the one that straddles each epoch boundary."""
    rng = random.Random(1)
    lengths = tuple(rng.randint(20, 256) for _ in range(203))
    steps = [example_indices(c, 8, 203, 5, lengths) for c in range(0, 203 * 3 - 8, 8)]
    spreads = [max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps]
    loose = [k for k, spread in enumerate(spreads) if spread > 60]
    straddling = {k for k in range(len(steps)) if (8 * k) // 203 != (8 * k + 7) // 203}
    assert set(loose) <= straddling, (loose, straddling)


def test_non_finite_gradients_skip_the_step_and_stop_after_max_bad_steps(tmp_path):
    """A NaN in the loss leaves weights and optimizer state untouched (counted as
    guard/skipped_steps); train.max_bad_steps bad steps in a row stop the run."""
    import torch

    from tether.config import SFTConfig, load_config
    from tether.runs.rundir import RunDir, read_metrics
    from tether.runs.training import NonFiniteError, fit, start_optimization

    cfg = load_config(
        SFTConfig,
        None,
        ["data.train=unused", "train.max_steps=12", "train.batch_size=1", "train.max_bad_steps=3"],
    )
    run = RunDir(tmp_path)
    run.prepare(cfg, resume=False)
    model = torch.nn.Linear(2, 1)
    opt = start_optimization(run, cfg, model, num_examples=4, resume_from=None)
    poisoned = {3, 6, 7, 8}  # step 3 alone is skipped; 6, 7, 8 in a row stop the run
    snapshots = {}

    def step_fn(indices):
        step = opt.progress.step + 1
        snapshots[step] = model.weight.detach().clone()
        loss = model(torch.ones(1, 2)).sum()
        if step in poisoned:
            loss = loss * float("nan")
        loss.backward()
        return {"train/loss": loss.item()}, 1

    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        fit("t", cfg, run, model, opt, 4, step_fn)
    assert torch.equal(snapshots[4], snapshots[3])  # step 3 changed nothing
    assert not torch.equal(snapshots[3], snapshots[2])  # a good step does change weights
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["guard/skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1, 2, 3, 4]


FAULTS_OF_REALLOCATING = """
import resource, sys, torch
import tether.stages.sft  # the heap as a stage has it when begin_run calls keep_freed_memory
from tether.hardware import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.ones(16 * 2**20).sum()  # 64 MiB, above glibc's largest dynamic mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 * 2**20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_memory_is_reused_without_faulting_its_pages_in_again():
    """Five 64 MiB tensors allocated and freed in turn: by default glibc maps each afresh and
    the kernel faults in its 16,384 pages; kept, the heap grows once and the block is reused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    faults = {}
    for mode in ("default", "keep"):
        run = [sys.executable, "-c", FAULTS_OF_REALLOCATING, mode]
        faults[mode] = int(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
    pages = 16 * 2**20 * 4 // resource.getpagesize()
    assert faults["default"] >= 5 * pages * 0.95  # every allocation faults its pages in
    assert faults["keep"] <= pages * 1.1  # at most the first: the heap grows once
