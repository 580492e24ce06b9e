"""Supervised fine-tuning: next-token NLL on assistant/completion tokens only.

The loop, top to bottom: validate data -> load model -> resume if asked -> for each optimizer
step, `grad_accum` micro-batches whose token losses are divided by the token count of the
whole step (so 8 x 1 accumulation equals one batch of 8) -> clip, step, log, evaluate,
checkpoint -> save `final/`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tether.config import SFTConfig
from tether.console import say
from tether.core.losses import sft_loss
from tether.data import (
    DataError,
    ReadOptions,
    TokenizedSFT,
    collate_sft,
    load_sft_examples,
    split_train_eval,
    tokenize_sft,
)
from tether.hardware import autocast
from tether.models.loading import load_causal_lm, model_device, save_pretrained_model
from tether.runs import distributed
from tether.runs.training import begin_run, fit, save_final, start_optimization


def tokenize_all(examples, tokenizer, max_length: int, report) -> list[TokenizedSFT]:
    out = []
    for ex in examples:
        tok = tokenize_sft(ex, tokenizer, max_length)
        if tok is None:
            report.skipped["no assistant token within max_length"] += 1
        else:
            out.append(tok)
    return out


def prepare_data(cfg: SFTConfig, tokenizer) -> tuple[list[TokenizedSFT], list[TokenizedSFT]]:
    """Read, validate and tokenise train and eval data; raises DataError before training."""
    examples, report = load_sft_examples(cfg.data.train, ReadOptions.of(cfg.data))
    if cfg.data.eval:
        eval_examples, eval_report = load_sft_examples(
            cfg.data.eval, ReadOptions.of(cfg.data, held_out=True)
        )
    else:
        examples, eval_examples = split_train_eval(examples, cfg.data.eval_fraction, cfg.train.seed)
        eval_report = report
    train = tokenize_all(examples, tokenizer, cfg.data.max_length, report)
    held_out = tokenize_all(eval_examples, tokenizer, cfg.data.max_length, eval_report)
    say(report.summary())
    if cfg.data.eval:
        say(eval_report.summary())
    if not train:
        raise DataError(f"{cfg.data.train}: no example fits data.max_length={cfg.data.max_length}")
    return train, held_out


def micro_batch_loss(model, batch: dict[str, torch.Tensor], num_tokens: int, bf16: bool):
    """The NLL of a micro-batch (built on the CPU, moved here to the model's device)."""
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    with autocast(bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sft_loss(logits.float(), batch["labels"], num_tokens=num_tokens)


@torch.no_grad()
def evaluate(
    parallel: distributed.Parallel,
    data: list[TokenizedSFT],
    batch_size: int,
    pad_id: int,
    bf16: bool,
) -> float:
    """Token-mean NLL over the whole held-out set; each rank scores its share."""
    model = parallel.model
    model.eval()
    total_tokens = sum(x.num_target_tokens for x in data)
    # The filler has no target token: it adds 0 to the sum.
    mine, _ = distributed.eval_share(data, TokenizedSFT(data[0].input_ids[:1], [-100]))
    loss = 0.0
    for start in range(0, len(mine), batch_size):
        batch = collate_sft(mine[start : start + batch_size], pad_id)
        loss += parallel(micro_batch_loss, batch, total_tokens, bf16)[0].item()
    model.train()
    return float(distributed.all_sum(loss))


def run_sft(cfg: SFTConfig, out: Path, resume: bool = False) -> Path:
    """Train and return the path of `final/`."""
    begun = begin_run(cfg, out, resume)
    run, bf16, tokenizer = begun.run, begun.bf16, begun.tokenizer
    train, held_out = prepare_data(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    per_micro = distributed.per_rank(cfg.train.batch_size, "train.batch_size")
    model = load_causal_lm(cfg.model, tokenizer).to(begun.device)
    model.train()
    parallel = distributed.Parallel(model, cfg.parallel, bf16, cfg.fsdp_cpu_offload)
    opt = start_optimization(run, cfg, model, len(train), begun.resume_from)

    def step_fn(indices: list[int]) -> tuple[dict[str, float], int]:
        num_tokens = sum(train[i].num_target_tokens for i in indices)  # the whole step's
        examples = [train[i] for i in distributed.shard(indices)]
        step_loss, seen_tokens = 0.0, 0
        for start in range(0, len(examples), per_micro):
            batch = collate_sft(examples[start : start + per_micro], pad_id)
            with parallel.micro_batch(last=start + per_micro >= len(examples)):
                loss, _ = parallel(micro_batch_loss, batch, num_tokens, bf16)
                (loss * parallel.loss_scale).backward()
            step_loss += loss.item()
            seen_tokens += int(batch["attention_mask"].sum())
        metrics = distributed.sum_metrics({"train/loss": step_loss})
        return {**metrics, "train/target_tokens": num_tokens}, seen_tokens

    def eval_fn() -> dict[str, float]:
        return {"eval/loss": evaluate(parallel, held_out, per_micro, pad_id, bf16)}

    fit(
        desc="sft",
        cfg=cfg,
        run=run,
        model=model,
        opt=opt,
        num_examples=len(train),
        step_fn=step_fn,
        eval_fn=eval_fn if held_out else None,
        lengths=[len(x.input_ids) for x in train],
    )
    save_final(parallel, lambda m: save_pretrained_model(m, tokenizer, run.final), run, cfg)
    run.unlock()
    return run.final
