"""Reward-model training: −log σ(r_w − r_l − m) on preference pairs, listwise rankings as pairs.

The loop: validate data -> expand rankings into weighted pairs -> tokenise prompt+response
(cut from the left, the score is read at the end) -> each step scores chosen and rejected
in one forward pass -> ranking loss + offset-pinning penalty -> after training, normalise
scores to mean 0, std 1 over the held-out responses and save a HF sequence-classification
model in `final/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tether.config import RewardLossConfig, RMConfig
from tether.data import (
    DataError,
    LoadReport,
    PreferencePair,
    RankedResponses,
    load_preference_data,
    split_train_eval,
)
from tether.losses import (
    listwise_to_pairs,
    pairwise_ranking_loss,
    score_centering_penalty,
    score_l2_penalty,
)
from tether.metrics import preference_metrics
from tether.reward_model import (
    encode_response,
    load_reward_backbone,
    pad_rows,
    save_reward_model,
    sequence_scores,
)
from tether.training import autocast, begin_run, fit, start_optimization


@dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    weight: float
    chosen_response_len: int
    rejected_response_len: int


def expand_rankings(
    items: list[PreferencePair | RankedResponses], adjacent_only: bool
) -> list[PreferencePair]:
    """Listwise records become their ordered pairs, weighted to sum to 1 per prompt."""
    out: list[PreferencePair] = []
    for item in items:
        if isinstance(item, PreferencePair):
            out.append(item)
            continue
        pairs, weights = listwise_to_pairs(item.ranking, adjacent_only=adjacent_only)
        for (w, lo), weight in zip(pairs, weights, strict=True):
            out.append(
                PreferencePair(item.prompt, item.responses[w], item.responses[lo], None, weight)
            )
    return out


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer, max_length: int, report: LoadReport
) -> list[TokenizedPair]:
    out = []
    for p in pairs:
        chosen = encode_response(tokenizer, p.prompt, p.chosen, max_length)
        rejected = encode_response(tokenizer, p.prompt, p.rejected, max_length)
        if chosen == rejected:
            report.skipped["identical after truncation"] += 1
            continue
        out.append(
            TokenizedPair(
                chosen,
                rejected,
                p.margin or 0.0,
                p.weight,
                len(tokenizer(p.chosen, add_special_tokens=False)["input_ids"]),
                len(tokenizer(p.rejected, add_special_tokens=False)["input_ids"]),
            )
        )
    return out


def prepare_pairs(cfg: RMConfig, tokenizer) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """Read, validate, expand and tokenise; raises DataError before any model loads."""
    adjacent = cfg.reward.listwise_pairs == "adjacent"
    items, report = load_preference_data(cfg.data.train, cfg.data.format)
    if cfg.data.eval:
        eval_items, eval_report = load_preference_data(cfg.data.eval, cfg.data.format)
    else:
        # Split by record, before expansion, so no prompt's ranking leaks into both sides.
        items, eval_items = split_train_eval(items, cfg.data.eval_fraction, cfg.train.seed)
        eval_report = report
    train = tokenize_pairs(expand_rankings(items, adjacent), tokenizer, cfg.data.max_length, report)
    held_out = tokenize_pairs(
        expand_rankings(eval_items, adjacent), tokenizer, cfg.data.max_length, eval_report
    )
    tqdm.write(report.summary() + f" -> {len(train)} train / {len(held_out)} held-out pairs")
    if not train:
        raise DataError(f"{cfg.data.train}: no usable preference pairs")
    return train, held_out


def score_pairs(
    model, pairs: list[TokenizedPair], pad_id: int, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected of a batch scored in ONE forward pass: [B] and [B]."""
    ids, mask = pad_rows([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    with autocast(bf16):
        scores = sequence_scores(model, ids, mask)
    return scores[: len(pairs)], scores[len(pairs) :]


def reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, pairs: list[TokenizedPair], cfg: RewardLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    margin = torch.tensor([p.margin for p in pairs])
    weights = torch.tensor([p.weight for p in pairs])
    loss, metrics = pairwise_ranking_loss(chosen, rejected, margin=margin, weights=weights)
    if cfg.center_coef:
        loss = loss + score_centering_penalty(chosen, rejected, cfg.center_coef)
    if cfg.l2_coef:
        loss = loss + score_l2_penalty(torch.cat([chosen, rejected]), cfg.l2_coef)
    return loss, metrics


@torch.no_grad()
def score_all(
    model, pairs: list[TokenizedPair], batch_size: int, pad_id: int, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = score_pairs(model, pairs[start : start + batch_size], pad_id, bf16)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def pair_metrics(
    pairs: list[TokenizedPair], chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, float]:
    lengths = torch.tensor([[p.chosen_response_len, p.rejected_response_len] for p in pairs])
    return preference_metrics(chosen, rejected, lengths[:, 0], lengths[:, 1])


def run_rm(cfg: RMConfig, out: Path, resume: bool = False) -> Path:
    """Train a reward model and return the path of `final/`."""
    begun = begin_run(cfg, out, resume)
    run, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    train, held_out = prepare_pairs(cfg, tokenizer)
    model = load_reward_backbone(cfg.model, tokenizer, cfg.train.seed)
    model.train()
    opt = start_optimization(run, cfg, model, len(train), begun.resume_from)
    pad_id, per_micro = tokenizer.pad_token_id, cfg.train.batch_size

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        pairs = [train[i] for i in indices]
        total_weight = sum(p.weight for p in pairs)
        sums = {"train/loss": 0.0, "train/accuracy": 0.0, "train/margin": 0.0}
        tokens = 0
        for start in range(0, len(pairs), per_micro):
            micro = pairs[start : start + per_micro]
            chosen, rejected = score_pairs(model, micro, pad_id, bf16)
            loss, metrics = reward_loss(chosen, rejected, micro, cfg.reward)
            share = sum(p.weight for p in micro) / total_weight  # exact under accumulation
            (loss * share).backward()
            sums["train/loss"] += loss.item() * share
            sums["train/accuracy"] += float(metrics["accuracy"]) * share
            sums["train/margin"] += float(metrics["margin"]) * share
            tokens += sum(len(p.chosen) + len(p.rejected) for p in micro)
        return sums, tokens

    latest_eval: list[tuple[torch.Tensor, torch.Tensor]] = []

    def eval_fn() -> dict[str, float]:
        chosen, rejected = score_all(model, held_out, per_micro * 2, pad_id, bf16)
        latest_eval[:] = [(chosen, rejected)]
        return {f"eval/{k}": v for k, v in pair_metrics(held_out, chosen, rejected).items()}

    fit(
        desc="rm",
        cfg=cfg,
        run=run,
        model=model,
        opt=opt,
        num_examples=len(train),
        step_fn=step_fn,
        eval_fn=eval_fn if held_out else None,
        lengths=[max(len(p.chosen), len(p.rejected)) for p in train],
    )

    mean, std = 0.0, 1.0
    if cfg.reward.normalize:
        if held_out and latest_eval:  # the last eval ran on the final weights: reuse it
            chosen, rejected = latest_eval[0]
        else:
            chosen, rejected = score_all(
                model, held_out or train[:256], per_micro * 2, pad_id, bf16
            )
        scores = torch.cat([chosen, rejected])
        mean, std = scores.mean().item(), max(scores.std(unbiased=False).item(), 1e-6)
        tqdm.write(
            f"score normalisation over {scores.numel()} reference responses: "
            f"mean {mean:.4f}, std {std:.4f}"
        )
    save_reward_model(model, tokenizer, run.final, mean, std)
    run.unlock()
    return run.final
