"""One PPO variant on a finished demo's prompts, preferences and reward model, judged as the
demo judges its own policy (held-out gold and KL, best-of-n at that KL).

Copies BASE (a `tether demo` dir, e.g. a `kl_frontier.py` budget run) to
BASE/../variant-NAME without its PPO run and evaluation, runs `tether ppo` on BASE's PPO
config with the given `--set` overrides, then the demo's held-out evaluation, and prints one
line of results. With k > 1 samples per prompt it also prints how much of the training
score the prompt explains: the explained variance of each answer's score by the mean of the
other answers to its prompt (leave one out), over the rollouts in samples.jsonl. Around 0,
or below, an answer's score hardly depends on its prompt, and a critic can only learn from
the answer so far.

    .venv/bin/python benchmarks/ppo_variant.py --base DEMO/frontier/budget-2 --name k4 \\
        --set rollout.samples_per_prompt=4 --set train.batch_size=4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from tether.config import PPOConfig, load_config
from tether.stages.ppo import run_ppo
from tether.tools.demo import saved_settings, stage_evaluation
from tether.tools.tasks import get_task

DROPPED = ("ppo", "eval", "report.html", "summary.json", "frontier")


def prompt_explained_variance(samples: list[dict]) -> float | None:
    """Mean over logged steps of 1 − Var(s − m₋ᵢ)/Var(s), m₋ᵢ the mean score of the other
    answers to answer i's prompt in that step's rollout (None without repeated prompts)."""
    per_step = []
    for step in sorted({s["step"] for s in samples}):
        rows = [s for s in samples if s["step"] == step]
        residuals = []
        for i, row in enumerate(rows):
            others = [
                r["score"] for j, r in enumerate(rows) if j != i and r["prompt"] == row["prompt"]
            ]
            if others:
                residuals.append(row["score"] - sum(others) / len(others))
        scores = [r["score"] for r in rows]
        if len(residuals) == len(rows) and statistics.pvariance(scores) > 0:
            per_step.append(1 - statistics.pvariance(residuals) / statistics.pvariance(scores))
    return sum(per_step) / len(per_step) if per_step else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a finished demo dir")
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = args.base.parent / f"variant-{args.name}"
    if not out.exists():
        shutil.copytree(args.base, out, ignore=shutil.ignore_patterns(*DROPPED))
    cfg = load_config(PPOConfig, args.base / "ppo/config.yaml", args.overrides, saved_run=True)
    started = time.perf_counter()
    run_ppo(cfg, out / "ppo", resume=True)
    ppo_s = time.perf_counter() - started
    settings = saved_settings(json.loads((out / "settings.json").read_text()))
    results = stage_evaluation(get_task(settings.task), settings, out)
    steps = [json.loads(line) for line in (out / "ppo/metrics.jsonl").read_text().splitlines()]
    explained = [m["value/explained_var"] for m in steps if "value/explained_var" in m]
    late = explained[len(explained) // 2 :]
    samples = [json.loads(line) for line in (out / "ppo/samples.jsonl").read_text().splitlines()]
    at_kl = results["best_of_n_gold_at_policy_kl"]
    loo = prompt_explained_variance(samples)
    print(
        f"{args.name} ({' '.join(args.overrides)}): held-out KL {results['kl']:.2f}, "
        f"gold {results['gold_policy']:.3f}, RM {results['rm_score_policy']:+.2f}, "
        f"win-rate {results['win_rate']:.0%}; best-of-n there: "
        + (
            "past n = 16"
            if at_kl is None
            else f"gold {at_kl:.3f}, RM {results['best_of_n_rm_at_policy_kl']:+.2f}"
        )
        + f"; PPO {ppo_s:.0f} s; explained variance, 2nd half "
        + (f"{sum(late) / len(late):.2f}" if late else "n/a")
        + ("" if loo is None else f"; the prompt's share of the score (leave one out) {loo:.2f}")
    )
    print("training KL by step:", [round(m["kl/mean"], 2) for m in steps])


if __name__ == "__main__":
    main()
