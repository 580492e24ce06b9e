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
The other algorithms change only the choices of steps 3-5, one row each in the table of
`tether.core.algorithms`: a sequence-level advantage instead of GAE (RLOO, GRPO,
REINFORCE), the KL as a loss term instead of a reward (GRPO), one unclipped pass
(REINFORCE, A2C), no critic (all but PPO, A2C). Steps 1-4 are `tether.rollout.experience`;
the maths is in `tether.core`; this file only orders the calls.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from tether.config import PPOConfig
from tether.console import say
from tether.core.advantages import MovingAverageBaseline
from tether.core.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLBudgetController,
    kl_estimate,
)
from tether.core.losses import ppo_policy_loss, value_loss
from tether.core.ops import RunningMoments, masked_mean
from tether.data import DataError, Message, ReadOptions, load_prompt_records
from tether.fast import engine as tether_engine
from tether.hardware import autocast
from tether.models.loading import hf_model, save_pretrained_model
from tether.rewards import CombinedReward, RewardTerm, build_term
from tether.rollout.actor_critic import ActorCritic, load_actor_critic
from tether.rollout.experience import (
    OnlineRun,
    Rollout,
    algorithm_of,
    collect_rollout,
    kl_settings,
    micro_batch_rows,
)
from tether.rollout.generation import encode_prompt
from tether.rollout.landing import check_scalable, land_on_budget
from tether.rollout.value_fit import LeastSquaresValueHead
from tether.runs import distributed
from tether.runs.data_order import total_steps
from tether.runs.optim import clip_and_step
from tether.runs.rundir import truncate_jsonl, write_text_atomic
from tether.runs.training import Optimization, begin_run, fit, save_final, start_optimization


def update_shuffle(cfg: PPOConfig, step: int) -> torch.Generator:
    """The generator of the update's minibatch shuffles, seeded by (seed, step): a resumed
    run shuffles the same, and the rollout knows the update's first micro-batch."""
    return torch.Generator().manual_seed(cfg.train.seed * 100_003 + step)


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


def prepare_prompts(
    cfg: PPOConfig, tokenizer
) -> tuple[list[list[Message]], list[list[int]], list[dict]]:
    """Read and tokenise prompts, keeping each record's other fields (the columns TRL-style
    rewards receive); raises DataError before any model loads."""
    prompts, columns, report = load_prompt_records(cfg.data.train, ReadOptions.of(cfg.data))
    kept, rows, kept_columns = [], [], []
    for messages, extra in zip(prompts, columns, strict=True):
        ids = encode_prompt(tokenizer, messages)
        if len(ids) > cfg.data.max_length:
            report.skipped[f"prompt longer than data.max_length={cfg.data.max_length}"] += 1
            continue
        kept.append(messages)
        rows.append(ids)
        kept_columns.append(extra)
    say(report.summary())
    if not kept:
        raise DataError(f"{cfg.data.train}: no prompt fits data.max_length={cfg.data.max_length}")
    return kept, rows, kept_columns


def build_reward(
    cfg: PPOConfig,
    bf16: bool,
    device: torch.device | str = "cpu",
    columns: set[str] = frozenset(),
) -> tuple[CombinedReward, RewardTerm | None]:
    """The trained-on reward and the gold judge, each checked against the prompt file's
    columns (`columns`) before any rollout. Reward models sit on the run's device and score
    under its precision (bf16 autocast where it has it), unless a term's `args` say
    otherwise."""
    timeout = cfg.reward.timeout_s

    def args_of(name: str, args: dict | None) -> dict | None:
        if not name.startswith("model:"):
            return args
        return {"bf16": bf16, "device": str(device), **(args or {})}

    terms = [
        build_term(t["name"], t.get("weight", 1.0), args_of(t["name"], t.get("args")), timeout)
        for t in cfg.reward.terms
    ]
    gold = None
    if cfg.reward.gold:
        gold = build_term(
            cfg.reward.gold, 1.0, args_of(cfg.reward.gold, cfg.reward.gold_args), timeout
        )
    reward = CombinedReward(terms)
    reward.check(columns)
    if gold is not None:
        gold.check(columns)
    return reward, gold


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


def update_metric_keys(cfg: PPOConfig) -> list[str]:
    """The losses an update logs: the policy's always, the value's and the KL term's where the
    algorithm's row has them."""
    keys = ["train/loss", "policy/loss", "policy/clipfrac", "policy/approx_kl", "train/grad_norm"]
    keys += ["value/loss", "value/clipfrac"] if algorithm_of(cfg).critic else []
    keys += ["kl/loss"] if kl_settings(cfg)[0] == "loss" else []
    return keys


def policy_outputs(
    run: OnlineRun, ro: Rollout, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probs, values, entropy) of rows `idx` at the current weights: the rollout's live
    pass for the first micro-batch (its weights are still the rollout's), a forward after."""
    if ro.live is not None:
        if not torch.equal(idx.sort().values, ro.live_rows):
            raise RuntimeError("the rollout's live pass is of other rows")
        at = torch.searchsorted(ro.live_rows, idx)  # idx's places in it
        outputs = tuple(t[at] for t in ro.live)
        ro.live = None  # used once: later micro-batches run at new weights
        return outputs
    with autocast(run.bf16):
        return run.parallel(
            ActorCritic.forward_responses,
            ro.batch.rows(idx),
            run.cfg.rollout.temperature,
            run.cfg.ppo.ent_coef > 0,
        )


def micro_batch_loss(
    run: OnlineRun, ro: Rollout, idx: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of rows `idx` as the algorithm's row composes it: policy gradient (clipped
    where the row clips) + vf_coef · value loss (with a critic) + β · KL (KL as a loss term)
    − ent_coef · entropy. A token mean over the micro-batch's response tokens."""
    cfg, algo = run.cfg, algorithm_of(run.cfg)
    placement, estimator = kl_settings(cfg)
    mask = ro.batch.response_mask[idx]
    logprobs, values, entropy = policy_outputs(run, ro, idx)
    clip_eps = cfg.ppo.clip_eps if algo.clipped else math.inf
    pg_loss, pg = ppo_policy_loss(logprobs, ro.logprobs[idx], ro.advantages[idx], mask, clip_eps)
    loss, terms = pg_loss, {"policy/loss": pg_loss}
    terms |= {f"policy/{k}": v for k, v in pg.items()}
    if algo.critic:
        value_clip = cfg.ppo.value_clip_eps if algo.value_clip else 0.0
        v_loss, v = value_loss(values, ro.values[idx], ro.returns[idx], mask, value_clip or None)
        loss = loss + cfg.ppo.vf_coef * v_loss
        terms |= {"value/loss": v_loss, "value/clipfrac": v["clipfrac"]}
    if placement == "loss":
        kl_loss = masked_mean(kl_estimate(logprobs, ro.ref_logprobs[idx], estimator), mask)
        loss = loss + kl_coef * kl_loss
        terms["kl/loss"] = kl_loss
    if cfg.ppo.ent_coef > 0:
        loss = loss - cfg.ppo.ent_coef * masked_mean(entropy, mask)
    terms["train/loss"] = loss
    return loss, terms


def ppo_update(
    run: OnlineRun, opt: Optimization, ro: Rollout, kl_coef: float, step: int
) -> dict[str, float]:
    """Epochs x num_minibatches optimizer steps over the rollout (one unclipped pass where the
    algorithm's row does not clip).

    Each minibatch's loss is a token mean over the whole minibatch, split into grad_accum
    micro-batches weighted by their token share, so accumulation changes nothing but memory.
    Shuffles come from a generator seeded by (seed, step): a resumed run shuffles the same.

    In a torchrun job each rank updates on its own rows: its minibatch is its share of the
    job's (the token mean is over the job's minibatch), and the wrapper sums the gradients.
    Every rank shuffles its rows with the same permutation, so with one minibatch per epoch
    the job takes exactly one process's steps; with several, the job's minibatches are
    another (equally random) partition of the batch than one process would draw.
    """
    cfg, parallel, rows = run.cfg, run.parallel, ro.batch.ids.shape[0]
    minibatch, micro = rows // cfg.ppo.num_minibatches, micro_batch_rows(cfg, rows)
    epochs = cfg.ppo.ppo_epochs if algorithm_of(cfg).clipped else 1
    shuffle = update_shuffle(cfg, step)
    sums = dict.fromkeys(update_metric_keys(cfg), 0.0)
    updates, skipped = epochs * cfg.ppo.num_minibatches, 0
    for _ in range(epochs):
        order = torch.randperm(rows, generator=shuffle)
        for mb_start in range(0, rows, minibatch):
            mb = order[mb_start : mb_start + minibatch]
            mb_tokens = max(1, int(distributed.all_sum(ro.batch.response_mask[mb].sum())))
            for start in range(0, minibatch, micro):
                idx = mb[start : start + micro]
                with parallel.micro_batch(last=start + micro >= minibatch):
                    loss, terms = micro_batch_loss(run, ro, idx, kl_coef)
                    share = float(ro.batch.response_mask[idx].sum() / mb_tokens)
                    (loss * share * parallel.loss_scale).backward()
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


def check_batch_layout(cfg: PPOConfig, prompts_per_rank: int) -> None:
    """Each rank's rollouts split evenly into minibatches and micro-batches."""
    k = cfg.rollout.samples_per_prompt
    if prompts_per_rank * k % (cfg.ppo.num_minibatches * cfg.train.grad_accum):
        raise distributed.DistributedError(
            f"ppo.num_minibatches x train.grad_accum must divide each rank's "
            f"{prompts_per_rank * k} rollouts ({prompts_per_rank} prompts x {k} samples)"
        )


def check_sharded_rollout(cfg: PPOConfig, ac: ActorCritic) -> None:
    """FSDP needs tether's engine to sample: `generate` would run the sharded blocks,
    all-gathering at every decode step, and ranks whose answers end at different lengths
    would wait on each other for ever."""
    sharded = cfg.parallel == "fsdp" and distributed.world().size > 1
    if sharded and not (cfg.rollout.engine == "auto" and tether_engine.supports(ac.policy)):
        raise distributed.DistributedError(
            "parallel: fsdp with online RL needs tether's rollout engine (rollout.engine: "
            f"auto, a Llama-family model; this is {type(hf_model(ac.policy)).__name__}); "
            "use parallel: ddp"
        )


KLController = KLBudgetController | AdaptiveKLController | FixedKLController


def make_kl_controller(cfg: PPOConfig, steps: int) -> KLController:
    """β's controller for a run of `steps` PPO iterations."""
    kl = cfg.ppo.kl
    if kl.stops_at_budget:
        return FixedKLController(kl.coef)
    if kl.budget:
        ramp = round(kl.budget_ramp * steps)
        return KLBudgetController(kl.coef, kl.budget, lead=kl.budget_lead, ramp=ramp)
    if kl.adaptive:
        return AdaptiveKLController(kl.coef, kl.target, kl.horizon)
    return FixedKLController(kl.coef)


def build_online_run(
    cfg: PPOConfig, tokenizer, device: torch.device, bf16: bool, columns: set[str]
) -> OnlineRun:
    """The reward (checked against the prompt file's `columns`), the actor-critic (wrapped
    for torchrun), the reference, all on `device`, and fresh state."""
    reward, gold = build_reward(cfg, bf16, device, columns)
    ac, reference = load_actor_critic(cfg, tokenizer, algorithm_of(cfg).critic, bf16)
    ac.to(device).train()
    if reference is not None:
        reference.to(device)
    check_sharded_rollout(cfg, ac)
    return OnlineRun(
        cfg=cfg,
        parallel=distributed.Parallel(ac, cfg.parallel, bf16, cfg.fsdp_cpu_offload),
        reference=reference,
        tokenizer=tokenizer,
        reward=reward,
        gold=gold,
        bf16=bf16,
        moments=RunningMoments(),
        baseline=MovingAverageBaseline(cfg.ppo.baseline_decay),
        value_fit=least_squares_fit(cfg),
    )


def least_squares_fit(cfg: PPOConfig):
    """The least-squares refit of the value head where `critic.fit` asks for it and the
    algorithm has a critic. Not with `parallel: fsdp`, whose sharded head it cannot set: there
    the head learns from its loss alone (in one process too, so that a job and a process with
    one config train alike), and the run says so."""
    if cfg.critic.fit != "least_squares" or not algorithm_of(cfg).critic:
        return None
    if cfg.parallel == "fsdp":
        say("note: critic.fit least_squares does not run with parallel: fsdp; the value head "
            "learns from the value loss alone (critic.fit: gradient)")  # fmt: skip
        return None
    return LeastSquaresValueHead(cfg.critic.fit_decay, cfg.critic.fit_ridge)


def carried_state(kl_ctl: KLController, run: OnlineRun) -> dict:
    """What an iteration hands the next besides the weights, saved with every checkpoint."""
    return {
        "kl": kl_ctl.state_dict(),
        "score_moments": run.moments.state_dict(),
        "baseline": run.baseline.state_dict(),
        "value_fit": run.value_fit.state_dict() if run.value_fit is not None else None,
        "budget_reached_at": run.budget_reached_at,
    }


def load_carried_state(state: dict, kl_ctl: KLController, run: OnlineRun) -> None:
    kl_ctl.load_state_dict(state["kl"])
    run.moments.load_state_dict(state["score_moments"])
    run.baseline.load_state_dict(state["baseline"])
    if run.value_fit is not None and state.get("value_fit") is not None:
        run.value_fit.load_state_dict(state["value_fit"])
    run.budget_reached_at = state.get("budget_reached_at")


def run_ppo(cfg: PPOConfig, out: Path, resume: bool = False) -> Path:
    """Train a policy with PPO (or the algorithm `cfg.algo` names) and return `final/`."""
    begun = begin_run(cfg, out, resume)
    run_dir, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    messages, rows, columns = prepare_prompts(cfg, tokenizer)
    k = cfg.rollout.samples_per_prompt
    prompts_per_rank = distributed.per_rank(cfg.train.batch_size, "train.batch_size")
    check_batch_layout(cfg, prompts_per_rank)
    run = build_online_run(cfg, tokenizer, begun.device, bf16, {k for c in columns for k in c})
    ac = run.parallel.model
    landing = lands_on_budget(cfg)
    if landing:
        check_scalable(ac, run.reference)  # before any step, not after the last
    critic_lr = {"value_head.": cfg.critic.lr, "critic.": cfg.critic.lr} if cfg.critic.lr else None
    opt = start_optimization(
        run_dir, cfg, ac, len(rows), begun.resume_from, cfg.train.batch_size, critic_lr
    )
    last_step = total_steps(cfg.train, len(rows), per_step=cfg.train.batch_size)
    kl_ctl = make_kl_controller(cfg, last_step)
    if opt.extra:  # resumed: the state the checkpoint carried besides the weights
        load_carried_state(opt.extra, kl_ctl, run)
    samples_path = run_dir.path / "samples.jsonl"
    if distributed.world().is_main:
        truncate_jsonl(samples_path, opt.progress.step)

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        step = opt.progress.step + 1  # the step this call completes
        started = time.perf_counter()
        grouped = [i for i in indices for _ in range(k)]  # the job's rows, groups in a row
        first_row = distributed.world().rank * prompts_per_rank * k
        grouped = distributed.shard(grouped)  # this rank's prompts, each k times
        seeds = [row_seed(cfg.train.seed, step, first_row + r) for r in range(len(grouped))]
        ro, stats, samples = collect_rollout(
            run,
            [messages[i] for i in grouped],
            [rows[i] for i in grouped],
            kl_ctl.value,
            seeds,
            first_micro_batch(cfg, step, len(grouped)),
            [columns[i] for i in grouped],
        )
        stats["time/rollout_s"] = time.perf_counter() - started
        stats["time/sync_s"] = ro.generation.sync_s
        started = time.perf_counter()
        if cfg.ppo.kl.stops_at_budget and stats["kl/mean"] >= cfg.ppo.kl.budget:
            run.budget_reached_at = step  # the run ends here, untrained on this rollout
            stats["kl/budget_reached"] = 1.0
        else:
            stats.update(ppo_update(run, opt, ro, kl_ctl.value, step))
            if run.value_fit is not None and not stats["guard/skipped_updates"]:
                # (a step whose updates were skipped for non-finite values moves nothing)
                features, mask = ro.value_features, ro.batch.response_mask
                stats.update(run.value_fit.refit(ac.value_head, features, ro.returns, mask))
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
        run=run_dir,
        model=ac,
        opt=opt,
        num_examples=len(rows),
        step_fn=step_fn,
        per_step=cfg.train.batch_size,
        steps_itself=True,
        extra_state=lambda: carried_state(kl_ctl, run),
        until=lambda: run.budget_reached_at is not None,
    )

    if landing:
        land_final_policy(cfg, run, rows, run_dir.path)

    def save(whole: ActorCritic) -> None:
        save_pretrained_model(whole.policy, tokenizer, run_dir.final)
        save_critic(whole, tokenizer, run_dir.final)

    save_final(run.parallel, save, run_dir, cfg)
    run_dir.unlock()
    return run_dir.final


def lands_on_budget(cfg: PPOConfig) -> bool:
    """Whether the run lands its final policy on its KL budget (tether.rollout.landing): a
    budget and `ppo.kl.budget_landing`, and not a fully trained policy under FSDP, whose
    sharded weights it cannot interpolate (the run says so)."""
    if not (cfg.ppo.kl.budget and cfg.ppo.kl.budget_landing):
        return False
    if cfg.parallel == "fsdp" and not cfg.model.lora.enabled:
        say("note: ppo.kl.budget_landing needs LoRA under parallel: fsdp; final/ will be the "
            "last step's policy")  # fmt: skip
        return False
    return True


def land_final_policy(cfg: PPOConfig, run: OnlineRun, rows: list[list[int]], path: Path) -> None:
    """Land the trained policy on the KL budget (tether.rollout.landing), measured on the
    first `ppo.kl.budget_landing` training prompts (each rank its share), one answer each
    drawn with seeds of their own (step 0, which no iteration uses): a resumed run lands
    exactly as the uninterrupted one. Writes RUN_DIR/landing.json."""
    indices = distributed.shard(list(range(min(cfg.ppo.kl.budget_landing, len(rows)))))
    seeds = [row_seed(cfg.train.seed, 0, i) for i in indices]
    landing = land_on_budget(run, [rows[i] for i in indices], seeds, cfg.ppo.kl.budget)
    record = landing.as_dict()
    if distributed.world().is_main:
        write_text_atomic(path / LANDING_FILE, json.dumps(record, indent=2) + "\n")
    say(
        f"KL budget {landing.budget:g}: the trained policy's KL {record['kl_trained']:.2f}; "
        + (
            "within the budget, kept as trained"
            if landing.scale == 1.0
            else f"its update scaled by {landing.scale:.2f} to KL {record['kl_landed']:.2f}"
        )
    )


LANDING_FILE = "landing.json"
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
