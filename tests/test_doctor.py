"""The run doctor on synthetic logs: one per finding, and a healthy run that yields none."""

from __future__ import annotations

import json
import math
import random

import pytest
from test_sft import run_cli

from tether.tools.doctor import Run, diagnose, exit_status, read_run

STEPS = 30


def healthy(**changes) -> dict:
    """Per-step series of a run that learns and stays sane; `changes` replace series."""
    rng = random.Random(0)
    noise = [rng.gauss(0, 1) for _ in range(STEPS)]
    series = {
        "reward/score_mean": [0.03 * i + 0.05 * noise[i] for i in range(STEPS)],
        "reward/score_std": [1.0] * STEPS,
        "gold/mean": [0.02 * i + 0.03 * noise[i] for i in range(STEPS)],
        "kl/mean": [0.1 * i + 0.05 * abs(noise[i]) for i in range(STEPS)],
        "kl/coef": [0.05] * STEPS,
        "policy/entropy": [2.0 - 0.01 * i for i in range(STEPS)],
        "policy/approx_kl": [0.01 + 0.002 * abs(noise[i]) for i in range(STEPS)],
        "policy/clipfrac": [0.1 + 0.02 * noise[i] for i in range(STEPS)],
        "policy/loss": [-0.02 + 0.01 * noise[i] for i in range(STEPS)],
        "value/loss": [0.5 - 0.01 * i + 0.02 * noise[i] for i in range(STEPS)],
        "value/explained_var": [0.1 + 0.01 * i for i in range(STEPS)],
        "train/grad_norm": [1.0 + 0.1 * noise[i] for i in range(STEPS)],
        "response/length_mean": [20 + noise[i] for i in range(STEPS)],
        "response/eos_frac": [0.9] * STEPS,
    }
    series.update(changes)
    return series


def run_of(series: dict, samples=None, config=None) -> Run:
    metrics = [{"step": i + 1, **{k: v[i] for k, v in series.items()}} for i in range(STEPS)]
    return Run(metrics, samples or [], config or {})


def codes(run: Run) -> dict[str, str]:
    return {f.code: f.severity for f in diagnose(run)}


def ramp(start: float, end: float) -> list[float]:
    return [start + (end - start) * i / (STEPS - 1) for i in range(STEPS)]


def diverse_samples(step: int, n: int = 8) -> list[dict]:
    return [
        {"step": step, "prompt": f"p{i}", "response": f"answer {i} about topic {step} {i * 7}"}
        for i in range(n)
    ]


def test_a_healthy_run_has_no_finding():
    samples = diverse_samples(1) + diverse_samples(30)
    run = run_of(healthy(), samples)
    assert diagnose(run) == []
    assert exit_status(diagnose(run)) == 0


def test_score_up_gold_down_is_reward_hacking():
    gold = [0.05 * i if i < 10 else 0.5 - 0.08 * (i - 10) for i in range(STEPS)]
    findings = diagnose(run_of(healthy(**{"reward/score_mean": ramp(0, 3), "gold/mean": gold})))
    hacking = next(f for f in findings if f.code == "reward_hacking")
    assert hacking.severity == "critical" and hacking.steps == (11, 30)  # from the gold peak
    assert hacking.evidence["gold_late"] < hacking.evidence["gold_early"]
    assert findings[0].severity == "critical"  # most severe first


def test_without_gold_hacking_is_read_from_kl_length_and_samples():
    series = healthy(**{"reward/score_mean": ramp(0, 3), "kl/mean": ramp(0, 25)})
    series["response/length_mean"] = ramp(20, 60)
    del series["gold/mean"]
    late = [{"step": 30, "prompt": f"p{i}", "response": "great great great"} for i in range(8)]
    finding = next(
        f for f in diagnose(run_of(series, diverse_samples(1) + late)) if f.code == "reward_hacking"
    )
    assert finding.severity == "warning"
    assert set(finding.evidence["signals"]) == {"kl", "length", "repetition", "same_answer"}


def test_kl_blowup_fixed_and_adaptive():
    assert codes(run_of(healthy(**{"kl/mean": ramp(1, 60)})))["kl_blowup"] == "critical"
    adaptive = {"ppo": {"kl": {"adaptive": True, "target": 6.0}}}
    climbing = healthy(**{"kl/mean": ramp(5, 20), "kl/coef": ramp(0.1, 0.3)})
    assert "kl_blowup" in codes(run_of(climbing, config=adaptive))
    held = healthy(**{"kl/mean": ramp(5, 20), "kl/coef": ramp(0.3, 0.1)})  # β falling: no
    assert "kl_blowup" not in codes(run_of(held, config=adaptive))


def test_negative_kl():
    kl = [0.2] * 20 + [-1.5] * 10
    assert codes(run_of(healthy(**{"kl/mean": kl})))["negative_kl"] == "warning"


def test_instability_from_trust_region_and_gradient_spikes():
    series = healthy(**{"policy/approx_kl": [0.01] * 20 + [0.4] * 10})
    series["policy/clipfrac"] = [0.1] * 20 + [0.6] * 10
    series["train/grad_norm"] = [1.0] * 25 + [80.0] + [1.0] * 4
    finding = next(f for f in diagnose(run_of(series)) if f.code == "instability")
    assert finding.severity == "critical"
    assert finding.evidence["grad_norm_explosions"] == [[26, 80.0]]
    assert "policy/clipfrac_late_mean" in finding.evidence


def test_nan_is_critical_and_names_the_key():
    series = healthy()
    series["policy/loss"] = series["policy/loss"][:12] + ["nan"] * 18
    finding = next(f for f in diagnose(run_of(series)) if f.code == "nan")
    assert finding.steps[0] == 13 and finding.evidence["keys"] == ["policy/loss"]


def test_entropy_and_length_collapse():
    found = codes(run_of(healthy(**{"policy/entropy": ramp(2.0, 0.01)})))
    assert found["entropy_collapse"] == "warning"  # late mean ~0.2: a tenth of the start
    found = codes(run_of(healthy(**{"policy/entropy": [2.0] * 20 + [0.01] * 10})))
    assert found["entropy_collapse"] == "critical"  # deterministic: under the floor
    found = codes(run_of(healthy(**{"response/eos_frac": ramp(0.9, 0.02)})))
    assert found["length_collapse"] == "warning"


def test_stagnation_flat_reward_and_flat_groups():
    series = healthy(**{"reward/score_mean": [0.5 + 0.01 * (i % 2) for i in range(STEPS)]})
    series["reward/flat_group_frac"] = [0.95] * STEPS
    finding = next(f for f in diagnose(run_of(series)) if f.code == "stagnation")
    assert {"score_gain", "flat_group_frac_late"} <= finding.evidence.keys()


def test_a_useless_critic_is_named_and_is_not_stagnation_when_the_reward_rises():
    series = healthy(**{"reward/score_mean": ramp(0.0, 1.5)})
    series["value/explained_var"] = [(-0.25, 0.17, -0.1)[i % 3] for i in range(STEPS)]
    found = codes(run_of(series))
    assert found.get("critic_not_learning") == "warning" and "stagnation" not in found
    finding = next(f for f in diagnose(run_of(series)) if f.code == "critic_not_learning")
    assert finding.evidence["explained_var_late"] < 0.1
    assert any("critic.init" in r for r in finding.remedies)


def test_the_critic_is_judged_on_six_late_steps_not_on_a_noisy_three():
    """The demo's explained variance over its 16 steps: 0.15 on average over the second half,
    but two of the last three steps under 0.1. Over the last six, most are over 0.1: no
    finding. The same dip held for six steps is one. A run of 8 steps is read over its last
    four, not over six that reach back into the critic's warm-up (three of them under 0.1)."""
    demo = [0.0, 0.001, -0.001, 0.065, 0.092, 0.133, 0.191, 0.314]
    demo += [0.115, 0.142, 0.162, 0.387, 0.355, 0.02, -0.22, 0.245]

    def run(explained: list[float]) -> Run:
        return Run([{"step": i + 1, "value/explained_var": v} for i, v in enumerate(explained)])

    assert "critic_not_learning" not in codes(run(demo))
    held = [*demo[:10], 0.02, -0.22, 0.05, 0.02, -0.22, 0.245]
    assert codes(run(held)).get("critic_not_learning") == "warning"
    # a short run (--quick: 8 steps) reads its last half, not its warm-up
    assert "critic_not_learning" not in codes(run(demo[:8]))


def test_answers_shrinking_while_kl_rises_is_a_length_collapse():
    series = healthy(**{"reward/score_mean": ramp(0.0, 1.5), "kl/mean": ramp(0.5, 13.5)})
    series["response/length_mean"] = ramp(19, 3)
    finding = next(f for f in diagnose(run_of(series)) if f.code == "length_collapse")
    assert finding.severity == "critical"  # a word or two: under a quarter of the start
    assert finding.evidence["length_late"] < 5 and finding.evidence["kl_late"] > 10
    # Shorter answers at a steady KL are a style change, not a collapse.
    steady = healthy(**{"response/length_mean": ramp(19, 3), "kl/mean": [2.0] * STEPS})
    assert "length_collapse" not in codes(run_of(steady))


def test_degenerate_text_is_read_from_the_samples():
    late = [{"step": 30, "prompt": "p0", "response": "great great great great great"}]
    late += [{"step": 30, "prompt": f"q{i}", "response": "Film."} for i in range(7)]
    finding = next(
        f
        for f in diagnose(run_of(healthy(), diverse_samples(1) + late))
        if f.code == "degenerate_text"
    )
    assert "the same answers to different prompts" in finding.summary
    assert finding.evidence["duplicate_share_late"] > 0.5
    assert "Film." in finding.evidence["late_examples"]
    looping = [
        {"step": 30, "prompt": f"p{i}", "response": f"so good {i}" + " so good" * 5}
        for i in range(8)
    ]
    finding = next(
        f
        for f in diagnose(run_of(healthy(), diverse_samples(1) + looping))
        if f.code == "degenerate_text"
    )
    assert "answers repeating themselves" in finding.summary


def test_kl_spent_without_reward_gain_late_in_the_run():
    score = [min(0.1 * i, 1.5) for i in range(STEPS)]  # gains until step 15, then flat
    series = healthy(**{"reward/score_mean": score, "kl/mean": ramp(0.0, 12.0)})
    finding = next(f for f in diagnose(run_of(series)) if f.code == "kl_inefficient")
    assert finding.evidence["kl_spent_late"] > 3 and finding.evidence["kl_per_gain_late"] is None
    # KL rising in step with the reward is what PPO is for.
    steady = healthy(**{"reward/score_mean": ramp(0.0, 1.5), "kl/mean": ramp(0.0, 12.0)})
    assert "kl_inefficient" not in codes(run_of(steady))


def test_over_regularized_explains_the_flat_reward():
    series = healthy(**{"reward/score_mean": [0.5] * STEPS, "kl/mean": [0.01] * STEPS})
    series["kl/coef"] = [2.0] * STEPS
    found = codes(run_of(series))
    assert found.get("over_regularized") == "warning" and "stagnation" not in found


def test_cli_json_and_exit_status(tmp_path):
    series = healthy(**{"kl/mean": ramp(1, 60)})
    lines = [json.dumps({"step": i + 1, **{k: v[i] for k, v in series.items()}}) for i in range(30)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 31, "kl/me')  # torn
    proc = run_cli(["doctor", str(tmp_path), "--json"], check=False)
    assert proc.returncode == 2, proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    blowup = next(f for f in findings if f["code"] == "kl_blowup")
    assert blowup["severity"] == "critical" and blowup["steps"] == [1, 30]
    late_window = series["kl/mean"][-6:]  # the last fifth of 30 steps
    assert blowup["remedies"]
    assert math.isclose(blowup["evidence"]["kl_late"], sum(late_window) / 6)
    assert len(read_run(tmp_path).metrics) == 30  # the torn last line is skipped
    text = run_cli(["doctor", str(tmp_path)], check=False)
    assert "[CRITICAL] kl_blowup" in text.stdout


def test_doctor_on_a_dir_without_metrics_is_a_clear_error(tmp_path):
    proc = run_cli(["doctor", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "has no metrics.jsonl" in proc.stderr


@pytest.mark.parametrize("severity,status", [("info", 0), ("warning", 1), ("critical", 2)])
def test_exit_status_by_worst_severity(severity, status):
    from tether.tools.doctor import Finding

    findings = [Finding("x", "info", (1, 1), ""), Finding("y", severity, (1, 1), "")]
    assert exit_status(findings) == status


# --------------------------------------------------------------------------- real tiny runs


def provoked_run(tiny_model_dir, ppo_files, out, *extra):
    from test_ppo import ppo_config

    from tether.stages.ppo import run_ppo

    cfg = ppo_config(tiny_model_dir, ppo_files, "rollout.samples_every=1", *extra)
    run_ppo(cfg, out)
    return diagnose(read_run(out))


def test_doctor_names_hacking_in_a_real_run_with_no_kl_penalty(tiny_model_dir, ppo_files, tmp_path):
    """β = 0 against a reward that pays for characters: the policy drifts off the reference
    and settles on whatever long tokens it found, whatever the prompt. The critic learns by
    its loss alone, ~1000 on these raw scores at first: its gradient through the shared
    backbone speeds the drift (a least-squares head fits the scores' mean at once)."""
    _, reward = ppo_files
    findings = provoked_run(
        tiny_model_dir,
        ppo_files,
        tmp_path / "run",
        "ppo.kl.coef=0",
        "critic.fit=gradient",
        f"reward.terms=[{{name: '{reward}:response_chars'}}]",
        "train.max_steps=30",
    )
    hacking = [f for f in findings if f.code == "reward_hacking"]
    assert hacking, [f.code for f in findings]
    assert hacking[0].evidence["score_gain"] > 0


def test_doctor_names_instability_in_a_real_run_with_a_huge_learning_rate(
    tiny_model_dir, ppo_files, tmp_path
):
    findings = provoked_run(
        tiny_model_dir,
        ppo_files,
        tmp_path / "run",
        "optim.lr=3.0",
        "optim.max_grad_norm=0",
        "ppo.ppo_epochs=4",
        "train.max_steps=12",
    )
    assert {"instability", "nan"} & {f.code for f in findings}, [f.code for f in findings]
    assert exit_status(findings) == 2


def test_doctor_names_answers_collapsing_in_a_real_run_paid_for_brevity(
    peaked_model_dir, ppo_files, tmp_path
):
    """A reward that pays for short answers, on a model that can stop: the answers shrink to
    a token or two and the doctor says so (the failure the demo's keep-back task showed)."""
    _, reward = ppo_files
    findings = provoked_run(
        peaked_model_dir,
        ppo_files,
        tmp_path / "run",
        f"reward.terms=[{{name: '{reward}:response_chars', weight: -0.2}}]",
        "ppo.kl.coef=0.01",
        "optim.lr=0.003",
        "train.max_steps=24",
    )
    found = {f.code for f in findings}
    assert {"length_collapse", "degenerate_text"} & found, found
    lengths = [m["response/length_mean"] for m in read_run(tmp_path / "run").metrics]
    assert sum(lengths[-4:]) / 4 < 0.5 * sum(lengths[:4]) / 4


def test_a_value_loss_spike_is_instability_after_the_critics_warm_up_only():
    """The critic's first values are 0 (or a fit to one rollout): a spike there is its
    warm-up, as in the demo's step 2; the same spike later means updates too large."""
    flat = [0.1 + 0.005 * (i % 3) for i in range(STEPS)]
    early = [*flat[:1], 0.9, *flat[2:]]
    assert "instability" not in codes(run_of(healthy(**{"value/loss": early})))
    late = [*flat[:15], 0.9, *flat[16:]]
    finding = next(f for f in diagnose(run_of(healthy(**{"value/loss": late}))))
    assert finding.code == "instability" and finding.evidence["value/loss_spikes"] == [[16, 0.9]]
