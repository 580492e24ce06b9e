"""GRPO or RLOO: tether vs TRL's GRPOTrainer / RLOOTrainer on the same prompts, reward
function, group size and generation length, in one run; samples (completions) per second.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--algo grpo|rloo] [--steps 10]

SmolLM2-135M-Instruct, full fine-tuning, bf16 on both sides (float32 on a CPU without native
bf16: `common.trl_precision`), the prompts of examples/data/ppo-prompts.jsonl,
the rule reward of benchmarks/_exclaim_reward.py (1 for an answer ending in '!'), group size
4, 64 new tokens at temperature 1 with no top-k/top-p, one optimizer step per generation
batch, KL coefficient 0.04 (GRPO: a loss term; RLOO: in the reward; both sides run a
reference model). samples/s
counts whole iterations (generation, scoring, reference and training): tether's sum of
`time/step_s`, TRL's `train_runtime`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, ensure_trl_venv, timed, trl_precision


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--algo", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    args.work = args.work or ROOT / f"runs/bench-{args.algo}"
    args.work.mkdir(parents=True, exist_ok=True)
    prompts = ROOT / "examples/data/ppo-prompts.jsonl"
    reward = ROOT / "benchmarks/_exclaim_reward.py"
    from tether.models.loading import resolve_model_source

    model_dir = resolve_model_source("smollm2-135m-instruct")
    samples = args.steps * args.prompts_per_step * args.group_size
    results = {}

    tether_out = args.work / "tether"
    subprocess.run(["rm", "-rf", str(tether_out)], check=True)
    sets = {
        "reward.terms": f"[{{name: '{reward}:exclaim'}}]",
        "train.batch_size": args.prompts_per_step,
        "rollout.samples_per_prompt": args.group_size,
        "rollout.max_new_tokens": args.max_new_tokens,
        "rollout.missing_eos": "none",  # TRL applies no such penalty by default
        "optim.lr": args.lr,
        "optim.schedule": "linear",
        "ppo.kl.coef": args.beta,
        "ppo.ppo_epochs": 1,
        "train.save_every": 0,
    }
    stage = "grpo"
    if args.algo == "rloo":  # `tether ppo` with the critic-free leave-one-out baseline
        stage, sets["algo"] = "ppo", "rloo"
        sets["ppo.num_minibatches"] = 1
    command = [str(ROOT / ".venv/bin/tether"), stage, "--model", model_dir, "--data", str(prompts)]
    command += ["--out", str(tether_out), "--max-steps", str(args.steps)]
    command += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    wall, rss = timed(command)
    metrics = [json.loads(line) for line in (tether_out / "metrics.jsonl").open()]
    results["tether"] = {
        "wall_s": wall,
        "peak_rss_gib": rss,
        "train_s": sum(m["time/step_s"] for m in metrics),
        "rollout_s": sum(m["time/rollout_s"] for m in metrics),
        "reward_first_last": [metrics[0]["reward/score_mean"], metrics[-1]["reward/score_mean"]],
    }

    trl_out = args.work / "trl"
    command = [str(ensure_trl_venv()), str(ROOT / "benchmarks/_trl_grpo.py"), "--model", model_dir]
    command += ["--prompts", str(prompts), "--out", str(trl_out), "--steps", str(args.steps)]
    command += ["--prompts-per-step", str(args.prompts_per_step)]
    command += ["--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens)]
    command += ["--lr", str(args.lr), "--beta", str(args.beta), "--algo", args.algo]
    command += trl_precision()
    wall, rss = timed(command)
    trl_metrics = json.loads((trl_out / "train_metrics.json").read_text())
    results["trl"] = {
        "wall_s": wall,
        "peak_rss_gib": rss,
        "train_s": float(trl_metrics["train_runtime"]),
        "reward_first_last": [trl_metrics["rewards"][0], trl_metrics["rewards"][-1]],
    }
    for side in results.values():
        side["samples_per_s"] = samples / side["train_s"]
    results["ratio_samples_per_s"] = (
        results["tether"]["samples_per_s"] / results["trl"]["samples_per_s"]
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
