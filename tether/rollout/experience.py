"""One iteration's experience for online RL, one step per function:

    sample_and_score   sample k responses per prompt from π_θ; score each once (reward, gold)
    forward_passes     π_old and π_ref log-probs, the critic's values, the policy's entropy
    shape_scores       the missing-EOS rule, then optional running normalisation and clipping
    advantages_of      per-token KL, rewards −β·KL_t (+ score on the last token), and the
                       algorithm's advantage estimator (`tether.core.algorithms`)
    rollout_stats      the metrics an RLHF engineer reads first, and the samples written out

`collect_rollout` runs them in this order. The maths is in `tether.core`; this module only
orders the calls, moves rows between ranks and keeps the state that must survive a resume
(score moments, the REINFORCE baseline) in the caller's hands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.config import PPOConfig
from tether.core.advantages import MovingAverageBaseline, kl_penalized_rewards
from tether.core.algorithms import ALGORITHMS, AdvantageInputs, Algorithm
from tether.core.kl import kl_estimate
from tether.core.ops import RunningMoments, explained_variance, masked_mean, masked_sum
from tether.data import Message
from tether.hardware import autocast
from tether.models.loading import model_device
from tether.rewards import CombinedReward, RewardTerm, apply_missing_eos, checked_call
from tether.rollout.actor_critic import ActorCritic
from tether.rollout.generation import Generation, generate
from tether.rollout.passes import RolloutBatch, build_batch, sequence_logprobs_of, with_trunk
from tether.rollout.value_fit import LeastSquaresValueHead, recorded_inputs
from tether.runs import distributed


def algorithm_of(cfg: PPOConfig) -> Algorithm:
    return ALGORITHMS[cfg.algo]


def kl_settings(cfg: PPOConfig) -> tuple[str, str]:
    """(placement, estimator): the config's, with "auto" resolved by the algorithm's row."""
    return cfg.ppo.kl.resolved(cfg.algo)


def micro_batch_rows(cfg: PPOConfig, rows: int) -> int:
    """Rows in one micro-batch of the update (and of the rollout's passes) over `rows`."""
    return rows // cfg.ppo.num_minibatches // cfg.train.grad_accum


@dataclass
class OnlineRun:
    """What every iteration's rollout uses and does not change: models, reward, settings,
    and the state carried from one iteration to the next (saved in every checkpoint)."""

    cfg: PPOConfig
    parallel: distributed.Parallel  # wraps the ActorCritic
    reference: torch.nn.Module | None  # None: the LoRA policy with adapters off is π_ref
    tokenizer: object
    reward: CombinedReward
    gold: RewardTerm | None  # logged, never trained on
    bf16: bool
    moments: RunningMoments  # of raw scores, for reward.normalize
    baseline: MovingAverageBaseline  # REINFORCE's
    value_fit: LeastSquaresValueHead | None = None  # critic.fit: least_squares
    # ppo.kl.budget_control: stop — the step whose rollout reached the budget (None: not yet)
    budget_reached_at: int | None = None


@dataclass
class Rollout:
    """One iteration's experience; every [B, R] tensor is 0 (or garbage) off response_mask."""

    batch: RolloutBatch
    generation: Generation
    scores: torch.Tensor  # [B] after the missing-EOS rule, before normalisation
    logprobs: torch.Tensor  # [B, R] π_old
    ref_logprobs: torch.Tensor  # [B, R] π_ref
    values: torch.Tensor  # [B, R] (0 without a critic)
    kl: torch.Tensor  # [B, R] the penalty's estimator, the same one logged
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    # (log-probs, values, entropy) with their graph, of the rows `live_rows` (ascending): the
    # update's first micro-batch, whose forward is the rollout's own (first_micro_batch)
    live: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    live_rows: torch.Tensor | None = None
    # [B, R, d]: the value head's inputs in the rollout's pass, for critic.fit: least_squares
    value_features: torch.Tensor | None = None


@dataclass
class Sampled:
    """Responses and their scores, this rank's rows."""

    batch: RolloutBatch
    generation: Generation
    reward_prompts: list[str | list[Message]]
    scores: torch.Tensor  # [B] after the missing-EOS rule
    ended: torch.Tensor  # [B] bool: the response ended with EOS
    gold: list[float] | None


@dataclass
class Passes:
    """The forward passes' outputs over this rank's rows: [B, R] each."""

    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor
    live: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    value_features: torch.Tensor | None = None  # [B, R, d], where run.value_fit asks for them


def prompt_for_reward(messages: list[Message]) -> str | list[Message]:
    """Reward functions see a lone user turn as its text, a longer dialogue as its messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def by_column(records: list[dict]) -> dict[str, list]:
    """Per-row fields as columns, one value per row (None where a row lacks the field)."""
    names = sorted({k for r in records for k in r})
    return {k: [r.get(k) for r in records] for k in names}


def sample_responses(
    run: OnlineRun, rows: list[list[int]], row_seeds: list[int]
) -> tuple[Generation, RolloutBatch]:
    """One response per prompt row from the whole policy, with the rollout's settings and
    one seed per row, and the rows laid out as a batch."""
    rollout = run.cfg.rollout
    with run.parallel.full_weights() as whole, autocast(run.bf16):
        generation = generate(
            whole.policy,
            run.tokenizer,
            rows,
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            batch_size=rollout.generation_batch_size,
            engine=rollout.engine,
            dtype=torch.bfloat16 if run.bf16 else torch.float32,
            row_seeds=row_seeds,
        )
    batch = build_batch(generation.prompt_ids, generation.response_ids, run.tokenizer.pad_token_id)
    return generation, batch


def sample_and_score(
    run: OnlineRun,
    messages: list[list[Message]],
    rows: list[list[int]],
    row_seeds: list[int],
    columns: list[dict] | None = None,
) -> Sampled:
    """Sample one response per row from the whole policy, then score every response once.

    The gold judge runs before any state (score moments, baseline) moves: if it fails, the
    step leaves nothing behind and the run resumes exactly once it is fixed.
    """
    rollout = run.cfg.rollout
    generation, batch = sample_responses(run, rows, row_seeds)
    reward_prompts = [prompt_for_reward(m) for m in messages]
    fields = by_column(columns) if columns else None
    ids = generation.response_ids
    raw, _ = run.reward(reward_prompts, generation.texts, fields, ids)
    gold = None
    if run.gold is not None:
        gold = checked_call(run.gold, reward_prompts, generation.texts, fields, ids)
    ended = torch.tensor(generation.ended)
    scores = apply_missing_eos(
        torch.tensor(raw), ended, rollout.missing_eos, rollout.missing_eos_penalty
    )
    return Sampled(batch, generation, reward_prompts, scores, ended, gold)


def reference_logprobs(ac: ActorCritic, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """π_ref's token log-probs: the LoRA policy with its adapters disabled."""
    with ac.as_reference() as ref_model:
        return sequence_logprobs_of(ref_model, batch, temperature)


def reference_pass(run: OnlineRun, batch: RolloutBatch) -> torch.Tensor:
    """π_ref's token log-probs [B, R] of a batch: the separate reference model's, or the
    LoRA policy's with its adapters off."""
    temperature = run.cfg.rollout.temperature
    if run.reference is None:
        return run.parallel(reference_logprobs, batch, temperature)
    return sequence_logprobs_of(run.reference, batch, temperature)


@torch.no_grad()
def forward_passes(run: OnlineRun, batch: RolloutBatch, live_rows: torch.Tensor | None) -> Passes:
    """π_ref for every row; the policy (log-probs, values, entropy) without a graph for every
    row but `live_rows`, then with its graph for those: last, so that no other forward runs
    before its backward. Micro-batches of the update's size bound the memory."""
    parallel, temperature = run.parallel, run.cfg.rollout.temperature
    micro = micro_batch_rows(run.cfg, batch.ids.shape[0])
    every = torch.arange(batch.ids.shape[0])
    detached = every if live_rows is None else every[~torch.isin(every, live_rows)]
    ref_parts, parts, live = [], [], None
    parallel.model.eval()
    with autocast(run.bf16):
        for start in range(0, len(every), micro):
            ref_parts.append(reference_pass(run, batch.rows(every[start : start + micro])))
    head = parallel.model.value_head if run.value_fit is not None else None
    with recorded_inputs(head) as features:
        with autocast(run.bf16):
            for start in range(0, len(detached), micro):
                sub = batch.rows(detached[start : start + micro])
                parts.append(parallel(ActorCritic.forward_responses, sub, temperature, True))
        parallel.model.train()
        if live_rows is not None:
            # An autocast block of its own: autocast caches the bf16 copies of trainable
            # weights until its outermost block exits, and copies cast without grad (the
            # passes above) would reach this pass's graph on torch releases that do not key
            # the cache on it. DDP decides at the forward whether the backward reduces across
            # ranks.
            last = parallel.micro_batch(run.cfg.train.grad_accum == 1)
            with autocast(run.bf16), torch.enable_grad(), last:
                live = parallel(
                    ActorCritic.forward_responses, batch.rows(live_rows), temperature, True
                )
            parts.append(tuple(t.detach() for t in live))
    order = detached if live_rows is None else torch.cat([detached, live_rows])
    logprobs, values, entropy = (torch.cat(ts)[order.argsort()] for ts in zip(*parts, strict=True))
    recorded = torch.cat(features)[order.argsort()] if features else None
    return Passes(logprobs, values, entropy, torch.cat(ref_parts), live, recorded)


def shape_scores(scores: torch.Tensor, moments: RunningMoments, cfg: PPOConfig) -> torch.Tensor:
    """The scores the policy is trained on: normalised by running moments of the raw scores
    (reward.normalize) and clipped to ±reward.clip, each where asked."""
    if cfg.reward.normalize:
        moments.update(scores)
        # Floored: a first batch of equal scores has std 0, and 0/0 would poison the run.
        scores = (scores - moments.mean) / max(moments.std, 1e-6)
    if cfg.reward.clip:
        scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
    return scores


def advantages_of(
    run: OnlineRun,
    scores: torch.Tensor,
    passes: Passes,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, rewards, advantages, returns), each [B, R], over the job's whole batch.

    The KL is the estimator the penalty uses, so the KL logged is the KL trained against
    (docs/implementation-details.md#the-logged-kl-is-the-trained-kl). With the KL as a loss
    term (GRPO), the rewards carry the score alone.
    """
    cfg, algo = run.cfg, algorithm_of(run.cfg)
    placement, estimator = kl_settings(cfg)
    kl = kl_estimate(passes.logprobs, passes.ref_logprobs, estimator)
    kl = torch.where(mask.bool(), kl, 0.0)
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef if placement == "reward" else 0.0)
    inputs = AdvantageInputs(
        rewards=rewards,
        values=passes.values,
        mask=mask,
        group_size=cfg.rollout.samples_per_prompt,
        gamma=cfg.ppo.gamma,
        lam=cfg.ppo.lam,
        whiten_rewards=cfg.ppo.whiten_rewards,
        whiten_advantages=cfg.ppo.whiten_advantages,
        scale_by_std=cfg.ppo.grpo_scale_by_std,
        baseline=run.baseline,
    )
    advantages, returns = algo.advantages(inputs)
    return kl, rewards, advantages, returns


def rollout_stats(
    run: OnlineRun,
    scores: torch.Tensor,
    trained_scores: torch.Tensor,
    passes: Passes,
    experience: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
    ended: torch.Tensor,
    kl_coef: float,
) -> dict[str, float]:
    """Reward, KL, entropy, length, EOS share, and what only some algorithms have: the
    critic's explained variance, the share of groups whose k answers all scored alike (they
    carry no signal for RLOO and GRPO)."""
    kl, rewards, _, returns = experience
    algo = algorithm_of(run.cfg)
    stats: dict[str, float] = {}
    if algo.critic:
        stats["value/explained_var"] = explained_variance(passes.values, returns, mask).item()
    stats |= {
        "reward/score_mean": scores.mean().item(),
        "reward/score_std": scores.std(unbiased=False).item(),
        "reward/total_mean": masked_sum(rewards, mask, dim=1).mean().item(),
        "kl/mean": masked_sum(kl, mask, dim=1).mean().item(),
        "kl/coef": kl_coef,
        "policy/entropy": masked_mean(passes.entropy, mask).item(),
        "response/length_mean": mask.sum(dim=1).float().mean().item(),
        "response/eos_frac": ended.float().mean().item(),
    }
    if algo.grouped:
        groups = trained_scores.view(-1, run.cfg.rollout.samples_per_prompt)
        flat = groups.amax(dim=1) == groups.amin(dim=1)
        stats["reward/flat_group_frac"] = flat.float().mean().item()
    return stats


def rollout_samples(
    sampled: Sampled, scores: torch.Tensor, seq_kl: torch.Tensor, stats: dict[str, float]
) -> list[dict]:
    """This rank's samples (prompt, response, score, KL, ended, gold) for samples.jsonl; the
    job's mean gold score goes into `stats`."""
    samples = [
        {
            "prompt": p if isinstance(p, str) else p[-1]["content"],
            "response": text,
            "score": s,
            "kl": k,
            "ended": e,
        }
        for p, text, s, k, e in zip(
            sampled.reward_prompts,
            sampled.generation.texts,
            scores.tolist(),
            seq_kl.tolist(),
            sampled.generation.ended,
            strict=True,
        )
    ]
    if sampled.gold is not None:
        for sample, g in zip(samples, sampled.gold, strict=True):
            sample["gold"] = g
        every_gold = [g for part in distributed.gather(sampled.gold) for g in part]
        stats["gold/mean"] = sum(every_gold) / len(every_gold)
    return samples


@torch.no_grad()
def collect_rollout(
    run: OnlineRun,
    messages: list[list[Message]],
    rows: list[list[int]],
    kl_coef: float,
    row_seeds: list[int],
    live_rows: torch.Tensor | None = None,
    columns: list[dict] | None = None,
) -> tuple[Rollout, dict[str, float], list[dict]]:
    """Sample, score, run the passes, and compute rewards and advantages for one iteration.

    `messages`/`rows` hold each prompt k times in a row, so groups are consecutive. In a
    torchrun job they are this rank's share: it samples, scores and runs its forward passes
    on its own rows, then every rank gathers the job's scores, log-probs and values and
    computes the same normalisation, KL, advantages (whitening, GRPO groups, baselines) and
    statistics over the whole batch, keeping its own rows' advantages for the update. The
    samples returned are this rank's. `live_rows` (the update's first micro-batch) run their
    policy pass with its graph, kept in the rollout for the update to start from. `columns`
    are each row's other prompt fields, for rewards called TRL's way.
    """
    sampled = sample_and_score(run, messages, rows, row_seeds, columns)
    device = model_device(run.parallel.model)
    sampled.batch = sampled.batch.to(device)  # built on the CPU, moved once
    with autocast(run.bf16):  # the policy's frozen lower layers, once for every pass below
        # and for the update's (stages/ppo.py)
        sampled.batch = with_trunk(run.parallel.model.policy, sampled.batch)
    sampled.scores, sampled.ended = sampled.scores.to(device), sampled.ended.to(device)
    passes = forward_passes(run, sampled.batch, live_rows)

    # From here on: the job's whole batch, the same on every rank.
    local_width = sampled.batch.response_mask.shape[1]
    mask, logprobs, values, entropy, ref_logprobs, scores, ended = distributed.gather_rows(
        sampled.batch.response_mask,
        passes.logprobs,
        passes.values,
        passes.entropy,
        passes.ref_logprobs,
        sampled.scores,
        sampled.ended,
    )
    whole = Passes(logprobs, values, entropy, ref_logprobs, passes.live)
    trained_scores = shape_scores(scores, run.moments, run.cfg)
    experience = advantages_of(run, trained_scores, whole, mask, kl_coef)
    stats = rollout_stats(run, scores, trained_scores, whole, experience, mask, ended, kl_coef)
    kl, _, advantages, returns = experience

    mine = distributed.rows_of_rank(mask.shape[0])
    seq_kl = masked_sum(kl, mask, dim=1)[mine].cpu()
    samples = rollout_samples(sampled, scores[mine].cpu(), seq_kl, stats)

    def own(t: torch.Tensor) -> torch.Tensor:  # this rank's rows, at its own width
        return t[mine, :local_width]

    rollout = Rollout(
        sampled.batch,
        sampled.generation,
        scores[mine],
        own(logprobs),
        own(ref_logprobs),
        own(values),
        own(kl),
        own(advantages),
        own(returns),
        passes.live,
        live_rows,
        passes.value_features,
    )
    return rollout, stats, samples
