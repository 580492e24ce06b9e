"""NaN advantages in a PPO run: every poisoned update is skipped and counted, the run stops
after train.max_bad_steps in a row with a clear message, and no NaN reaches a checkpoint."""

import math

import pytest
import torch
from test_ppo import ppo_config

from tether.runs.checkpoint import list_checkpoints, load_checkpoint
from tether.runs.rundir import read_metrics
from tether.runs.training import NonFiniteError
from tether.stages.ppo import run_ppo


def test_nan_advantages_are_skipped_counted_and_never_saved(
    tiny_model_dir, ppo_files, tmp_path, monkeypatch
):
    import tether.core.algorithms as algorithms

    real_gae, calls = algorithms.gae, {"n": 0}

    def poisoned_gae(*args, **kwargs):
        calls["n"] += 1
        advantages, returns = real_gae(*args, **kwargs)
        if calls["n"] >= 2:  # from step 2 on, as a diverged critic would give
            advantages = advantages * math.nan
        return advantages, returns

    monkeypatch.setattr(algorithms, "gae", poisoned_gae)
    cfg = ppo_config(
        tiny_model_dir,
        ppo_files,
        "train.max_steps=6",
        "train.save_every=1",
        "train.max_bad_steps=3",
        "ppo.whiten_advantages=false",
    )
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        run_ppo(cfg, tmp_path / "run")

    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [m["guard/skipped_steps"] for m in metrics] == [0, 1, 2, 3]
    updates = [m["guard/skipped_updates"] for m in metrics]
    assert updates[0] == 0 and updates[1] > 0 and len(set(updates[1:])) == 1  # all of a step
    saved = list_checkpoints(tmp_path / "run/checkpoints")
    assert saved
    for path in saved:
        tensors, state, _ = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in tensors.values()), path
        moments = [
            v
            for s in state["optimizer"]["state"].values()
            for v in s.values()
            if torch.is_tensor(v)
        ]
        assert all(torch.isfinite(m).all() for m in moments), path
    first, last = load_checkpoint(saved[0])[0], load_checkpoint(saved[-1])[0]
    assert all(torch.equal(first[k], last[k]) for k in first)  # skipped steps moved nothing
