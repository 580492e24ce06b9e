"""Direct preference optimisation (and IPO, hinge) on preference pairs and rankings.

The loop: read and split preference data, expand rankings into weighted pairs, tokenise
prompt | answer (the answer as the chat template renders it, ending with EOS) -> compute the
reference's sequence log-probs of every answer ONCE and cache them in the run dir (a resumed
run reads them back; no reference model stays in memory) -> each step scores chosen and
rejected in one batch, each pair's prompt run once for both, and applies `dpo_loss` ->
`final/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tether.config import DPOConfig, ModelConfig
from tether.console import say, warn
from tether.core.losses import dpo_loss
from tether.core.ops import sequence_logprobs
from tether.data import DataError, LoadReport, PreferencePair, load_preference_splits
from tether.hardware import autocast
from tether.models.loading import load_causal_lm, model_device, save_pretrained_model
from tether.rollout.generation import encode_answer, encode_prompt
from tether.rollout.passes import build_batch, sequence_logprobs_of
from tether.runs import distributed
from tether.runs.training import begin_run, fit, save_final, start_optimization

REFERENCE_CACHE = "reference_logps.safetensors"


@dataclass(frozen=True)
class TokenizedPreference:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    weight: float


def tokenize_preferences(
    pairs: list[PreferencePair], tokenizer, max_length: int, report: LoadReport
) -> list[TokenizedPreference]:
    """Fit prompt + the longer answer into max_length: the prompt is cut from the left (down
    to half the budget), then answers from the right."""
    out = []
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.prompt)
        chosen = encode_answer(tokenizer, p.prompt, p.chosen)
        rejected = encode_answer(tokenizer, p.prompt, p.rejected)
        longest = max(len(chosen), len(rejected))
        keep_prompt = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[-keep_prompt:]
        chosen, rejected = chosen[: max_length - len(prompt)], rejected[: max_length - len(prompt)]
        if chosen == rejected:
            report.skipped["identical after truncation"] += 1
            continue
        out.append(TokenizedPreference(prompt, chosen, rejected, p.weight))
    return out


def prepare_data(
    cfg: DPOConfig, tokenizer
) -> tuple[list[TokenizedPreference], list[TokenizedPreference]]:
    """Read, validate, split and tokenise; raises DataError before any model loads.

    Rankings become weighted pairs (`dpo.listwise_pairs`) on both sides of the split.
    """
    splits = load_preference_splits(cfg.data, cfg.train.seed)
    train_pairs, held_out_pairs = splits.pairs(cfg.dpo.listwise_pairs)
    max_len = cfg.data.max_length
    train = tokenize_preferences(train_pairs, tokenizer, max_len, splits.report)
    held_out = tokenize_preferences(held_out_pairs, tokenizer, max_len, splits.eval_report)
    say(splits.report.summary() + f" -> {len(train)} train / {len(held_out)} held-out pairs")
    if not train:
        raise DataError(f"{cfg.data.train}: no usable preference pairs")
    return train, held_out


def pair_logps(model, pairs: list[TokenizedPreference], pad_id: int, bf16: bool) -> torch.Tensor:
    """[B, 2] sequence log-probs (chosen, rejected) of 2B rows in one batch, in which each
    pair's prompt runs once for both answers (`response_hidden` shares repeated prompts)."""
    prompts = [p.prompt for p in pairs] * 2
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = build_batch(prompts, answers, pad_id).to(model_device(model))
    with autocast(bf16):
        token_logps = sequence_logprobs_of(model, batch, temperature=1.0)
    logps = sequence_logprobs(token_logps, batch.response_mask)
    return torch.stack([logps[: len(pairs)], logps[len(pairs) :]], dim=1)


@torch.no_grad()
def all_pair_logps(
    model: torch.nn.Module | distributed.Parallel,
    pairs: list[TokenizedPreference],
    batch_size: int,
    pad_id: int,
    bf16: bool,
    desc: str,
) -> torch.Tensor:
    """[N, 2] log-probs of every pair (on the CPU), in eval mode; in a torchrun job each rank
    computes its share and every rank gets all N."""
    if not pairs:
        return torch.zeros(0, 2)
    parallel = distributed.Parallel.of(model)
    was_training = parallel.model.training
    parallel.model.eval()
    mine, real = distributed.eval_share(pairs, pairs[0])
    out = [
        parallel(pair_logps, mine[i : i + batch_size], pad_id, bf16).cpu()
        for i in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch", leave=False)
    ]
    parallel.model.train(was_training)
    return distributed.gather_real(torch.cat(out), real)


def reference_logps(
    cfg: DPOConfig,
    path: Path,
    policy: distributed.Parallel,
    splits: dict[str, list[TokenizedPreference]],
    tokenizer,
    bf16: bool,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The reference's [N, 2] log-probs per split on `device`, read from `path` or computed
    and cached.

    Computed before any training step, from `cfg.reference` or else from the policy's initial
    weights, and written atomically; a cache whose shapes do not match the data is redone.
    In a torchrun job every rank computes its share and rank 0 writes the cache.
    """
    if path.is_file():
        cached = load_file(path)
        if all(k in cached and cached[k].shape == (len(v), 2) for k, v in splits.items()):
            return {k: v.to(device) for k, v in cached.items()}
        warn(f"{path} does not match the data; recomputing reference log-probs")
    model: torch.nn.Module | distributed.Parallel = policy
    if cfg.reference:
        ref_cfg = ModelConfig(name=cfg.reference, trust_remote_code=cfg.model.trust_remote_code)
        model = load_causal_lm(ref_cfg, tokenizer, dropout=False).to(device)
    pad, size = (
        tokenizer.pad_token_id,
        distributed.per_rank(cfg.train.batch_size, "train.batch_size"),
    )
    logps = {
        k: all_pair_logps(model, v, size, pad, bf16, desc=f"reference log-probs ({k})")
        for k, v in splits.items()
    }
    if distributed.world().is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(logps, str(tmp))
        os.replace(tmp, path)
    distributed.barrier()
    return {k: v.to(device) for k, v in logps.items()}


def pair_losses(
    cfg: DPOConfig, logps: torch.Tensor, ref_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dpo_loss` of [B, 2] (chosen, rejected) policy and reference log-probs under `cfg.dpo`:
    per-pair losses and the chosen and rejected implicit rewards."""
    return dpo_loss(
        logps[:, 0],
        logps[:, 1],
        ref_logps[:, 0],
        ref_logps[:, 1],
        cfg.dpo.beta,
        cfg.dpo.loss_type,
        cfg.dpo.label_smoothing,
    )


def dpo_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    logps: torch.Tensor,
    weights: torch.Tensor,
) -> dict[str, float]:
    """Weighted means; accuracy counts ties as half, as the reward model's does."""

    def mean(x: torch.Tensor) -> float:
        return float((x.float() * weights).sum() / weights.sum())

    diff = chosen_rewards - rejected_rewards
    return {
        "dpo/loss": mean(losses.detach()),
        "rewards/chosen": mean(chosen_rewards),
        "rewards/rejected": mean(rejected_rewards),
        "rewards/accuracy": mean((diff > 0).float() + 0.5 * (diff == 0).float()),
        "rewards/margin": mean(diff),
        "logps/chosen": mean(logps[:, 0].detach()),
        "logps/rejected": mean(logps[:, 1].detach()),
    }


def run_dpo(cfg: DPOConfig, out: Path, resume: bool = False) -> Path:
    """Train with DPO and return the path of `final/`."""
    begun = begin_run(cfg, out, resume)
    run, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    train, held_out = prepare_data(cfg, tokenizer)
    per_micro = distributed.per_rank(cfg.train.batch_size, "train.batch_size")
    model = load_causal_lm(cfg.model, tokenizer, dropout=False).to(begun.device)
    model.train()
    parallel = distributed.Parallel(model, cfg.parallel, bf16, cfg.fsdp_cpu_offload)
    ref = reference_logps(
        cfg,
        run.path / REFERENCE_CACHE,
        parallel,
        {"train": train, "held_out": held_out},
        tokenizer,
        bf16,
        begun.device,
    )
    opt = start_optimization(run, cfg, model, len(train), begun.resume_from)
    pad_id = tokenizer.pad_token_id

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        total_weight = sum(train[i].weight for i in indices)  # the whole step's
        mine = distributed.shard(indices)
        sums: dict[str, float] = {}
        tokens = 0
        for start in range(0, len(mine), per_micro):
            micro_idx = mine[start : start + per_micro]
            micro = [train[i] for i in micro_idx]
            weights = torch.tensor([p.weight for p in micro], device=begun.device)
            share = float(weights.sum()) / total_weight  # exact under accumulation
            with parallel.micro_batch(last=start + per_micro >= len(mine)):
                logps = parallel(pair_logps, micro, pad_id, bf16)
                losses, chosen_r, rejected_r = pair_losses(cfg, logps, ref["train"][micro_idx])
                loss = (losses * weights).sum() / weights.sum() * share
                (loss * parallel.loss_scale).backward()
            for key, value in dpo_metrics(losses, chosen_r, rejected_r, logps, weights).items():
                sums[key] = sums.get(key, 0.0) + value * share
            tokens += sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) for p in micro)
        sums = distributed.sum_metrics(sums)
        sums["train/loss"] = sums["dpo/loss"]
        return sums, tokens

    def eval_fn() -> dict[str, float]:
        # The batching of the reference pass: identical padding, so step 0 is exactly ln 2.
        logps = all_pair_logps(parallel, held_out, per_micro, pad_id, bf16, desc="eval")
        losses, chosen_r, rejected_r = pair_losses(cfg, logps, ref["held_out"].cpu())
        weights = torch.tensor([p.weight for p in held_out])
        metrics = dpo_metrics(losses, chosen_r, rejected_r, logps, weights)
        return {f"eval/{k}": v for k, v in metrics.items()}

    fit(
        desc="dpo",
        cfg=cfg,
        run=run,
        model=model,
        opt=opt,
        num_examples=len(train),
        step_fn=step_fn,
        eval_fn=eval_fn if held_out else None,
        lengths=[len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in train],
    )
    save_final(parallel, lambda m: save_pretrained_model(m, tokenizer, run.final), run, cfg)
    run.unlock()
    return run.final
