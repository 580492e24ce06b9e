"""Would a linear critic warm-started on π_ref's answers to the training prompts predict PPO's
late rollouts? Measured offline on a finished demo.

A candidate for a critic that learns: before PPO, fit the value head on the preference
stage's answers (π_ref's, to the same training prompts, 4 each), scored by the reward model;
PPO's rollouts then only refine it. This script fits ridge regressions of the final
normalised score on the features at every answer token (frozen π_ref states, or the reward
model's with `--features rm`) and scores them (explained variance, the score only, no KL
terms) on the PPO rollouts logged in ppo/samples.jsonl from step 9 on:
- online: the earlier logged rollouts alone, decayed by `decay` a step (as critic.fit does);
- warm + online: those and the 800 warm-start answers, which get an intercept of their own
  (the policy's scores rise above π_ref's; only the slope carries over);
- warm only.

    .venv/bin/python benchmarks/critic_warm_start.py --demo runs/demo-X [--features rm]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tether.config import PPOConfig, load_config
from tether.hardware import autocast, bf16_available
from tether.models.loading import load_causal_lm, load_tokenizer
from tether.models.reward_model import RewardModel
from tether.rollout.generation import encode_prompt
from tether.rollout.passes import build_batch, response_hidden

RIDGES = (1e-3, 1e-2, 0.1)
DECAYS = (0.8, 0.95)
FIRST_SCORED_STEP = 9


def token_features(model, tokenizer, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """[n_i, d] states that emit each answer's tokens (at most 48), one tensor per answer."""
    out = []
    for start in range(0, len(prompts), 32):
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts[start : start + 32]]
        answer_ids = [
            tokenizer(a, add_special_tokens=False)["input_ids"][:48] or [tokenizer.eos_token_id]
            for a in answers[start : start + 32]
        ]
        batch = build_batch(prompt_ids, answer_ids, tokenizer.pad_token_id)
        with torch.inference_mode(), autocast(bf16_available()):
            hidden = response_hidden(model, batch).float()
        out += [hidden[j, : len(ids)].double() for j, ids in enumerate(answer_ids)]
    return out


def per_token(features: list[torch.Tensor], scores: torch.Tensor):
    """Token rows and each row's target, its answer's final score."""
    x = torch.cat(features)
    y = torch.cat([s.expand(len(f)) for f, s in zip(features, scores.double(), strict=True)])
    return x, y


def ridge_fit(blocks, ridge: float) -> torch.Tensor:
    """Weights over [features, 1, warm indicator] from (x, y, weight, warm) blocks, the ridge
    relative to the features' mean diagonal of the Gram matrix."""
    d = blocks[0][0].shape[1]
    gram = torch.zeros(d + 2, d + 2, dtype=torch.float64)
    cross = torch.zeros(d + 2, dtype=torch.float64)
    for x, y, weight, warm in blocks:
        ones = torch.ones(len(x), 1, dtype=x.dtype)
        inputs = torch.cat([x, ones, ones * float(warm)], 1)
        gram += weight * inputs.T @ inputs
        cross += weight * inputs.T @ y
    penalty = torch.zeros(d + 2, dtype=torch.float64)
    penalty[:d] = ridge * torch.diagonal(gram)[:d].mean()
    penalty[d + 1] = 1e-6 * torch.diagonal(gram)[:d].mean()  # the indicator when absent
    return torch.linalg.solve(gram + torch.diag(penalty), cross)


def explained(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype), torch.zeros(len(x), 1)], 1)
    return 1.0 - (y - inputs @ w).var().item() / y.var().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--features", choices=["reference", "rm"], default="reference")
    args = parser.parse_args()
    cfg = load_config(PPOConfig, str(args.demo / "ppo/config.yaml"), [])
    tokenizer = load_tokenizer(cfg.model.name)
    rm = RewardModel.load(str(args.demo / "rm/final"), bf16=bf16_available())
    if args.features == "rm":
        model = rm.model
    else:
        cfg.model.lora.enabled = False
        model = load_causal_lm(cfg.model, tokenizer, dropout=False).eval()

    lines = (args.demo / "prompts/train.jsonl").read_text().splitlines()
    train_prompts = {json.loads(line)["prompt"] for line in lines}
    warm_prompts, warm_answers = [], []
    for line in (args.demo / "preferences.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["prompt"] in train_prompts:
            warm_prompts += [record["prompt"]] * len(record["responses"])
            warm_answers += record["responses"]
    warm = per_token(
        token_features(model, tokenizer, warm_prompts, warm_answers),
        rm.score(warm_prompts, warm_answers),
    )
    samples = [
        json.loads(line)
        for line in (args.demo / "ppo/samples.jsonl").read_text().split("\n")
        if line
    ]
    steps = sorted({s["step"] for s in samples})
    rollouts = {}
    for step in steps:
        rows = [s for s in samples if s["step"] == step]
        features = token_features(
            model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows]
        )
        rollouts[step] = per_token(features, torch.tensor([r["score"] for r in rows]))
    print(f"{len(warm_answers)} warm-start answers; features: {args.features}")
    print("| ridge | decay | online | warm + online | warm only |")
    print("|---|---|---|---|---|")
    for ridge in RIDGES:
        for decay in DECAYS:
            results = {"online": [], "warm + online": [], "warm only": []}
            for step in (s for s in steps if s >= FIRST_SCORED_STEP):
                earlier = [(*rollouts[s], decay ** (step - s), False) for s in steps if s < step]
                x, y = rollouts[step]
                results["online"].append(explained(ridge_fit(earlier, ridge), x, y))
                both = ridge_fit([*earlier, (*warm, 1.0, True)], ridge)
                results["warm + online"].append(explained(both, x, y))
                results["warm only"].append(
                    explained(ridge_fit([(*warm, 1.0, False)], ridge), x, y)
                )
            means = " | ".join(f"{sum(v) / len(v):.2f}" for v in results.values())
            print(f"| {ridge:g} | {decay:g} | {means} |")


if __name__ == "__main__":
    main()
