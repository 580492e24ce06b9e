"""How much of an answer's final score the reward model's own states predict, token by token.

A candidate for the critic's features: the reward model reads (prompt, answer) causally, so
its state at an answer's t-th token sees only the answer so far, as a value function must.
This script runs the demo's reward model over the held-out answers of a finished demo
(`eval/samples.jsonl`: π_ref's and the policy's), and at every answer token fits the final
normalised score from (a) the reward model's score of the answer so far, with the position
and a constant, and (b) its last hidden states, by ridge. Fits use half of the prompts and
are scored (explained variance) on the other half. It counts the score only, no KL terms.

    .venv/bin/python benchmarks/critic_features.py --demo runs/demo-X
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tether.data import as_messages
from tether.hardware import autocast, bf16_available
from tether.models.reward_model import RewardModel, encode_response

RIDGES = (1.0, 10.0, 100.0)


def token_features(rm: RewardModel, prompt: str, answer: str) -> tuple[torch.Tensor, ...] | None:
    """([n, d] hidden states, [n] scores so far, final score) before each of the answer's n
    tokens, or None where the answer's tokens are not found inside the scored sequence."""
    full = encode_response(rm.tokenizer, as_messages(prompt), answer, rm.max_length)
    answer_ids = rm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    n = len(answer_ids)
    start = next(
        (
            len(full) - n - k
            for k in range(6)
            if full[len(full) - n - k : len(full) - k] == answer_ids
        ),
        None,
    )
    if not n or start is None or start == 0:
        return None
    with torch.inference_mode(), autocast(rm.bf16):
        states = rm.model.base_model(input_ids=torch.tensor([full])).last_hidden_state[0].float()
        scores = (rm.model.score(states).float().squeeze(-1) - rm.mean) / rm.std
    before = slice(start - 1, start - 1 + n)  # the state before token t is at position t − 1
    return states[before], scores[before], scores[-1]


def explained(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, ridge: float) -> float:
    """Explained variance on ~train of the ridge fit of y on [x, 1] over train."""
    inputs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fit = inputs[train]
    gram = fit.T @ fit + ridge * (fit**2).mean() * torch.eye(fit.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, fit.T @ y[train])
    test = ~train
    return 1.0 - (y[test] - inputs[test] @ w).var().item() / y[test].var().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    args = parser.parse_args()
    rm = RewardModel.load(str(args.demo / "rm/final"), bf16=bf16_available())
    lines = (args.demo / "eval/samples.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    print(
        "| answers | score so far + position | hidden states, ridge "
        + " / ".join(map(str, RIDGES))
        + " |"
    )
    print("|---|---|---|")
    for who in ("reference", "policy"):
        states, so_far, position, final, prompt_of = [], [], [], [], []
        for index, record in enumerate(records):
            for answer in record[who]:
                got = token_features(rm, record["prompt"], answer["response"])
                if got is None:
                    continue
                h, s, last = got
                states.append(h)
                so_far.append(s)
                position.append(torch.arange(len(s)) / 32.0)
                final.append(last.expand(len(s)))
                prompt_of.append(torch.full((len(s),), index))
        y = torch.cat(final).double()
        train = torch.cat(prompt_of) % 2 == 0
        small = torch.stack([torch.cat(so_far), torch.cat(position)], 1).double()
        hidden = torch.cat(states).double()
        by_ridge = " / ".join(f"{explained(hidden, y, train, r):.2f}" for r in RIDGES)
        print(f"| {who} ({len(final)}) | {explained(small, y, train, 0.0):.2f} | {by_ridge} |")


if __name__ == "__main__":
    main()
