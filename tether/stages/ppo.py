"""Online RL against a reward with a KL penalty to a frozen reference: PPO, and the
critic-free RLOO, GRPO and REINFORCE, and A2C, on one rollout and loss core.

One PPO iteration, top to bottom (Ziegler et al. 2019; Ouyang et al. 2022):
  1. draw a batch of prompts; sample k responses each from π_θ (stop at EOS)
  2. score each finished response once; a response cut at max_new_tokens without EOS is
     penalised (rollout.missing_eos); optionally normalise scores with running moments
  3. token log-probs under π_θ (old) and π_ref, values from the critic; per-token reward
     r_t = −β·KL_t, plus the score on the last token
  4. GAE advantages and returns; advantages whitened
  5. ppo_epochs passes over shuffled minibatches: clipped policy loss + vf_coef · clipped
     value loss − ent_coef · entropy; gradient clipping; gradient accumulation
  6. β fixed, or adapted towards a KL target
The other algorithms change only step 3-5's choices (`ADVANTAGES`, `algo_settings`): a
sequence-level advantage instead of GAE (RLOO, GRPO, REINFORCE), the KL as a loss term
instead of a reward (GRPO), one unclipped pass (REINFORCE, A2C), no critic (all but PPO, A2C).
The maths is in tether.losses / advantages / kl / ops; this file only orders the calls.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tether.config import ALGOS_WITH_CRITIC, ALGOS_WITH_GROUPS, PPOConfig
from tether.core.advantages import (
    MovingAverageBaseline,
    a2c_advantages,
    gae,
    grpo_advantages,
    kl_penalized_rewards,
    reinforce_advantages,
    rloo_advantages,
)
from tether.core.kl import AdaptiveKLController, FixedKLController, kl_estimate
from tether.core.losses import ppo_policy_loss, value_loss
from tether.core.ops import (
    RunningMoments,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_whiten,
)
from tether.data import DataError, Message, load_prompts
from tether.fast import engine as tether_engine
from tether.hardware import autocast
from tether.models.loading import hf_model, save_pretrained_model
from tether.rewards import CombinedReward, RewardTerm, apply_missing_eos, build_term, checked_call
from tether.rollout.actor_critic import ActorCritic, load_actor_critic
from tether.rollout.generation import Generation, encode_prompt, generate
from tether.rollout.passes import RolloutBatch, build_batch, sequence_logprobs_of
from tether.runs import distributed
from tether.runs.rundir import truncate_jsonl
from tether.runs.training import (
    Optimization,
    begin_run,
    clip_and_step,
    fit,
    save_final,
    start_optimization,
    total_steps,
)


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


@dataclass(frozen=True)
class AlgoSettings:
    critic: bool  # a value function, trained with the policy
    epochs: int  # passes over each rollout
    clip_eps: float  # policy ratio clip (inf: none)
    kl_placement: str  # "reward" or "loss"
    kl_estimator: str


def algo_settings(cfg: PPOConfig) -> AlgoSettings:
    """What `cfg.algo` changes in the shared loop; everything else is common."""
    single_pass = cfg.algo in ("reinforce", "a2c")  # on-policy gradient, no trust region
    placement, estimator = cfg.ppo.kl.resolved(cfg.algo)
    return AlgoSettings(
        critic=cfg.algo in ALGOS_WITH_CRITIC,
        epochs=1 if single_pass else cfg.ppo.ppo_epochs,
        clip_eps=math.inf if single_pass else cfg.ppo.clip_eps,
        kl_placement=placement,
        kl_estimator=estimator,
    )


def update_shuffle(cfg: PPOConfig, step: int) -> torch.Generator:
    """The generator of the update's minibatch shuffles, seeded by (seed, step): a resumed
    run shuffles the same, and the rollout knows the update's first micro-batch."""
    return torch.Generator().manual_seed(cfg.train.seed * 100_003 + step)


def micro_batch_rows(cfg: PPOConfig, rows: int) -> int:
    """Rows in one micro-batch of the update (and of the rollout's passes) over `rows`."""
    return rows // cfg.ppo.num_minibatches // cfg.train.grad_accum


def first_micro_batch(cfg: PPOConfig, step: int, rows: int) -> torch.Tensor:
    """The rows (ascending) of the update's first micro-batch.

    The update's first forward runs at the rollout's weights, on rows the rollout has just run
    through the policy for π_old. So the rollout runs those rows with their graph: π_old is
    that pass detached (the first ratio is exactly 1) and the update starts from it instead of
    running it again. That is one policy forward of a micro-batch saved per iteration; with
    GRPO's and RLOO's usual one update over the whole batch, the whole rollout pass.
    """
    micro = micro_batch_rows(cfg, rows)
    return torch.randperm(rows, generator=update_shuffle(cfg, step))[:micro].sort().values


def sequence_advantages(
    cfg: PPOConfig, returns: torch.Tensor, baseline: MovingAverageBaseline
) -> torch.Tensor:
    """[B] advantage per response for the critic-free algorithms, from [B] sequence returns."""
    k = cfg.rollout.samples_per_prompt
    if cfg.algo == "rloo":
        return rloo_advantages(returns, k)
    if cfg.algo == "grpo":
        return grpo_advantages(returns, k, scale_by_std=cfg.ppo.grpo_scale_by_std)
    if not baseline.initialized:  # no history yet: the first batch is its own baseline
        baseline.update(returns)
    advantages = reinforce_advantages(returns, baseline.value)
    baseline.update(returns)  # after use: later batches are judged against this one
    return advantages


def prompt_for_reward(messages: list[Message]) -> str | list[Message]:
    """Reward functions see a lone user turn as its text, a longer dialogue as its messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def prepare_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[list[Message]], list[list[int]]]:
    """Read and tokenise prompts; raises DataError before any model loads."""
    prompts, report = load_prompts(cfg.data.train, cfg.data.format)
    kept, rows = [], []
    for messages in prompts:
        ids = encode_prompt(tokenizer, messages)
        if len(ids) > cfg.data.max_length:
            report.skipped[f"prompt longer than data.max_length={cfg.data.max_length}"] += 1
            continue
        kept.append(messages)
        rows.append(ids)
    tqdm.write(report.summary())
    if not kept:
        raise DataError(f"{cfg.data.train}: no prompt fits data.max_length={cfg.data.max_length}")
    return kept, rows


def build_reward(cfg: PPOConfig, bf16: bool) -> tuple[CombinedReward, RewardTerm | None]:
    """The trained-on reward and the gold judge. Reward models score under the run's
    precision (bf16 autocast where it has it), unless a term's `args` say otherwise."""
    timeout = cfg.reward.timeout_s

    def args_of(name: str, args: dict | None) -> dict | None:
        return {"bf16": bf16, **(args or {})} if name.startswith("model:") else args

    terms = [
        build_term(t["name"], t.get("weight", 1.0), args_of(t["name"], t.get("args")), timeout)
        for t in cfg.reward.terms
    ]
    gold = None
    if cfg.reward.gold:
        gold = build_term(
            cfg.reward.gold, 1.0, args_of(cfg.reward.gold, cfg.reward.gold_args), timeout
        )
    return CombinedReward(terms), gold


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one rollout row: a function of the run's seed, the step and the
    row's place in the job's whole batch, so a row samples the same on any rank, in any
    batch, and after a resume. Hashed: torch's Mersenne Twister seeded with an arithmetic
    progression of seeds (row r at steps 1, 2, 3...) gives correlated streams; with plain
    `(seed, step, row)` arithmetic a β = 0 PPO test run's KL grew a third slower over 9 seeds
    than with the global RNG, and matches it once hashed."""
    x = (seed * 1_000_003 + step) * 1_000_033 + row
    for _ in range(2):  # SplitMix64's finaliser: nearby (seed, step, row) share no bits
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        x ^= x >> 31
    return x % 2**63


@torch.no_grad()
def collect_rollout(
    parallel: distributed.Parallel,
    reference: torch.nn.Module | None,
    tokenizer,
    messages: list[list[Message]],
    rows: list[list[int]],
    reward: CombinedReward,
    gold: RewardTerm | None,
    kl_coef: float,
    moments: RunningMoments,
    baseline: MovingAverageBaseline,
    cfg: PPOConfig,
    bf16: bool,
    row_seeds: list[int] | None = None,
    live_rows: torch.Tensor | None = None,
) -> tuple[Rollout, dict[str, float], list[dict]]:
    """Steps 1-4 of the iteration: sample, score, log-probs, values, rewards, advantages.

    `live_rows` (the update's first micro-batch, `first_micro_batch`) run their policy pass
    with its graph, kept in the rollout for the update to start from.

    `messages`/`rows` hold each prompt k times in a row, so groups are consecutive. In a
    torchrun job they are this rank's share: it samples, scores and runs its forward passes
    on its own rows, then every rank gathers the job's scores, log-probs and values and
    computes the same normalisation, KL, advantages (whitening, GRPO groups, baselines) and
    statistics over the whole batch, keeping its own rows' advantages for the update. The
    samples returned are this rank's.
    """
    ac: ActorCritic = parallel.model
    ro_cfg, ppo, algo = cfg.rollout, cfg.ppo, algo_settings(cfg)
    with parallel.full_weights() as whole, autocast(bf16):
        gen = generate(
            whole.policy,
            tokenizer,
            rows,
            max_new_tokens=ro_cfg.max_new_tokens,
            temperature=ro_cfg.temperature,
            batch_size=ro_cfg.generation_batch_size,
            engine=ro_cfg.engine,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            row_seeds=row_seeds,
        )
    batch = build_batch(gen.prompt_ids, gen.response_ids, tokenizer.pad_token_id)
    reward_prompts = [prompt_for_reward(m) for m in messages]
    raw, _ = reward(reward_prompts, gen.texts)
    # The gold judge runs before any state (score moments, baseline) moves: if it fails, the
    # step leaves nothing behind and the run resumes exactly once it is fixed.
    gold_values = checked_call(gold, reward_prompts, gen.texts) if gold is not None else None
    ended = torch.tensor(gen.ended)
    scores = apply_missing_eos(
        torch.tensor(raw), ended, ro_cfg.missing_eos, ro_cfg.missing_eos_penalty
    )

    # π_ref for every row; the policy without a graph for the rows but `live_rows`, then
    # with its graph for those: last, so that no other forward runs before its backward.
    micro = micro_batch_rows(cfg, len(rows))
    every = torch.arange(batch.ids.shape[0])
    detached = every if live_rows is None else every[~torch.isin(every, live_rows)]
    ref_parts, parts, live = [], [], None
    ac.eval()
    with autocast(bf16):
        for start in range(0, len(every), micro):
            sub = batch.rows(every[start : start + micro])
            if reference is None:
                ref_parts.append(parallel(reference_logprobs, sub, ro_cfg.temperature))
            else:
                ref_parts.append(sequence_logprobs_of(reference, sub, ro_cfg.temperature))
        for start in range(0, len(detached), micro):
            sub = batch.rows(detached[start : start + micro])
            parts.append(parallel(ActorCritic.forward_responses, sub, ro_cfg.temperature, True))
    ac.train()
    if live_rows is not None:
        # An autocast block of its own: autocast caches the bf16 copies of trainable weights
        # until its outermost block exits, and copies cast without grad (the passes above)
        # would reach this pass's graph on torch releases that do not key the cache on it.
        # DDP decides at the forward whether the backward reduces across ranks.
        with autocast(bf16), torch.enable_grad(), parallel.micro_batch(cfg.train.grad_accum == 1):
            live = parallel(
                ActorCritic.forward_responses, batch.rows(live_rows), ro_cfg.temperature, True
            )
        parts.append(tuple(t.detach() for t in live))
    order = detached if live_rows is None else torch.cat([detached, live_rows])
    logprobs, values, entropy = (torch.cat(ts)[order.argsort()] for ts in zip(*parts, strict=True))

    # From here on: the job's whole batch, the same on every rank.
    local_width = batch.response_mask.shape[1]
    mask, logprobs, values, entropy, ref_logprobs, scores, ended = distributed.gather_rows(
        batch.response_mask,
        logprobs,
        values,
        entropy,
        torch.cat(ref_parts),
        scores,
        ended,
    )
    trained_scores = scores
    if cfg.reward.normalize:
        moments.update(scores)
        # Floored: a first batch of equal scores has std 0, and 0/0 would poison the run.
        trained_scores = (scores - moments.mean) / max(moments.std, 1e-6)
    if cfg.reward.clip:
        trained_scores = trained_scores.clamp(-cfg.reward.clip, cfg.reward.clip)

    kl = torch.where(mask.bool(), kl_estimate(logprobs, ref_logprobs, algo.kl_estimator), 0.0)
    penalty_coef = kl_coef if algo.kl_placement == "reward" else 0.0
    rewards = kl_penalized_rewards(trained_scores, kl, mask, penalty_coef)
    stats: dict[str, float] = {}
    if algo.critic:  # token-level, on the critic: GAE (PPO) or the plain return − V (A2C)
        shaped = masked_whiten(rewards, mask, shift_mean=False) if ppo.whiten_rewards else rewards
        if cfg.algo == "a2c":
            _, returns = gae(shaped, values, mask, ppo.gamma, lam=1.0)  # discounted returns
            advantages = a2c_advantages(returns, values, mask)
        else:
            advantages, returns = gae(shaped, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        stats["value/explained_var"] = explained_variance(values, returns, mask).item()
    else:  # sequence-level: one advantage per response, on every one of its tokens
        seq_advantages = sequence_advantages(cfg, masked_sum(rewards, mask, dim=1), baseline)
        advantages = torch.where(mask.bool(), seq_advantages[:, None], 0.0)
        returns = torch.zeros_like(values)

    seq_kl = masked_sum(kl, mask, dim=1)
    lengths = mask.sum(dim=1).float()
    stats |= {
        "reward/score_mean": scores.mean().item(),
        "reward/score_std": scores.std(unbiased=False).item(),
        "reward/total_mean": masked_sum(rewards, mask, dim=1).mean().item(),
        "kl/mean": seq_kl.mean().item(),
        "kl/coef": kl_coef,
        "policy/entropy": masked_mean(entropy, mask).item(),
        "response/length_mean": lengths.mean().item(),
        "response/eos_frac": ended.float().mean().item(),
    }
    if cfg.algo in ALGOS_WITH_GROUPS:  # groups with one reward for all k carry no signal
        groups = trained_scores.view(-1, cfg.rollout.samples_per_prompt)
        flat = groups.amax(dim=1) == groups.amin(dim=1)
        stats["reward/flat_group_frac"] = flat.float().mean().item()
    mine = distributed.rows_of_rank(mask.shape[0])
    samples = [
        {
            "prompt": p if isinstance(p, str) else p[-1]["content"],
            "response": text,
            "score": s,
            "kl": k,
            "ended": e,
        }
        for p, text, s, k, e in zip(
            reward_prompts,
            gen.texts,
            scores[mine].tolist(),
            seq_kl[mine].tolist(),
            gen.ended,
            strict=True,
        )
    ]
    if gold_values is not None:
        for sample, g in zip(samples, gold_values, strict=True):
            sample["gold"] = g
        every_gold = [g for part in distributed.gather(gold_values) for g in part]
        stats["gold/mean"] = sum(every_gold) / len(every_gold)

    def own(t: torch.Tensor) -> torch.Tensor:  # this rank's rows, at its own width
        return t[mine, :local_width]

    rollout = Rollout(
        batch,
        gen,
        scores[mine],
        own(logprobs),
        own(ref_logprobs),
        own(values),
        own(kl),
        own(advantages),
        own(returns),
        live,
        live_rows,
    )
    return rollout, stats, samples


def reference_logprobs(ac: ActorCritic, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """π_ref's token log-probs: the LoRA policy with its adapters disabled."""
    with ac.as_reference() as ref_model:
        return sequence_logprobs_of(ref_model, batch, temperature)


def ppo_update(
    parallel: distributed.Parallel,
    opt: Optimization,
    ro: Rollout,
    cfg: PPOConfig,
    kl_coef: float,
    step: int,
    bf16: bool,
) -> dict[str, float]:
    """Step 5: epochs x num_minibatches optimizer steps over the rollout.

    Each minibatch's loss is a token mean over the whole minibatch, split into grad_accum
    micro-batches weighted by their token share, so accumulation changes nothing but memory.
    Shuffles come from a generator seeded by (seed, step): a resumed run shuffles the same.

    In a torchrun job each rank updates on its own rows: its minibatch is its share of the
    job's (the token mean is over the job's minibatch), and the wrapper sums the gradients.
    Every rank shuffles its rows with the same permutation, so with one minibatch per epoch
    the job takes exactly one process's steps; with several, the job's minibatches are
    another (equally random) partition of the batch than one process would draw.
    """
    ppo, algo, rows = cfg.ppo, algo_settings(cfg), ro.batch.ids.shape[0]
    minibatch, micro = rows // ppo.num_minibatches, micro_batch_rows(cfg, rows)
    shuffle = update_shuffle(cfg, step)
    keys = ["train/loss", "policy/loss", "policy/clipfrac", "policy/approx_kl", "train/grad_norm"]
    keys += ["value/loss", "value/clipfrac"] if algo.critic else []
    keys += ["kl/loss"] if algo.kl_placement == "loss" else []
    sums = dict.fromkeys(keys, 0.0)
    updates, skipped = algo.epochs * ppo.num_minibatches, 0
    for _ in range(algo.epochs):
        order = torch.randperm(rows, generator=shuffle)
        for mb_start in range(0, rows, minibatch):
            mb = order[mb_start : mb_start + minibatch]
            mb_tokens = max(1, int(distributed.all_sum(ro.batch.response_mask[mb].sum())))
            for start in range(0, minibatch, micro):
                idx = mb[start : start + micro]
                sub = ro.batch.rows(idx)
                mask = sub.response_mask
                with parallel.micro_batch(last=start + micro >= minibatch):
                    if ro.live is not None:  # the first micro-batch: the rollout's pass
                        if not torch.equal(idx.sort().values, ro.live_rows):
                            raise RuntimeError("the rollout's live pass is of other rows")
                        at = torch.searchsorted(ro.live_rows, idx)  # idx's places in it
                        logprobs, values, entropy = (t[at] for t in ro.live)
                        ro.live = None  # used once: later micro-batches run at new weights
                    else:
                        with autocast(bf16):
                            logprobs, values, entropy = parallel(
                                ActorCritic.forward_responses,
                                sub,
                                cfg.rollout.temperature,
                                ppo.ent_coef > 0,
                            )
                    pg_loss, pg = ppo_policy_loss(
                        logprobs, ro.logprobs[idx], ro.advantages[idx], mask, algo.clip_eps
                    )
                    loss, terms = pg_loss, {"policy/loss": pg_loss}
                    terms |= {f"policy/{k}": v for k, v in pg.items()}
                    if algo.critic:
                        value_clip = ppo.value_clip_eps if cfg.algo == "ppo" else 0.0
                        v_loss, v = value_loss(
                            values, ro.values[idx], ro.returns[idx], mask, value_clip or None
                        )
                        loss = loss + ppo.vf_coef * v_loss
                        terms |= {"value/loss": v_loss, "value/clipfrac": v["clipfrac"]}
                    if algo.kl_placement == "loss":
                        kl_loss = masked_mean(
                            kl_estimate(logprobs, ro.ref_logprobs[idx], algo.kl_estimator), mask
                        )
                        loss = loss + kl_coef * kl_loss
                        terms["kl/loss"] = kl_loss
                    if ppo.ent_coef > 0:
                        loss = loss - ppo.ent_coef * masked_mean(entropy, mask)
                    share = float(mask.sum() / mb_tokens)
                    (loss * share * parallel.loss_scale).backward()
                terms["train/loss"] = loss
                for key in sums.keys() & terms.keys():
                    sums[key] += float(terms[key].detach()) * share / updates
            norm = clip_and_step(parallel.model, opt.optimizer, cfg.optim.max_grad_norm)
            if math.isfinite(norm):
                sums["train/grad_norm"] += norm / updates
            else:
                skipped += 1
    sums = distributed.sum_metrics(sums, keep=["train/grad_norm"])  # the norm is the job's
    sums["guard/skipped_updates"] = skipped
    return sums


def run_ppo(cfg: PPOConfig, out: Path, resume: bool = False) -> Path:
    """Train a policy with PPO and return the path of `final/`."""
    begun = begin_run(cfg, out, resume)
    run, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    messages, rows = prepare_prompts(cfg, tokenizer)
    reward, gold = build_reward(cfg, bf16)
    k = cfg.rollout.samples_per_prompt
    prompts_per_rank = distributed.per_rank(cfg.train.batch_size, "train.batch_size")
    if prompts_per_rank * k % (cfg.ppo.num_minibatches * cfg.train.grad_accum):
        raise distributed.DistributedError(
            f"ppo.num_minibatches x train.grad_accum must divide each rank's "
            f"{prompts_per_rank * k} rollouts ({prompts_per_rank} prompts x {k} samples)"
        )
    ac, reference = load_actor_critic(cfg, tokenizer, algo_settings(cfg).critic, bf16)
    ac.train()
    sharded = cfg.parallel == "fsdp" and distributed.world().size > 1
    if sharded and not (cfg.rollout.engine == "auto" and tether_engine.supports(ac.policy)):
        # `generate` would run the sharded blocks, all-gathering at every decode step, and
        # ranks whose answers end at different lengths would wait on each other for ever.
        raise distributed.DistributedError(
            "parallel: fsdp with online RL needs tether's rollout engine (rollout.engine: "
            f"auto, a Llama-family model; this is {type(hf_model(ac.policy)).__name__}); "
            "use parallel: ddp"
        )
    parallel = distributed.Parallel(ac, cfg.parallel, bf16, cfg.fsdp_cpu_offload)
    opt = start_optimization(
        run, cfg, ac, len(rows), begun.resume_from, per_step=cfg.train.batch_size
    )
    kl = cfg.ppo.kl
    kl_ctl = (
        AdaptiveKLController(kl.coef, kl.target, kl.horizon)
        if kl.adaptive
        else FixedKLController(kl.coef)
    )
    moments, baseline = RunningMoments(), MovingAverageBaseline(cfg.ppo.baseline_decay)
    if opt.extra:
        kl_ctl.load_state_dict(opt.extra["kl"])
        moments.load_state_dict(opt.extra["score_moments"])
        baseline.load_state_dict(opt.extra["baseline"])
    samples_path = run.path / "samples.jsonl"
    if distributed.world().is_main:
        truncate_jsonl(samples_path, opt.progress.step)
    last_step = total_steps(cfg.train, len(rows), per_step=cfg.train.batch_size)

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        step = opt.progress.step + 1  # the step this call completes
        started = time.perf_counter()
        grouped = [i for i in indices for _ in range(k)]  # the job's rows, groups in a row
        first_row = distributed.world().rank * prompts_per_rank * k
        grouped = distributed.shard(grouped)  # this rank's prompts, each k times
        seeds = [row_seed(cfg.train.seed, step, first_row + r) for r in range(len(grouped))]
        ro, stats, samples = collect_rollout(
            parallel,
            reference,
            tokenizer,
            [messages[i] for i in grouped],
            [rows[i] for i in grouped],
            reward,
            gold,
            kl_ctl.value,
            moments,
            baseline,
            cfg,
            bf16,
            seeds,
            first_micro_batch(cfg, step, len(grouped)),
        )
        stats["time/rollout_s"] = time.perf_counter() - started
        started = time.perf_counter()
        stats.update(ppo_update(parallel, opt, ro, cfg, kl_ctl.value, step, bf16))
        stats["time/train_s"] = time.perf_counter() - started
        kl_ctl.update(stats["kl/mean"], n_steps=len(indices) * k)
        every = cfg.rollout.samples_every
        if every and (step == 1 or step % every == 0 or step == last_step):
            samples = [s for part in distributed.gather(samples) for s in part]  # the job's
            if distributed.world().is_main:
                write_samples(samples_path, step, samples)
        return stats, int(ro.batch.response_mask.sum())  # throughput: response tokens/s

    fit(
        desc="ppo",
        cfg=cfg,
        run=run,
        model=ac,
        opt=opt,
        num_examples=len(rows),
        step_fn=step_fn,
        per_step=cfg.train.batch_size,
        steps_itself=True,
        extra_state=lambda: {
            "kl": kl_ctl.state_dict(),
            "score_moments": moments.state_dict(),
            "baseline": baseline.state_dict(),
        },
    )

    def save(whole: ActorCritic) -> None:
        save_pretrained_model(whole.policy, tokenizer, run.final)
        save_critic(whole, tokenizer, run.final)

    save_final(parallel, save)
    run.unlock()
    return run.final


VALUE_HEAD_FILE = "value_head.safetensors"


def save_critic(ac: ActorCritic, tokenizer, final: Path) -> None:
    """The critic beside the policy, for `tether inspect --critic`: a value head on the
    policy's own hidden states (`final/value_head.safetensors`), or a separate critic model
    (`final/critic/`, a sequence-classification model whose head gives the values)."""
    if ac.critic is not None:
        save_pretrained_model(ac.critic, tokenizer, final / "critic")
    elif ac.value_head is not None:
        tensors = {k: v.detach().contiguous() for k, v in ac.value_head.state_dict().items()}
        save_file(tensors, str(final / VALUE_HEAD_FILE))


def write_samples(path: Path, step: int, samples: list[dict]) -> None:
    """Append and fsync: samples of a step are on disk before its checkpoint is."""
    with open(path, "a", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps({"step": step, **sample}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
