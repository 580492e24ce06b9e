"""`tether rm-eval` and `tether score`: a saved reward model applied to files."""

from __future__ import annotations

import json
from pathlib import Path

from tether.data import DataError, expand_rankings, load_preference_data, load_scored_responses
from tether.hardware import resolve_device
from tether.models.reward_model import RewardModel
from tether.stages.rm import pair_metrics, score_all, tokenize_pairs


def evaluate_reward_model(
    model_dir: str, data: str, max_length: int = 256, batch_size: int = 16, device: str = "auto"
) -> dict[str, float | int]:
    """Pairwise metrics (see tether.core.metrics.preference_metrics) on raw scores, computed by the
    same tokenisation, scoring and metric code as the reward stage's in-training eval."""
    items, report = load_preference_data(data)
    rm = RewardModel.load(model_dir, max_length=max_length, device=resolve_device(device))
    pairs = tokenize_pairs(
        expand_rankings(items, adjacent_only=False), rm.tokenizer, max_length, report
    )
    if not pairs:
        raise DataError(f"{data}: no pair left to evaluate ({report.summary()})")
    pairs_per_batch = max(1, batch_size // 2)  # a pair is two rows of one forward pass
    chosen, rejected = score_all(
        rm.model, pairs, pairs_per_batch, rm.tokenizer.pad_token_id, bf16=False
    )
    return pair_metrics(pairs, chosen, rejected)


def score_file(
    model_dir: str,
    data: str,
    out: Path,
    max_length: int = 256,
    batch_size: int = 16,
    device: str = "auto",
) -> int:
    """Writes each input record with a normalised `score` added."""
    out = Path(out)
    if out.is_dir():  # checked before the model loads and the scoring runs
        raise DataError(f"{out} is a directory; --out takes a file path")
    rows, _ = load_scored_responses(data)
    rm = RewardModel.load(model_dir, max_length=max_length, device=resolve_device(device))
    scores = rm.score([p for _, p, _ in rows], [r for _, _, r in rows], batch_size)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for (record, _, _), score in zip(rows, scores.tolist(), strict=True):
            fh.write(json.dumps({**record, "score": score}) + "\n")
    tmp.replace(out)
    return len(rows)
