"""Reward-model steps with each prompt run once for its answers, against whole rows.

    .venv/bin/python benchmarks/shared_prompts.py [--data FILE] [--steps 22]

Draws the RM stage's length-grouped steps (batch 8 items, max_length 256, seed 0) from a
preference file (default: the HH split of rm_vs_trl.py, made if missing), counts the tokens
each layout pads to over every step of an epoch, and times forward + backward (bf16
autocast, full fine-tuning of SmolLM2-135M-Instruct) over the first `--steps` steps, the
same batches both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, split_hh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path)
    parser.add_argument("--steps", type=int, default=22)
    args = parser.parse_args()

    import torch
    from tqdm.auto import tqdm

    from tether.config import RMConfig, load_config
    from tether.data import pad_rows
    from tether.models import load_tokenizer, resolve_model_source
    from tether.reward_model import (
        common_prefix_length,
        grouped_sequence_scores,
        load_reward_backbone,
        sequence_scores,
    )
    from tether.stages.rm import prepare_data
    from tether.training import autocast, example_indices

    if args.data is None:
        work = ROOT / "runs/bench-rm"
        work.mkdir(parents=True, exist_ok=True)
        args.data = work / "train.jsonl"
        if not args.data.exists():
            split_hh(work, 1600, 200)
    model_dir = resolve_model_source("smollm2-135m-instruct")
    cfg = load_config(
        RMConfig,
        None,
        [f"model.name={model_dir}", f"data.train={args.data}", "data.max_length=256"],
    )
    tokenizer = load_tokenizer(model_dir)
    train, _ = prepare_data(cfg, tokenizer)
    lengths = tuple(max(len(r) for r in x.rows) for x in train)
    batch = cfg.train.batch_size

    def step_items(step: int) -> list[list[list[int]]]:
        indices = example_indices(step * batch, batch, len(train), cfg.train.seed, lengths)
        return [train[i].rows for i in indices]

    whole_tokens = split_tokens = 0
    for step in range(len(train) // batch):
        groups = step_items(step)
        groups = [s for g in groups for s in ([g] if common_prefix_length(g) else [[r] for r in g])]
        rows = [r for g in groups for r in g]
        prefixes = [common_prefix_length(g) for g in groups]
        rest = [len(r) - p for p, g in zip(prefixes, groups, strict=True) for r in g]
        whole_tokens += len(rows) * max(map(len, rows))
        split_tokens += len(groups) * max(prefixes) + len(rows) * max(rest)

    torch.manual_seed(0)
    model = load_reward_backbone(cfg.model, tokenizer, 0).train()
    pad = tokenizer.pad_token_id
    seconds = {}
    for layout in ("whole", "shared"):
        total = 0.0
        for step in tqdm(range(args.steps), desc=layout, unit="step"):
            groups = step_items(step)
            started = time.perf_counter()
            with autocast(True):
                if layout == "shared":
                    scores = grouped_sequence_scores(model, groups, pad)
                else:
                    ids, mask = pad_rows([r for g in groups for r in g], pad)
                    scores = sequence_scores(model, ids, mask)
            scores.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            if step >= 2:  # the first steps allocate and build kernels
                total += time.perf_counter() - started
        seconds[layout] = total
    print(
        json.dumps(
            {
                "data": str(args.data),
                "epoch_padded_tokens_whole": whole_tokens,
                "epoch_padded_tokens_split": split_tokens,
                "split_over_whole": split_tokens / whole_tokens,
                f"seconds_steps_2_to_{args.steps - 1}": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
