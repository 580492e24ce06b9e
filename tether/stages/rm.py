"""Reward-model training: −log σ(r_w − r_l − m) on preference pairs, listwise rankings as
weighted pairs or under the Plackett-Luce likelihood.

The loop: validate data -> expand rankings into weighted pairs (or keep them whole for
Plackett-Luce) -> tokenise prompt+response (cut from the left, the score is read at the end)
-> each step scores all responses of its micro-batch, each prompt run once for its answers
(`grouped_sequence_scores`) -> ranking loss +
offset-pinning penalty -> after training, normalise scores to mean 0, std 1 over the held-out
responses and save a HF sequence-classification model in `final/`. Held-out evaluation is
always pairwise, so both losses are judged by the same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tether.config import RewardLossConfig, RMConfig
from tether.console import say
from tether.core.losses import (
    list_centering_penalty,
    listwise_to_pairs,
    pairwise_ranking_loss,
    plackett_luce_loss,
    score_centering_penalty,
    score_l2_penalty,
)
from tether.core.metrics import preference_metrics
from tether.core.packing import batches_of_groups, common_prefix_length, distinct_rows
from tether.data import (
    DataError,
    LoadReport,
    PreferencePair,
    RankedResponses,
    expand_rankings,
    load_preference_splits,
)
from tether.hardware import autocast
from tether.models.reward_model import (
    TrunkStates,
    encode_response,
    grouped_sequence_scores,
    load_reward_backbone,
    save_reward_model,
)
from tether.runs import distributed
from tether.runs.training import begin_run, fit, save_final, start_optimization


@dataclass(frozen=True)
class TokenizedPair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    weight: float
    chosen_response_len: int
    rejected_response_len: int

    @property
    def rows(self) -> list[list[int]]:
        return [self.chosen, self.rejected]

    @property
    def pair_terms(self) -> list[tuple[int, int, float, float]]:
        return [(0, 1, self.margin, self.weight)]


@dataclass(frozen=True)
class TokenizedRanking:
    """One prompt's responses, best first. Plackett-Luce reads the whole order; the pairwise
    loss reads `pair_terms` (winner row, loser row, margin, weight), so each response is scored
    once however many pairs it is in: K forwards for K(K−1)/2 pairs."""

    rows: list[list[int]]
    pair_terms: list[tuple[int, int, float, float]] = field(default_factory=list)
    weight: float = 1.0


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


def tokenize_rankings(
    items: list[PreferencePair | RankedResponses], tokenizer, max_length: int, report: LoadReport
) -> list[TokenizedRanking]:
    """Whole rankings for Plackett-Luce; a pair is a ranking of two."""
    out = []
    for item in items:
        if isinstance(item, PreferencePair):
            texts = [item.chosen, item.rejected]
        else:
            texts = [item.responses[i] for i in item.ranking]
        rows = [encode_response(tokenizer, item.prompt, t, max_length) for t in texts]
        if len({tuple(r) for r in rows}) < len(rows):
            report.skipped["identical responses after truncation"] += 1
            continue
        out.append(TokenizedRanking(rows))
    return out


def tokenize_ranking_pairs(
    ranking: RankedResponses, tokenizer, max_length: int, adjacent_only: bool, report: LoadReport
) -> TokenizedRanking | None:
    """A ranking kept whole for the pairwise loss, with the pairs `listwise_to_pairs` gives;
    a pair whose two responses are identical after truncation is dropped, not the ranking."""
    rows = [
        encode_response(tokenizer, ranking.prompt, ranking.responses[i], max_length)
        for i in ranking.ranking
    ]
    pairs, weights = listwise_to_pairs(list(range(len(rows))), adjacent_only=adjacent_only)
    terms = [(w, lo, 0.0, wt) for (w, lo), wt in zip(pairs, weights, strict=True)]
    kept = [t for t in terms if rows[t[0]] != rows[t[1]]]
    report.skipped["identical after truncation"] += len(terms) - len(kept)
    return TokenizedRanking(rows, kept, sum(t[3] for t in kept)) if kept else None


TrainItem = TokenizedPair | TokenizedRanking

# The most memory the reward model's kept trunk states take (`TrunkStates`): ~1.5M tokens at
# SmolLM2's width. Items past it run their lower layers in every epoch.
TRUNK_KEEP_BYTES = 4 * 2**30


def prepare_data(cfg: RMConfig, tokenizer) -> tuple[list[TrainItem], list[TokenizedPair]]:
    """Read, validate, split and tokenise; raises DataError before any model loads.

    Training items are pairs, or whole rankings with `reward.listwise_loss: plackett_luce`;
    held-out items are always pairs.
    """
    splits = load_preference_splits(cfg.data, cfg.train.seed)
    adjacent = cfg.reward.listwise_pairs == "adjacent"
    held_out_pairs = expand_rankings(splits.held_out, adjacent)
    max_len = cfg.data.max_length
    if cfg.reward.listwise_loss == "plackett_luce":  # whole rankings, not their pairs
        train = tokenize_rankings(splits.train, tokenizer, max_len, splits.report)
    else:
        train = []
        for record in splits.train:
            if isinstance(record, PreferencePair):
                train += tokenize_pairs([record], tokenizer, max_len, splits.report)
            elif item := tokenize_ranking_pairs(
                record, tokenizer, max_len, adjacent, splits.report
            ):
                train.append(item)
    held_out = tokenize_pairs(held_out_pairs, tokenizer, max_len, splits.eval_report)
    say(
        f"{splits.report.summary()} -> {len(train)} training items (pairs or whole rankings), "
        f"{len(held_out)} held-out pairs"
    )
    if not train:
        raise DataError(f"{cfg.data.train}: no usable preference pairs")
    return train, held_out


def score_items(
    items: list[TrainItem],
    model,
    pad_id: int,
    bf16: bool,
    trunks: TrunkStates | None = None,
    keys: Sequence[int] = (),
) -> torch.Tensor:
    """[Σ rows] scores of every response of a micro-batch; each item's prompt runs once, and
    with `trunks` (the items being training items `keys`) the frozen lower layers once per
    item over the whole run."""
    with autocast(bf16):
        return grouped_sequence_scores(model, [item.rows for item in items], pad_id, trunks, keys)


def ranking_loss(
    items: list[TokenizedRanking], flat: torch.Tensor, cfg: RewardLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plackett-Luce NLL of a micro-batch of rankings, from their [Σ rows] scores `flat`."""
    width = max(len(item.rows) for item in items)
    valid = torch.tensor(
        [[k < len(item.rows) for k in range(width)] for item in items], device=flat.device
    )
    scores = flat.new_zeros(valid.shape).masked_scatter(valid, flat)  # [N, K], best first
    loss, metrics = plackett_luce_loss(scores, valid)
    if cfg.center_coef:
        loss = loss + list_centering_penalty(scores, valid, cfg.center_coef)
    if cfg.l2_coef:
        loss = loss + score_l2_penalty(flat, cfg.l2_coef)
    return loss, metrics


def pair_loss(
    items: list[TrainItem], flat: torch.Tensor, cfg: RewardLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry over the pairs of a micro-batch of pairs and whole rankings, from their
    [Σ rows] scores `flat`."""
    winners, losers, margins, weights, offset = [], [], [], [], 0
    for item in items:
        for w, lo, margin, weight in item.pair_terms:
            winners.append(offset + w)
            losers.append(offset + lo)
            margins.append(margin)
            weights.append(weight)
        offset += len(item.rows)
    chosen, rejected = flat[winners], flat[losers]
    loss, metrics = pairwise_ranking_loss(
        chosen,
        rejected,
        margin=torch.tensor(margins, device=flat.device),
        weights=torch.tensor(weights, device=flat.device),
    )
    if cfg.center_coef:
        loss = loss + score_centering_penalty(chosen, rejected, cfg.center_coef)
    if cfg.l2_coef:
        loss = loss + score_l2_penalty(flat, cfg.l2_coef)
    return loss, metrics


@torch.no_grad()
def score_rows(
    model: torch.nn.Module | distributed.Parallel,
    rows: list[list[int]],
    batch_size: int,
    pad_id: int,
    bf16: bool,
    prompt_lengths: Sequence[int] = (),
) -> torch.Tensor:
    """[N] raw scores (on the CPU) of tokenised prompt+response rows, in eval mode; in a
    torchrun job each rank scores its share and every rank gets all N. `prompt_lengths`:
    where given, consecutive rows that share their first prompt_length tokens (a prompt's
    answers) run as one group, the prompt once (`grouped_sequence_scores`); batches hold
    about `batch_size` rows."""
    parallel = distributed.Parallel.of(model)
    was_training = parallel.model.training
    parallel.model.eval()
    lengths = list(prompt_lengths) or [0] * len(rows)
    mine, real = distributed.eval_share(list(zip(rows, lengths, strict=True)), (rows[0], 0))
    groups: list[list[list[int]]] = []
    opening = 0  # the prompt length of the last group's first row
    for row, length in mine:
        shared = min(length, opening)
        if shared and common_prefix_length([groups[-1][0], row]) >= shared:
            groups[-1].append(row)
        else:
            groups.append([row])
            opening = length
    out = [torch.zeros(0)]
    for batch in batches_of_groups(groups, batch_size):
        with autocast(bf16):
            out.append(parallel(grouped_sequence_scores, batch, pad_id).cpu())
    parallel.model.train(was_training)
    return distributed.gather_real(torch.cat(out), real)


def score_all(
    model: torch.nn.Module | distributed.Parallel,
    pairs: list[TokenizedPair],
    batch_size: int,
    pad_id: int,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[P] chosen and [P] rejected scores. Each distinct row is scored once: the pairs of a
    held-out ranking of K answers hold each answer K − 1 times (3x the forwards at K = 4),
    and its answers run after one pass over their prompt. A row's prompt is taken as the
    shortest prefix it shares with the other row of a pair it is in."""
    rows = [r for p in pairs for r in p.rows]  # chosen, rejected, chosen, ...
    first, group_of_row = distinct_rows([tuple(r) for r in rows])
    prompt = [len(rows[i]) for i in first]
    for k, pair in enumerate(pairs):
        shared = common_prefix_length(pair.rows)
        for row in (2 * k, 2 * k + 1):
            distinct = int(group_of_row[row])
            prompt[distinct] = min(prompt[distinct], shared)
    scores = score_rows(model, [rows[i] for i in first], batch_size * 2, pad_id, bf16, prompt)
    scores = scores[group_of_row].view(-1, 2)
    return scores[:, 0], scores[:, 1]


def pair_metrics(
    pairs: list[TokenizedPair], chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, float]:
    lengths = torch.tensor([[p.chosen_response_len, p.rejected_response_len] for p in pairs])
    return preference_metrics(chosen, rejected, lengths[:, 0], lengths[:, 1])


def run_rm(cfg: RMConfig, out: Path, resume: bool = False) -> Path:
    """Train a reward model and return the path of `final/`."""
    begun = begin_run(cfg, out, resume)
    run, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    train, held_out = prepare_data(cfg, tokenizer)
    per_micro = distributed.per_rank(cfg.train.batch_size, "train.batch_size")
    model = load_reward_backbone(cfg.model, tokenizer, cfg.train.seed).to(begun.device)
    model.train()
    parallel = distributed.Parallel(model, cfg.parallel, bf16, cfg.fsdp_cpu_offload)
    opt = start_optimization(run, cfg, model, len(train), begun.resume_from)
    pad_id = tokenizer.pad_token_id
    # the frozen lower layers' states, kept for later epochs (none where every layer trains)
    steps = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
    seen_again = cfg.train.epochs > 1 or steps > len(train)
    trunks = TrunkStates(model, TRUNK_KEEP_BYTES if seen_again else 0)

    micro_loss = ranking_loss if cfg.reward.listwise_loss == "plackett_luce" else pair_loss

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        total_weight = sum(train[i].weight for i in indices)  # the whole step's
        mine = distributed.shard(indices)
        items = [train[i] for i in mine]
        sums: dict[str, float] = {}
        tokens = 0
        for start in range(0, len(items), per_micro):
            micro, keys = items[start : start + per_micro], mine[start : start + per_micro]
            share = sum(x.weight for x in micro) / total_weight  # exact under accumulation
            with parallel.micro_batch(last=start + per_micro >= len(items)):
                loss, metrics = parallel(
                    lambda m, micro=micro, keys=keys: micro_loss(
                        micro, score_items(micro, m, pad_id, bf16, trunks, keys), cfg.reward
                    )
                )
                (loss * share * parallel.loss_scale).backward()
            for key, value in {"loss": loss, **metrics}.items():
                sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + float(value.detach()) * share
            tokens += sum(len(r) for x in micro for r in x.rows)
        return distributed.sum_metrics(sums), tokens

    latest_eval: list[tuple[torch.Tensor, torch.Tensor]] = []

    def eval_fn() -> dict[str, float]:
        chosen, rejected = score_all(parallel, held_out, per_micro * 2, pad_id, bf16)
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
        lengths=[max(len(r) for r in x.rows) for x in train],
    )

    mean, std = 0.0, 1.0
    if cfg.reward.normalize:
        if held_out and latest_eval:  # the last eval ran on the final weights: reuse it
            scores = torch.cat(latest_eval[0])
        else:  # no held-out set: the responses of the first training items
            rows = [r for x in (held_out or train[:256]) for r in x.rows]
            scores = score_rows(parallel, rows, per_micro * 2, pad_id, bf16)
        mean, std = scores.mean().item(), max(scores.std(unbiased=False).item(), 1e-6)
        say(
            f"score normalisation over {scores.numel()} reference responses: "
            f"mean {mean:.4f}, std {std:.4f}"
        )
    save_final(parallel, lambda m: save_reward_model(m, tokenizer, run.final, mean, std), run, cfg)
    run.unlock()
    return run.final
