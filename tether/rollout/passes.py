"""Forward passes over a rollout: lay it out as tensors, then read the log-probs, entropies
and hidden states of its response tokens.

Layout of a rollout batch (B rows):

    ids   [B, P + R]   prompt left-padded to width P | response right-padded to width R
    mask  [B, P + R]   1 on real tokens (prompt and response up to and including EOS)
    response_mask [B, R]   the response part of `mask`

Position ids come from the mask, so left padding does not shift positions
(docs/implementation-details.md#left-padding-and-position-ids). The
state that emits response token t is position P + t − 1, so log-probs, entropies and values
of the response are all read from hidden[:, P − 1 : −1]: the LM head runs on R positions per
row instead of P + R, and no [B, P + R, V] logits tensor is ever built.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from tether.core.ops import logprobs_and_entropy_from_logits, logprobs_from_logits
from tether.core.packing import (
    BUCKET_OVERHEAD_TOKENS,
    distinct_rows,
    length_buckets,
    pack_groups,
    pad_rows,
    position_ids_from_mask,
)
from tether.models.attention import runs_packed_rows
from tether.models.loading import hf_model, model_device
from tether.models.reward_model import packed_hidden_states
from tether.models.trunk import Trunk, hidden_above_trunk, run_trunk
from tether.runs import distributed


@dataclass
class RolloutBatch:
    """A rollout laid out as tensors (see the module docstring)."""

    ids: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, P + R]
    prompt_width: int  # P
    response_mask: torch.Tensor  # [B, R]
    # The policy's frozen lower layers' output for these rows (`with_trunk`): passes of that
    # policy (and of π_ref, its adapters off) run from it; other models ignore it.
    trunk: Trunk | None = None

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch on `device` (itself where it is already there)."""
        return RolloutBatch(
            self.ids.to(device),
            self.mask.to(device),
            self.prompt_width,
            self.response_mask.to(device),
            None if self.trunk is None else self.trunk.to(device),
        )

    def rows(self, index: torch.Tensor | list[int]) -> RolloutBatch:
        return RolloutBatch(
            self.ids[index],
            self.mask[index],
            self.prompt_width,
            self.response_mask[index],
            None if self.trunk is None else self.trunk.rows(index),
        )

    def trimmed(self, index: torch.Tensor) -> RolloutBatch:
        """`rows(index)` without the columns that are padding in all of those rows."""
        sub = self.rows(index)
        width = self.prompt_width
        prompt = int(sub.mask[:, :width].sum(dim=1).max())
        response = max(1, int(sub.response_mask.sum(dim=1).max()))
        start, stop = width - prompt, width + response
        return RolloutBatch(
            sub.ids[:, start:stop],
            sub.mask[:, start:stop],
            prompt,
            sub.response_mask[:, :response],
            None if sub.trunk is None else sub.trunk.columns(start, stop),
        )


def build_batch(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_id: int
) -> RolloutBatch:
    prompt, prompt_mask = pad_rows(prompt_ids, pad_id, "left")
    response, response_mask = pad_rows(response_ids, pad_id, "right", min_width=1)
    return RolloutBatch(
        torch.cat([prompt, response], dim=1),
        torch.cat([prompt_mask, response_mask], dim=1),
        prompt.shape[1],
        response_mask,
    )


def new_cache(backbone: torch.nn.Module) -> tuple[Any, dict[str, Any]]:
    """An empty KV cache and the keyword arguments that hand it to `backbone` (filled in
    place by its forward): for running a shared prefix once and its continuations after."""
    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers 5.24 renamed `past_key_values` to `cache`
    named = "cache" if "cache" in inspect.signature(backbone.forward).parameters else None
    return cache, {named or "past_key_values": cache, "use_cache": True}


def cache_rows(cache: Any, backbone: torch.nn.Module, rows: torch.Tensor) -> tuple[Any, dict]:
    """A new cache (and its `backbone` keyword arguments) holding batch rows `rows` of
    `cache`, which stays as it was: one shared prefix's cache serves several continuations.
    Gradients flow back through the copy."""
    copy, kwargs = new_cache(backbone)
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys[rows], layer.values[rows], index)
    return copy, kwargs


def bucket_limit(backbone: torch.nn.Module) -> int:
    """How many length buckets a pass may use: one where each call would cast frozen float32
    weights to the autocast dtype (a LoRA policy's base in a bf16 run), since the cast is
    paid, and in training its copy kept for backward, once per call."""
    if not torch.is_autocast_enabled(model_device(backbone).type):
        return 4
    linears = (m.weight for m in backbone.modules() if isinstance(m, torch.nn.Linear))
    return 1 if any(w.dtype == torch.float32 and not w.requires_grad for w in linears) else 4


def can_split_pass(backbone: torch.nn.Module) -> bool:
    """Whether a forward may run as a shared prefix, then its continuations (new_cache): not
    under gradient checkpointing (no cache) nor FSDP (`distributed.fsdp_sharded`)."""
    checkpointing = getattr(backbone, "gradient_checkpointing", False) and backbone.training
    return not (checkpointing or distributed.fsdp_sharded(backbone))


def response_hidden(model, batch: RolloutBatch) -> torch.Tensor:
    """[B, R, H] final hidden states at the positions that emit each response token.

    `model` is a Hugging Face model (causal LM or sequence classifier), optionally wrapped by
    peft. The states (and gradients) are those of one pass over prompt + response per row,
    computed with less work:
    - rows with the same prompt (the k samples of a GRPO/RLOO group, DPO's chosen and
      rejected) run it once, then only their responses: packed in one row without padding
      (`ops.pack_groups`) where the model takes one (`attention.runs_packed_rows`), else
      with the prompt's keys and values copied to the rows (gradients flow through the
      copy) and the responses in length buckets;
    - distinct prompts that open alike (a system prompt, a task's instruction) run the
      opening once, then each its own rest and response;
    - rows run in buckets of similar length (`length_buckets`) where padding every row to
      the batch's longest response costs more than another call.
    Under gradient checkpointing (no cache) or FSDP (`distributed.fsdp_sharded`: a second
    call would find its blocks' weights freed), the backbone runs once: packed, or over
    prompt + response padded. Padding positions hold 0 or garbage; mask them.
    """
    inner = hf_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    batch = batch.to(model_device(backbone))
    if batch.trunk is not None and batch.trunk.backbone is backbone:
        return _hidden_from_trunk(backbone, batch)
    width = batch.prompt_width
    prompt_part = torch.cat([batch.ids[:, :width], batch.mask[:, :width]], dim=1)
    first_row, group_of_row = distinct_rows(list(map(tuple, prompt_part.tolist())))
    shared = len(first_row) < batch.ids.shape[0]
    if shared and runs_packed_rows(inner.config):
        return _packed_shared_prompts_hidden(backbone, batch, group_of_row)
    if not can_split_pass(backbone):
        return _whole_rows_hidden(backbone, batch)
    if shared:
        return _hidden_after_shared_prompts(backbone, batch, first_row, group_of_row)
    # Each bucket runs the common opening in a call of its own.
    opening = _paying_opening(batch)
    buckets = length_buckets(
        batch.response_mask.sum(dim=1),
        batch.mask[:, :width].sum(dim=1) - opening,
        bucket_limit(backbone),
        overhead=BUCKET_OVERHEAD_TOKENS * (2 if opening else 1) + opening,
    )
    parts = [_distinct_prompts_hidden(backbone, batch.trimmed(rows)) for rows in buckets]
    return _unbucket(parts, buckets, batch.response_mask.shape[1])


def with_trunk(model, batch: RolloutBatch) -> RolloutBatch:
    """The batch with `model`'s trunk (`tether.models.trunk`): its frozen lower layers run
    once over the rows, for every later pass of `model` (and of it with its adapters off) to
    start from. The batch unchanged where the model has no trunk to cut."""
    inner = hf_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    batch = batch.to(model_device(backbone))
    trunk = run_trunk(backbone, batch.ids, batch.mask)
    return batch if trunk is None else replace(batch, trunk=trunk)


def _hidden_from_trunk(backbone, batch: RolloutBatch) -> torch.Tensor:
    """The layers above the trunk over whole rows, in length buckets."""
    width = batch.prompt_width
    buckets = length_buckets(
        batch.response_mask.sum(dim=1),
        batch.mask[:, :width].sum(dim=1),
        bucket_limit(backbone),
        overhead=BUCKET_OVERHEAD_TOKENS,
    )
    parts = []
    for rows in buckets:
        sub = batch.trimmed(rows)
        parts.append(hidden_above_trunk(sub.trunk, sub.mask, sub.prompt_width))
    return _unbucket(parts, buckets, batch.response_mask.shape[1])


def _unbucket(parts: list[torch.Tensor], buckets: list[torch.Tensor], width: int) -> torch.Tensor:
    """Buckets' [b, R_b, H] states back to one [B, width, H] in the batch's row order (a
    bucket, even the only one, is as wide as its own longest response)."""
    stacked = torch.cat([F.pad(h, (0, 0, 0, width - h.shape[1])) for h in parts])
    return stacked if len(parts) == 1 else stacked[torch.cat(buckets).argsort()]


def _whole_rows_hidden(backbone, batch: RolloutBatch) -> torch.Tensor:
    hidden = backbone(
        input_ids=batch.ids,
        attention_mask=batch.mask,
        position_ids=position_ids_from_mask(batch.mask),
    ).last_hidden_state
    return hidden[:, batch.prompt_width - 1 : -1]


def _paying_opening(batch: RolloutBatch) -> int:
    """The prompts' common opening where running it once saves a tenth of the pass, else 0."""
    opening = common_prompt_opening(batch)
    pays = opening * (batch.ids.shape[0] - 1) >= 0.1 * int(batch.mask.sum())
    return opening if pays else 0


def _distinct_prompts_hidden(backbone, batch: RolloutBatch) -> torch.Tensor:
    opening = _paying_opening(batch)
    if opening:
        return _hidden_after_common_opening(backbone, batch, opening)
    return _whole_rows_hidden(backbone, batch)


def _hidden_after_shared_prompts(
    backbone, batch: RolloutBatch, first_row: torch.Tensor, group_of_row: torch.Tensor
) -> torch.Tensor:
    """Each distinct prompt (row `first_row[g]`) once, then every row's response after it,
    the responses in length buckets that all read the one prompt cache."""
    width = batch.prompt_width
    first_row, group_of_row = first_row.to(batch.ids.device), group_of_row.to(batch.ids.device)
    prompt_mask = batch.mask[first_row, :width]
    cache, cache_kwargs = new_cache(backbone)
    last_prompt_state = backbone(
        input_ids=batch.ids[first_row, :width],
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        **cache_kwargs,
    ).last_hidden_state[:, -1:]  # [G, 1, H]: emits each row's first response token
    answer_lengths = batch.response_mask.sum(dim=1)
    buckets = length_buckets(
        answer_lengths, torch.zeros_like(answer_lengths), bucket_limit(backbone)
    )
    parts = []
    for rows in buckets:
        states = last_prompt_state[group_of_row[rows]]
        length = int(answer_lengths[rows].max())
        if length > 1:  # the responses, but for their last token
            _, kwargs = cache_rows(cache, backbone, group_of_row[rows])
            mask = batch.mask[rows, : width + length - 1]
            responses = backbone(
                input_ids=batch.ids[rows, width : width + length - 1],
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask)[:, width:],
                **kwargs,
            ).last_hidden_state
            states = torch.cat([states, responses], dim=1)
        parts.append(states)
    return _unbucket(parts, buckets, batch.response_mask.shape[1])


def _packed_shared_prompts_hidden(
    backbone, batch: RolloutBatch, group_of_row: torch.Tensor
) -> torch.Tensor:
    """The rows packed (`ops.pack_groups`): each distinct prompt once, then every response
    after it, in one row without padding. Each row runs as prompt + response but its last
    token (whose state emits nothing), and the state that emits response token t is that
    row's position p − 1 + t, as in a pass of its own."""
    width, (rows, length) = batch.prompt_width, batch.response_mask.shape
    prompt_lengths = batch.mask[:, :width].sum(dim=1).tolist()
    response_lengths = batch.response_mask.sum(dim=1).tolist()
    members = [torch.nonzero(group_of_row == g).flatten().tolist() for g in group_of_row.unique()]
    order = [r for rows_of_prompt in members for r in rows_of_prompt]
    cut = [
        batch.ids[r, width - prompt_lengths[r] : width + max(response_lengths[r] - 1, 0)].tolist()
        for r in range(rows)
    ]
    packed = pack_groups([[cut[r] for r in rows_of_prompt] for rows_of_prompt in members])
    hidden = packed_hidden_states(backbone, packed)
    source, target = [], []
    for k, r in enumerate(order):
        p, n = prompt_lengths[r], response_lengths[r]
        source.append(packed.token_index(k, p - 1, p - 1 + n))
        target.append(r * length + torch.arange(n))
    states = hidden.new_zeros(rows * length, hidden.shape[-1])
    source_index, target_index = torch.cat(source), torch.cat(target)
    states = states.index_copy(
        0, target_index.to(hidden.device), hidden[source_index.to(hidden.device)]
    )
    return states.view(rows, length, -1)


def common_prompt_opening(batch: RolloutBatch) -> int:
    """How many tokens every row's (left-padded) prompt opens with, leaving each prompt at
    least its last token."""
    width = batch.prompt_width
    lengths = batch.mask[:, :width].sum(dim=1)
    most = int(lengths.min()) - 1
    if most < 1:
        return 0
    columns = (width - lengths)[:, None] + torch.arange(most, device=lengths.device)
    heads = batch.ids.gather(1, columns)  # [B, most]: the first tokens of each prompt
    alike = (heads == heads[:1]).all(dim=0)
    return most if bool(alike.all()) else int(alike.int().argmin())


def _hidden_after_common_opening(backbone, batch: RolloutBatch, opening: int) -> torch.Tensor:
    """The prompts' common opening once, then each row without it: [pad | rest of prompt |
    response], its positions counted on from the opening's."""
    rows, width, device = batch.ids.shape[0], batch.prompt_width, batch.ids.device
    starts = width - batch.mask[:, :width].sum(dim=1)  # where each prompt begins
    columns = torch.arange(batch.ids.shape[1], device=device)
    keep = (columns < starts[:, None]) | (columns >= starts[:, None] + opening)
    ids, mask = batch.ids[keep].view(rows, -1), batch.mask[keep].view(rows, -1)
    head = batch.ids[:1, int(starts[0]) : int(starts[0]) + opening]
    cache, cache_kwargs = new_cache(backbone)
    backbone(
        input_ids=head,
        attention_mask=torch.ones_like(head),
        position_ids=torch.arange(opening, device=device)[None],
        **cache_kwargs,
    )
    cache.batch_select_indices(torch.zeros(rows, dtype=torch.long, device=device))
    full_mask = torch.cat([torch.ones(rows, opening, dtype=mask.dtype, device=device), mask], 1)
    hidden = backbone(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=position_ids_from_mask(full_mask)[:, opening:],
        **cache_kwargs,
    ).last_hidden_state
    return hidden[:, width - opening - 1 : -1]


def output_logits(inner, hidden: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits from final hidden states, with the transforms some
    architectures apply inside `forward` after the LM head (and so also when sampling):
    Gemma 2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling."""
    logits = inner.get_output_embeddings()(hidden)
    config = inner.config
    if getattr(config, "final_logit_softcapping", None):
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logit_scale", None) and hasattr(inner, "logit_scale"):
        logits = logits * inner.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    return logits


def token_logprobs(
    model, hidden: torch.Tensor, batch: RolloutBatch, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(response token) [B, R] (and entropy [B, R]) from response hidden states.

    The LM head and the fp32 log-softmax over the vocabulary, the costliest part of the pass
    after the backbone, run on real response tokens only: a batch's responses are padded to
    its longest, and a third or more of [B, R] is padding in a typical rollout. Padding
    positions hold 0.
    """
    real = batch.response_mask.bool()
    logits = output_logits(hf_model(model), hidden[real])  # [N, V]: real tokens only
    labels = batch.ids[:, batch.prompt_width :][real]
    if with_entropy:
        logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels, temperature)
        return _unpack(logprobs, real), _unpack(entropy, real)
    return _unpack(logprobs_from_logits(logits, labels, temperature), real), None


def _unpack(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[N] values of the real positions back to [B, R], 0 elsewhere (gradients flow)."""
    return values.new_zeros(real.shape).masked_scatter(real, values)


def sequence_logprobs_of(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """[B, R] token log-probs of the responses under `model` (a policy or the reference), on
    the model's device."""
    batch = batch.to(model_device(model))
    return token_logprobs(model, response_hidden(model, batch), batch, temperature, False)[0]
