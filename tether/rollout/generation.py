"""Sampling responses from a policy: prompts in, token ids, texts and end flags out.

`generate` picks tether's rollout engine (`tether.fast.engine`) where it supports the model
and falls back on Hugging Face `generate`; both sample from the full distribution at the
given temperature, so the log-probs the trainer computes later are those of the sampler.
A batch that runs out of memory is halved and retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from tether.console import say
from tether.core.packing import pad_rows, through_first_stop
from tether.data import Message, as_messages
from tether.errors import TetherError
from tether.fast import engine as tether_engine
from tether.fast import static_decode
from tether.hardware import bf16_available, is_out_of_memory
from tether.models.loading import hf_model, model_device

R = TypeVar("R")  # a prompt row, or its index


@dataclass
class Generation:
    """Sampled responses, one per prompt: token ids (EOS included when it was produced)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]  # True where the response stopped at EOS, False where it hit the limit
    # Seconds spent exporting the policy's weights to the engine (LoRA merged, in the compute
    # dtype): the weight sync, logged as time/sync_s. 0 with Hugging Face `generate`.
    sync_s: float = 0.0


def encode_prompt(tokenizer, prompt: str | list[Message]) -> list[int]:
    """Chat-template token ids of a prompt, ending with the assistant header."""
    messages = as_messages(prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[Message]] | Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    ignore_eos: bool = False,
    seed: int | None = None,
    batch_size: int = 0,
    engine: str = "auto",
    dtype: torch.dtype | None = None,
    row_seeds: Sequence[int] | None = None,
) -> Generation:
    """Sample one response per prompt (strings, message lists or token-id lists).

    Uses Hugging Face `generate` on left-padded batches (it derives position ids from the
    mask). With `seed`, sampling uses its own RNG and leaves the global one untouched; without,
    it draws from the global RNG (whose state a checkpoint saves, so a resumed run samples the
    same). temperature 0 means greedy decoding.

    engine "auto" decodes Llama-family models with tether's engine: on a CPU its KV-cache
    engine (tether.fast.engine), on a GPU its fixed-shape loop captured as a CUDA graph
    (tether.fast.static_decode; with top_p/top_k, which that loop does not do, `generate`);
    others with Hugging Face `generate`. "hf" always uses `generate`; "static" the fixed-shape
    loop on any device. `dtype` is the engine's compute dtype (default: bf16 where the
    CPU/GPU has it, else float32).

    `row_seeds` (one per prompt) gives each row its own generator in the engine, so a row's
    sample does not depend on the batch, the chunking or the torchrun rank it falls in.
    Hugging Face `generate` has one RNG for the batch: it is seeded with the first row's
    seed, so batches (and ranks) still draw distinct, reproducible samples.
    """
    rows = [p if _is_ids(p) else encode_prompt(tokenizer, p) for p in prompts]
    settings = Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        ignore_eos=ignore_eos,
        stops=[] if ignore_eos else stop_token_ids(model, tokenizer),
        batch_size=batch_size or len(rows),
    )
    device = model_device(model)
    full_distribution = top_p == 1.0 and not top_k  # the static loop does not truncate
    static = engine == "static" or (
        engine == "auto"
        and device.type == "cuda"
        and full_distribution
        and tether_engine.fits_layout(model)
    )
    if static or (engine == "auto" and tether_engine.supports(model)):
        if dtype is None:
            dtype = torch.bfloat16 if bf16_available(device) else torch.float32
        started = time.perf_counter()
        weights = tether_engine.Weights(model, dtype)  # once for every chunk of the batch
        sync_s = time.perf_counter() - started
        responses = _engine_generate(weights, tokenizer, rows, settings, seed, row_seeds, static)
        return replace(_generation(tokenizer, rows, responses, settings.stops), sync_s=sync_s)
    else:
        if row_seeds is not None and seed is None:
            seed = row_seeds[0] % 2**32
        responses = _hf_generate(model, tokenizer, rows, settings, seed)
    return _generation(tokenizer, rows, responses, settings.stops)


@dataclass(frozen=True)
class Sampling:
    """How `generate` samples, shared by its back ends."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    ignore_eos: bool
    stops: list[int]  # a response ends at the first of these
    batch_size: int  # rows per decode call


def _engine_generate(
    weights: tether_engine.Weights,
    tokenizer,
    rows: list[list[int]],
    settings: Sampling,
    seed: int | None,
    row_seeds: Sequence[int] | None,
    static: bool = False,
) -> list[list[int]]:
    """tether's KV-cache engine, over chunks of `batch_size` rows (halved on OOM): the CPU
    engine, or the fixed-shape loop (`tether.fast.static_decode`) where `static`."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if static and (settings.top_p < 1.0 or settings.top_k):
        raise TetherError("the static decode loop samples the full distribution (no top_p/k)")

    def decode_chunk(chunk: list[int]) -> list[list[int]]:  # indices into rows
        seeds = None if row_seeds is None else [row_seeds[i] for i in chunk]
        sampling = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature}
        if static:
            decode = static_decode.decode_static
        else:
            decode = tether_engine.decode
            sampling |= {"top_p": settings.top_p, "top_k": settings.top_k}
        return decode(
            weights,
            [rows[i] for i in chunk],
            tokenizer.pad_token_id,
            settings.stops,
            generator=generator,
            row_seeds=seeds,
            **sampling,
        )

    responses: list[list[int]] = []
    for start in range(0, len(rows), settings.batch_size):
        chunk = list(range(start, min(start + settings.batch_size, len(rows))))
        responses += split_on_oom(decode_chunk, chunk, lambda i: len(rows[i]))
    return responses


def _hf_generate(
    model, tokenizer, rows: list[list[int]], settings: Sampling, seed: int | None
) -> list[list[int]]:
    """Hugging Face `generate` on left-padded chunks, its own RNG seeded where `seed` is."""
    from transformers import GenerationConfig

    inner = hf_model(model)
    was_training = model.training
    model.eval()
    temperature, stops = settings.temperature, settings.stops
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.max_new_tokens if settings.ignore_eos else 0,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=settings.top_p,
        top_k=settings.top_k,
        eos_token_id=stops or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    # `generate` fills every field left unset from the model's own generation config (a
    # repetition penalty, min_p, suppressed tokens...), which would sample from another
    # distribution than the one log-probs are computed on; give it a blank one meanwhile.
    model_config, inner.generation_config = inner.generation_config, GenerationConfig()

    device = model_device(model)

    def generate_chunk(chunk: list[list[int]]) -> list[list[int]]:
        ids, mask = pad_rows(chunk, tokenizer.pad_token_id, side="left")
        ids, mask = ids.to(device), mask.to(device)
        out = inner.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return [through_first_stop(r.tolist(), stops) for r in out[:, ids.shape[1] :]]

    responses: list[list[int]] = []
    try:
        # Seeded sampling leaves the run's own streams as they were, the GPU's included.
        gpus = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(rows), settings.batch_size):
                responses += split_on_oom(generate_chunk, rows[start : start + settings.batch_size])
    finally:
        inner.generation_config = model_config
        model.train(was_training)
    return responses


def split_on_oom(
    run: Callable[[list[R]], list[list[int]]],
    rows: list[R],
    prompt_length: Callable[[R], int] = len,
) -> list[list[int]]:
    """run(rows), or, if it runs out of memory, run on each half (recursively) and join.

    A rollout at a batch that does not fit is not worth a crash hours into a run: it goes on
    at half the batch, with a warning naming the setting to lower. One prompt that does not fit
    is an error naming its length, the one thing splitting cannot fix.
    """
    try:
        return run(rows)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        if len(rows) == 1:
            raise TetherError(
                f"generation ran out of memory on a single prompt of {prompt_length(rows[0])} "
                "tokens; "
                "lower rollout.max_new_tokens or data.max_length"
            ) from e
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(rows) // 2
        say(
            f"warning: generating {len(rows)} rows ran out of memory; going on in halves of "
            f"{half} (set rollout.generation_batch_size={half} to skip the failed attempt)"
        )
        return split_on_oom(run, rows[:half], prompt_length) + split_on_oom(
            run, rows[half:], prompt_length
        )


def _generation(
    tokenizer, rows: list[list[int]], responses: list[list[int]], stops: list[int]
) -> Generation:
    ended = [bool(r) and r[-1] in stops for r in responses]
    texts = tokenizer.batch_decode(
        [r[:-1] if e else r for r, e in zip(responses, ended, strict=True)],
        skip_special_tokens=True,
    )
    return Generation(rows, responses, texts, ended)


def encode_answer(tokenizer, prompt: list[Message], answer: str) -> list[int]:
    """Token ids of `answer` as the chat template renders it after `prompt`, through EOS.

    Tokenised on its own after the prompt's ids, exactly as a sampled answer continues the
    prompt during generation, so DPO scores what the policy would produce.
    """
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False
    )
    text = full[len(head) :] if full.startswith(head) else answer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else [*ids, eos]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the model's own (chat models often end a turn with another
    token, e.g. Llama 3's <|eot_id|>): a response ends at the first of them."""
    ids = [tokenizer.eos_token_id]
    config = getattr(hf_model(model), "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({i for i in ids if i is not None})


def _is_ids(prompt) -> bool:
    return isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int))
