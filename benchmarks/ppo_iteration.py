"""One full PPO iteration on SmolLM2-135M-Instruct + LoRA, at the performance issue's scale:
rollout of 64 prompts x 48 new tokens, scoring, reference and critic passes, 4 PPO epochs.

    .venv/bin/python benchmarks/ppo_iteration.py [--steps 3]

The config is examples/ppo.yaml (LoRA r=16, value head, β = 0.05, the "ends with !" rule
reward) with 64 sentiment-task prompts per iteration, 48 new tokens, 4 epochs x 4
minibatches. Reports seconds per iteration (mean over the steps after the first, which
also warms up), split into rollout and update, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--work", type=Path, default=ROOT / "runs/bench-ppo-iteration")
    args = parser.parse_args()
    from tether.tools.tasks import sentiment_prompts

    subprocess.run(["rm", "-rf", str(args.work)], check=True)
    args.work.mkdir(parents=True)
    prompts = args.work / "prompts.jsonl"
    needed = args.steps * args.prompts_per_step
    prompts.write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in sentiment_prompts(0)[:needed])
    )
    sets = {
        "train.batch_size": args.prompts_per_step,
        "rollout.max_new_tokens": args.max_new_tokens,
        "rollout.generation_batch_size": args.prompts_per_step,
        "ppo.ppo_epochs": 4,
        "ppo.num_minibatches": 4,
        "train.save_every": 0,
        "rollout.samples_every": 0,
    }
    out = args.work / "run"
    command = [str(ROOT / ".venv/bin/tether"), "ppo", "--config", str(ROOT / "examples/ppo.yaml")]
    command += ["--data", str(prompts), "--out", str(out), "--max-steps", str(args.steps)]
    command += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    wall, rss = timed(command)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steady = metrics[1:] or metrics
    mean = lambda key: sum(m[key] for m in steady) / len(steady)  # noqa: E731
    print(
        json.dumps(
            {
                "wall_s": wall,
                "peak_rss_gib": rss,
                "iteration_s": mean("time/step_s"),
                "rollout_s": mean("time/rollout_s"),
                "update_s": mean("time/train_s"),
                "response_tokens_mean": mean("response/length_mean"),
                "samples_per_s": args.prompts_per_step / mean("time/step_s"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
