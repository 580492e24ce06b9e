"""`tether rm-eval` and `tether score`: a saved reward model applied to files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tether.data import DataError, load_preference_data, load_scored_responses
from tether.metrics import preference_metrics
from tether.reward_model import RewardModel
from tether.stages.rm import expand_rankings


def evaluate_reward_model(
    model_dir: str, data: str, max_length: int = 256, batch_size: int = 16
) -> dict[str, float | int]:
    """Pairwise metrics (see tether.metrics.preference_metrics) on raw scores."""
    items, _ = load_preference_data(data)
    pairs = expand_rankings(items, adjacent_only=False)
    rm = RewardModel.load(model_dir, max_length=max_length)
    prompts = [p.prompt for p in pairs]
    chosen = rm.score(prompts, [p.chosen for p in pairs], batch_size, normalize=False)
    rejected = rm.score(prompts, [p.rejected for p in pairs], batch_size, normalize=False)

    def lengths(texts):
        return torch.tensor(
            [len(rm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        )

    return preference_metrics(
        chosen, rejected, lengths([p.chosen for p in pairs]), lengths([p.rejected for p in pairs])
    )


def score_file(
    model_dir: str, data: str, out: Path, max_length: int = 256, batch_size: int = 16
) -> int:
    """Writes each input record with a normalised `score` added."""
    out = Path(out)
    if out.is_dir():  # checked before the model loads and the scoring runs
        raise DataError(f"{out} is a directory; --out takes a file path")
    rows, _ = load_scored_responses(data)
    rm = RewardModel.load(model_dir, max_length=max_length)
    scores = rm.score([p for _, p, _ in rows], [r for _, _, r in rows], batch_size)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for (record, _, _), score in zip(rows, scores.tolist(), strict=True):
            fh.write(json.dumps({**record, "score": score}) + "\n")
    tmp.replace(out)
    return len(rows)
