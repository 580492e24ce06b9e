"""The most any critic could explain in the demo's PPO run, measured by Monte Carlo.

A critic's explained variance is bounded by how much of the final score its state (the
prompt and the answer so far) determines: at a cut after t answer tokens the best value is
E[R | prefix_t], and what is left, E[Var(R | prefix_t)], no critic can explain. This script
takes answers from the last steps of a finished demo's PPO run (`ppo/samples.jsonl`), cuts
each after t tokens, samples K continuations from the final policy and scores them with the
demo's reward model. The ceiling at t is 1 − mean within-cut variance / Var(R) over the logged
answers' scores. It counts the score only (no KL terms) and Monte Carlo returns (λ = 1).

    .venv/bin/python benchmarks/critic_ceiling.py --demo runs/demo-X [--answers 24 --samples 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from tether.config import ModelConfig
from tether.models.loading import load_causal_lm, load_tokenizer
from tether.models.reward_model import RewardModel
from tether.runs.rundir import read_jsonl

CUTS = (0, 4, 8, 16, 24)


def continuation_scores(
    policy, tokenizer, rm, prompt: str, answer_ids: list[int], cut: int, samples: int, max_new: int
) -> torch.Tensor:
    """[samples] reward-model scores of the answer cut after `cut` tokens and continued."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids[:cut]]).repeat(samples, 1)
    with torch.inference_mode():
        out = policy.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new - cut,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
    texts = [tokenizer.decode(o[len(prompt_ids) :], skip_special_tokens=True) for o in out]
    return rm.score([prompt] * samples, texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--answers", type=int, default=24, help="logged answers, latest first")
    parser.add_argument("--samples", type=int, default=8, help="continuations per cut (K)")
    args = parser.parse_args()
    torch.manual_seed(0)
    final = str(args.demo / "ppo/final")
    tokenizer = load_tokenizer(final)
    policy = load_causal_lm(ModelConfig(name=final), tokenizer, dropout=False).eval()
    rm = RewardModel.load(str(args.demo / "rm/final"))
    config = yaml.safe_load((args.demo / "ppo/config.yaml").read_text())
    max_new = int(config["rollout"]["max_new_tokens"])
    logged = read_jsonl(args.demo / "ppo/samples.jsonl")[-args.answers :]
    within: dict[int, list[float]] = {cut: [] for cut in CUTS}
    for record in tqdm(logged, desc="answers"):
        answer_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        for cut in CUTS:
            if cut < len(answer_ids):
                scores = continuation_scores(
                    policy, tokenizer, rm, record["prompt"], answer_ids, cut, args.samples, max_new
                )
                within[cut].append(scores.var().item())
    variance = torch.tensor([r["score"] for r in logged]).var().item()
    print(f"{len(logged)} answers, Var(R) = {variance:.3f}")
    print("| answer tokens so far | ceiling on explained variance | answers |")
    print("|---|---|---|")
    for cut in CUTS:
        if within[cut]:
            ceiling = 1 - sum(within[cut]) / len(within[cut]) / variance
            print(f"| {cut} | {ceiling:.3f} | {len(within[cut])} |")


if __name__ == "__main__":
    main()
