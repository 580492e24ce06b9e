"""A reward that raises, hangs, miscounts or returns NaN mid-run: the run stops with an error
naming the reward and the sample, after checkpointing the state the failing step started
from; once the reward is fixed, --resume ends exactly where an uninterrupted run ends."""

import pytest
from safetensors.torch import load_file
from test_ppo import ppo_config

from tether.errors import RewardError
from tether.runs.rundir import read_metrics
from tether.stages.ppo import run_ppo

FLAKY_REWARD = """
import math, time
from pathlib import Path

CALLS = {"n": 0}

def flaky(prompts, responses):
    CALLS["n"] += 1
    mode = (Path(__file__).parent / "mode.txt").read_text().strip()
    good = [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]
    if CALLS["n"] < 3 or mode == "ok":
        return good
    if mode == "raise":
        raise ValueError("boom")
    if mode == "hang":
        time.sleep(30)
    if mode == "count":
        return good[:3]
    if mode == "nan":
        return [math.nan] + good[1:]
    return good
"""

FAILURES = {
    "raise": r"raised ValueError: boom",
    "hang": r"did not return within 1s \(reward\.timeout_s",
    "count": r"returned 3 values for 10 responses",
    "nan": r"gave nan for sample 0: prompt 'Write about",
}


@pytest.fixture(scope="module")
def flaky(tmp_path_factory, tiny_model_dir, ppo_files):
    root = tmp_path_factory.mktemp("flaky")
    (root / "flaky_reward.py").write_text(FLAKY_REWARD)
    (root / "mode.txt").write_text("ok")
    extra = [
        f"reward.terms=[{{name: '{root / 'flaky_reward.py'}:flaky'}}]",
        "reward.timeout_s=1",
        "train.max_steps=4",
    ]
    reference = root / "uninterrupted"
    run_ppo(ppo_config(tiny_model_dir, ppo_files, *extra), reference)
    return root, extra, reference


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failing_reward_is_named_checkpointed_and_resumable(
    failure, flaky, tiny_model_dir, ppo_files, tmp_path
):
    root, extra, reference = flaky
    cfg = ppo_config(tiny_model_dir, ppo_files, *extra)
    (root / "mode.txt").write_text(failure)
    try:
        with pytest.raises(RewardError, match=FAILURES[failure]) as caught:
            run_ppo(cfg, tmp_path / "run")
    finally:
        (root / "mode.txt").write_text("ok")
    assert "state saved at step 2; fix the reward, then --resume" in str(caught.value)
    assert (tmp_path / "run/checkpoints/step-2").is_dir()  # save_every=0: saved for the error
    assert [m["step"] for m in read_metrics(tmp_path / "run/metrics.jsonl")] == [1, 2]

    run_ppo(cfg, tmp_path / "run", resume=True)
    a = load_file(reference / "final/model.safetensors")
    b = load_file(tmp_path / "run/final/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma = read_metrics(reference / "metrics.jsonl")
    mb = read_metrics(tmp_path / "run/metrics.jsonl")
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ra:
            if not key.startswith(("time/", "throughput/")):
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
