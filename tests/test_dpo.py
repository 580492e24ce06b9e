"""DPO on a tiny real Llama: starts at ln 2, learns a marker preference, caches the reference."""

import math

import pytest
import torch
from safetensors.torch import load_file
from test_sft import TIMING_KEYS, run_cli

from tether.config import DPOConfig, load_config
from tether.models.loading import load_tokenizer
from tether.rollout.generation import encode_answer
from tether.runs.rundir import read_metrics
from tether.stages.dpo import REFERENCE_CACHE, run_dpo


def dpo_overrides(model_dir, data, *extra) -> list[str]:
    train, held_out = data
    return [
        f"model.name={model_dir}",
        f"data.train={train}",
        f"data.eval={held_out}",
        "optim.lr=3e-3",
        "train.batch_size=16",
        "train.threads=1",
        "train.precision=fp32",
        *extra,
    ]


def dpo_config(model_dir, data, *extra) -> DPOConfig:
    return load_config(DPOConfig, None, dpo_overrides(model_dir, data, *extra))


def test_answer_tokens_continue_the_prompt_as_the_chat_template_renders_them(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = [{"role": "user", "content": "Name a colour."}]
    ids = encode_answer(tokenizer, prompt, "Blue, like the sea.")
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(ids[:-1]) == "Blue, like the sea."


def test_dpo_starts_at_ln2_and_learns_a_held_out_preference(tiny_model_dir, marker_data, tmp_path):
    cfg = dpo_config(tiny_model_dir, marker_data, "train.max_steps=30", "train.eval_every=30")
    run_dpo(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    before, after = metrics[0], metrics[-1]
    # At step 0 the policy is the reference: h = 0 for every pair, the loss is exactly ln 2.
    assert before["eval/dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval/rewards/accuracy"] > 0.9, after
    assert after["eval/rewards/margin"] > 0 and after["eval/dpo/loss"] < 0.5
    train_keys = ["dpo/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"]
    train_keys += ["rewards/margin", "logps/chosen", "logps/rejected"]
    assert all(k in metrics[1] for k in train_keys)


def test_ipo_regresses_the_log_ratio_gap_towards_its_target(tiny_model_dir, marker_data, tmp_path):
    """IPO's minimum is at h = 1/(2β): with β = 0.5 the held-out margin β·h heads to 0.5, and
    unlike sigmoid DPO it does not keep growing past it."""
    cfg = dpo_config(
        tiny_model_dir,
        marker_data,
        "train.max_steps=30",
        "train.eval_every=30",
        "dpo.loss_type=ipo",
        "dpo.beta=0.5",
    )
    run_dpo(cfg, tmp_path / "run")
    after = read_metrics(tmp_path / "run/metrics.jsonl")[-1]
    assert after["eval/rewards/accuracy"] > 0.9
    assert 0.1 < after["eval/rewards/margin"] < 1.0, after


def test_killed_dpo_resumes_identically_without_recomputing_the_reference(
    tiny_model_dir, marker_data, tmp_path
):
    extra = ["train.max_steps=6", "train.save_every=2"]
    uninterrupted = tmp_path / "uninterrupted"
    run_dpo(dpo_config(tiny_model_dir, marker_data, *extra), uninterrupted)

    killed = tmp_path / "killed"
    sets = dpo_overrides(tiny_model_dir, marker_data, *extra)
    args = ["dpo", "--out", str(killed)] + [a for s in sets for a in ("--set", s)]
    proc = run_cli(args, {"TETHER_KILL_AT": "after_step:5"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    cache = killed / REFERENCE_CACHE
    written = cache.stat().st_mtime_ns
    resumed = run_cli(["dpo", "--out", str(killed), "--resume"])
    assert cache.stat().st_mtime_ns == written  # read back, not recomputed
    assert "reference log-probs" not in resumed.stderr

    a = load_file(uninterrupted / "final/model.safetensors")
    b = load_file(killed / "final/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ma = read_metrics(uninterrupted / "metrics.jsonl")
    mb = read_metrics(killed / "metrics.jsonl")
    for ra, rb in zip(ma, mb, strict=True):
        for key in ra.keys() - TIMING_KEYS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["step"], key)
    assert torch.equal(
        load_file(uninterrupted / REFERENCE_CACHE)["train"], load_file(cache)["train"]
    )
