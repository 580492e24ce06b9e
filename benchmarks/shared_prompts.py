"""Reward-model steps packed (each prompt once, no padding) against whole rows padded.

    .venv/bin/python benchmarks/shared_prompts.py [--data FILE] [--steps 22]

Draws the RM stage's length-grouped steps (batch 8 items, max_length 256, seed 0) from a
preference file (default: the HH split of rm_vs_trl.py, made if missing), counts the tokens
each layout runs over every step of an epoch, and times forward + backward (full
fine-tuning of SmolLM2-135M-Instruct, bf16 autocast where the CPU has native bf16, else
float32) over the first `--steps` steps, the same batches both ways.
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
    from tether.core.packing import pack_groups, pad_rows
    from tether.hardware import autocast, use_bf16
    from tether.models.loading import load_tokenizer, resolve_model_source
    from tether.models.reward_model import (
        grouped_sequence_scores,
        load_reward_backbone,
        sequence_scores,
    )
    from tether.runs.data_order import example_indices
    from tether.stages.rm import prepare_data

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

    whole_tokens = packed_tokens = 0
    for step in range(len(train) // batch):
        groups = step_items(step)
        rows = [r for g in groups for r in g]
        whole_tokens += len(rows) * max(map(len, rows))
        packed_tokens += pack_groups(groups).input_ids.numel()

    torch.manual_seed(0)
    model = load_reward_backbone(cfg.model, tokenizer, 0).train()
    pad, bf16 = tokenizer.pad_token_id, use_bf16("auto")
    seconds = {}
    for layout in ("whole", "packed"):
        total = 0.0
        for step in tqdm(range(args.steps), desc=layout, unit="step"):
            groups = step_items(step)
            started = time.perf_counter()
            with autocast(bf16):
                if layout == "packed":
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
                "epoch_tokens_packed": packed_tokens,
                "packed_over_whole": packed_tokens / whole_tokens,
                "bf16": bf16,
                f"seconds_steps_2_to_{args.steps - 1}": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
