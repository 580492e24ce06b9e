"""Every training stage under torchrun: 2 CPU processes (gloo) against one plain process.

With the same global batch and seed, a 2-rank run must log the same losses and end with the
same weights as the single process, within float32 summation noise (each rank sums half the
batch, and the gradients are added in another order):
- logged losses and statistics to 1e-4 relative (1e-5 absolute for values near 0, such as
  a KL at the start);
- each final weight tensor within 1e-3 of the distance training moved it (Adam divides by
  √v, so a coordinate whose gradient is near 0 turns summation noise into a step of ~lr).
A 2-rank checkpoint (torch.distributed.checkpoint) must resume in a plain process and end
where the uninterrupted single process ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_dpo import dpo_overrides
from test_ppo import ppo_overrides
from test_sft import run_cli, sft_overrides

from tether.runs.rundir import read_jsonl, read_metrics

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
UPDATE_RTOL = 1e-3


def torchrun(nproc: int, args: list[str], env_extra: dict | None = None, check: bool = True):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "tether",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return proc


def stage_args(stage: str, out: Path, sets: list[str]) -> list[str]:
    return [stage, "--out", str(out)] + [a for s in sets for a in ("--set", s)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_run(single: Path, multi: Path, loss_keys: list[str]) -> None:
    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    checked = 0
    for ra, rb in zip(a, b, strict=True):
        for key in loss_keys:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=LOSS_RTOL, abs=LOSS_ATOL), (
                    ra["step"],
                    key,
                )
                checked += 1
    assert checked >= sum(r["step"] > 0 for r in a)  # every training step compared
    wa, wb, w0 = final_weights(single), final_weights(multi), first_weights(single)
    assert wa.keys() == wb.keys()
    trained = 0
    for name in w0.keys() & wa.keys():
        update = (wa[name] - w0[name]).norm()
        if update > 0:  # weights training moved (not a frozen base under LoRA)
            assert (wb[name] - wa[name]).norm() <= UPDATE_RTOL * update, name
            trained += 1
    assert trained


def first_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights the run started from: its config's model dir."""
    model_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"]
    return load_file(Path(model_dir) / "model.safetensors")


def test_sft_two_ranks_match_one_process(tiny_model_dir, memorisable_sft, tmp_path):
    sets = sft_overrides(
        tiny_model_dir,
        memorisable_sft,
        "train.max_steps=4",
        "train.eval_every=2",
        "train.grad_accum=2",
        "train.precision=fp32",
    )
    run_cli(stage_args("sft", tmp_path / "one", sets))
    torchrun(2, stage_args("sft", tmp_path / "two", sets))
    assert_same_run(tmp_path / "one", tmp_path / "two", ["train/loss", "eval/loss"])


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_two_rank_checkpoint_resumes_in_one_process(
    stage, tiny_model_dir, memorisable_sft, ppo_files, tmp_path
):
    """Killed after step 3 of a 2-rank job (checkpoint at step 2), resumed by a plain
    process: ends like one process all along. PPO's checkpoint also carries the KL
    controller and the score moments; its resumed samples are the uninterrupted run's."""
    common = ["train.max_steps=4", "train.save_every=2", "train.precision=fp32"]
    if stage == "sft":
        sets = sft_overrides(tiny_model_dir, memorisable_sft, *common)
    else:
        sets = ppo_overrides(
            tiny_model_dir,
            ppo_files,
            *common,
            "ppo.num_minibatches=1",
            "reward.normalize=true",
            "ppo.kl.adaptive=true",
            "rollout.samples_every=1",
        )
    run_cli(stage_args(stage, tmp_path / "one", sets))
    killed = tmp_path / "killed"
    proc = torchrun(2, stage_args(stage, killed, sets), {"TETHER_KILL_AT": "after_step:3"}, False)
    assert proc.returncode != 0 and not (killed / "final").exists()
    assert (killed / "checkpoints/step-2/.metadata").is_file()  # a sharded checkpoint
    resumed = run_cli([stage, "--out", str(killed), "--resume"])
    assert "resumed from" in resumed.stdout and "step-2 (step 2)" in resumed.stdout
    assert_same_run(tmp_path / "one", killed, ["train/loss", "kl/coef"])
    if stage == "ppo":
        one, two = read_jsonl(tmp_path / "one/samples.jsonl"), read_jsonl(killed / "samples.jsonl")
        assert [s["response"] for s in one] == [s["response"] for s in two]


def test_fsdp_two_ranks_match_one_process(tiny_model_dir, memorisable_sft, tmp_path):
    sets = sft_overrides(
        tiny_model_dir, memorisable_sft, "train.max_steps=3", "train.precision=fp32"
    )
    run_cli(stage_args("sft", tmp_path / "one", sets))
    torchrun(2, stage_args("sft", tmp_path / "two", [*sets, "parallel=fsdp"]))
    assert_same_run(tmp_path / "one", tmp_path / "two", ["train/loss"])


@pytest.mark.parametrize("stage", ["rm", "dpo", "dpo+fsdp"])
def test_preference_stages_two_ranks_match_one_process(
    stage, tiny_model_dir, marker_data, tmp_path
):
    sets = dpo_overrides(
        tiny_model_dir, marker_data, "train.max_steps=4", "train.eval_every=2", "train.grad_accum=2"
    )
    name, _, parallel = stage.partition("+")
    run_cli(stage_args(name, tmp_path / "one", sets))
    torchrun(2, stage_args(name, tmp_path / "two", [*sets, f"parallel={parallel or 'ddp'}"]))
    keys = ["train/loss", "eval/loss", "eval/accuracy", "eval/dpo/loss", "eval/rewards/accuracy"]
    assert_same_run(tmp_path / "one", tmp_path / "two", keys)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "ppo+lora+fsdp"])
def test_online_rl_two_ranks_match_one_process(algo, tiny_model_dir, ppo_files, tmp_path):
    """Each rank samples, scores and runs its forward passes on its own prompts; the score
    normalisation, GAE, advantage whitening (PPO) and group baselines (GRPO) are over the
    job's batch. Samples are seeded per row, so both runs draw the same answers. With LoRA
    under FSDP the reference is the sharded backbone with its adapters off."""
    extra = ["train.max_steps=3", "ppo.num_minibatches=1", "reward.normalize=true"]
    extra += ["rollout.samples_every=1"]
    if algo == "grpo":
        extra += ["algo=grpo", "rollout.samples_per_prompt=2"]
    if "lora" in algo:
        extra += ["model.lora.enabled=true", "model.lora.r=4"]
    if "fsdp" in algo:  # the least-squares head does not run under FSDP: both runs without
        extra += ["critic.fit=gradient"]
    sets = ppo_overrides(tiny_model_dir, ppo_files, *extra)
    run_cli(stage_args("ppo", tmp_path / "one", sets))
    parallel = ["parallel=fsdp"] if "fsdp" in algo else []
    torchrun(2, stage_args("ppo", tmp_path / "two", sets + parallel))
    one, two = (
        read_jsonl(tmp_path / "one/samples.jsonl"),
        read_jsonl(tmp_path / "two/samples.jsonl"),
    )
    assert [s["response"] for s in one] == [s["response"] for s in two]
    keys = ["train/loss", "policy/loss", "kl/mean", "reward/score_mean", "policy/entropy"]
    assert_same_run(tmp_path / "one", tmp_path / "two", keys)
