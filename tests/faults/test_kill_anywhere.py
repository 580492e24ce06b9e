"""Kill anywhere: every training stage, SIGKILLed again and again and resumed, ends exactly
where an uninterrupted run ends.

For each of SFT, RM, DPO, PPO and GRPO on the tiny model: an uninterrupted reference run,
then one run killed at four seeded random points (after a step, or halfway through writing
a checkpoint) and once more at a random wall-clock moment (model loading, mid-step, mid-
write: wherever it lands), resumed with `--resume` after each kill. The final weights,
every logged metric and the samples log must equal the reference's. A real SIGKILL, so
nothing gets to clean up.
"""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import dpo_overrides
from test_ppo import ppo_overrides
from test_sft import run_cli, sft_overrides

from tether.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
from tether.runs.rundir import read_jsonl, read_metrics

KILLS_AT_POINTS = 4  # per stage, plus one timed kill: 5 stages x 5 = 25 kill points in all
MAX_STEPS = {"sft": 8, "rm": 8, "dpo": 8, "ppo": 6, "grpo": 6}
SAVE_EVERY = 2


STAGES = {
    "sft": (SFTConfig, "tether.stages.sft:run_sft"),
    "rm": (RMConfig, "tether.stages.rm:run_rm"),
    "dpo": (DPOConfig, "tether.stages.dpo:run_dpo"),
    "ppo": (PPOConfig, "tether.stages.ppo:run_ppo"),
    "grpo": (GRPOConfig, "tether.stages.ppo:run_ppo"),
}


def overrides_for(stage, tiny_model_dir, memorisable_sft, marker_data, ppo_files) -> list[str]:
    common = [f"train.max_steps={MAX_STEPS[stage]}", f"train.save_every={SAVE_EVERY}"]
    if stage == "sft":
        return sft_overrides(tiny_model_dir, memorisable_sft, *common, "train.eval_every=4")
    if stage == "rm":  # the same pairs, model and batch as DPO
        return dpo_overrides(tiny_model_dir, marker_data, *common, "train.eval_every=4")
    if stage == "dpo":
        return dpo_overrides(tiny_model_dir, marker_data, *common, "train.eval_every=4")
    extra = [*common, "rollout.samples_every=1", "reward.normalize=true"]
    if stage == "ppo":
        extra += ["ppo.kl.adaptive=true", "ppo.kl.horizon=100"]
    else:  # grpo: groups of 2 of 5 prompts
        extra += ["rollout.samples_per_prompt=2", "train.batch_size=5"]
    return ppo_overrides(tiny_model_dir, ppo_files, *extra)


def kill_points(stage: str) -> list[str]:
    """Four distinct points at strictly increasing steps, so each is reached after the resume
    before it (a resume replays from the last checkpoint at or before the kill)."""
    rng = random.Random(f"kill-anywhere-{stage}")
    last = MAX_STEPS[stage]
    steps = sorted(rng.sample(range(1, last + 1), KILLS_AT_POINTS))
    return [
        f"during_save:{s}" if s % SAVE_EVERY == 0 and rng.random() < 0.5 else f"after_step:{s}"
        for s in steps
    ]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_killed_five_times_ends_like_an_uninterrupted_run(
    stage, tiny_model_dir, memorisable_sft, marker_data, ppo_files, tmp_path
):
    import importlib

    config_class, runner = STAGES[stage]
    sets = overrides_for(stage, tiny_model_dir, memorisable_sft, marker_data, ppo_files)
    module, name = runner.split(":")
    reference = tmp_path / "uninterrupted"
    getattr(importlib.import_module(module), name)(load_config(config_class, None, sets), reference)

    killed = tmp_path / "killed"
    fresh = [stage, "--out", str(killed)] + [a for s in sets for a in ("--set", s)]
    resume = [stage, "--out", str(killed), "--resume"]
    for i, point in enumerate(kill_points(stage)):
        proc = run_cli(fresh if i == 0 else resume, {"TETHER_KILL_AT": point}, check=False)
        assert proc.returncode == -9, (point, proc.stderr[-2000:])  # really SIGKILLed there
        assert not (killed / "final").exists() or point == f"after_step:{MAX_STEPS[stage]}"
    # A kill at a wall-clock moment: wherever the resumed run happens to be.
    delay = random.Random(f"timer-{stage}").uniform(2.0, 7.0)
    proc = run_cli(resume, {"TETHER_KILL_AFTER_S": f"{delay:.2f}"}, check=False)
    assert proc.returncode in (-9, 0), proc.stderr[-2000:]
    run_cli(resume)

    a, b = final_weights(reference), final_weights(killed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma, mb = read_metrics(reference / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ra:
            if key.startswith(("time/", "throughput/")):  # wall clock: differs run to run
                continue
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    samples_a, samples_b = (
        read_jsonl(reference / "samples.jsonl"),
        read_jsonl(killed / "samples.jsonl"),
    )
    assert json.dumps(samples_a) == json.dumps(samples_b)
