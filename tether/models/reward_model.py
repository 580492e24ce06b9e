"""A reward model: an LM backbone plus a scalar head read at the last real token.

Stored as a Hugging Face sequence-classification model (`num_labels=1`), the ecosystem
convention, so `AutoModelForSequenceClassification.from_pretrained(DIR)` loads it and gives the
same raw scores. The Bradley-Terry loss only sees score differences, so the offset (and,
loosely, the scale) of raw scores is arbitrary; after training tether measures the mean and
std of the scores over a reference set of responses and stores them in `config.json` as
`tether_reward_normalization`. `RewardModel.score` applies them, so every later load through
tether scores the same, with mean 0 and std 1 on the reference set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ModelConfig
from tether.core.packing import (
    PackedGroups,
    batches_of_groups,
    last_token_index,
    pack_groups,
    pad_rows,
    position_ids_from_mask,
)
from tether.data import Message, as_messages
from tether.hardware import autocast
from tether.models.attention import SEGMENTS, runs_packed_rows, use_grouped_flash_attention
from tether.models.loading import (
    ModelLoadError,
    apply_lora,
    disable_dropout,
    hf_model,
    load_tokenizer,
    model_device,
    resolve_model_source,
    save_pretrained_model,
    store_frozen_linears,
)
from tether.models.trunk import frozen_depth, only_layers

NORMALIZATION_KEY = "tether_reward_normalization"


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B] raw head outputs at the last real token of each row.

    The head is applied to B hidden vectors instead of B*T, and padding is found from the
    attention mask, not from pad ids (a pad id that also occurs in text cannot fool it).
    """
    inner = hf_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    device = model_device(backbone)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=device)
    last = hidden[rows, last_token_index(attention_mask)]  # [B, H]
    return inner.score(last).squeeze(-1).float()


def grouped_sequence_scores(
    model: torch.nn.Module,
    groups: list[list[list[int]]],
    pad_id: int,
    trunks: TrunkStates | None = None,
    keys: Sequence[int] = (),
) -> torch.Tensor:
    """[Σ rows] raw scores of token rows that come in groups with a common prefix (the K
    answers to one prompt), the same as `sequence_scores` on the rows padded together.

    The rows run packed (`packing.pack_groups`): one row with no padding, each group's prefix
    once. On HH pairs cut to 256 tokens a batch of 8 pairs is ~1,400 real tokens; padded,
    with the prefix run once and the answers bucketed, it is 2,000-3,700, and the backbone's
    matmuls scale with that count. Gradients flow as in an unpacked pass, so training is
    unchanged. Models that cannot take a packed row (`attention.runs_packed_rows`: tether's
    attention, which attends within each group only, in a known family) run them padded.
    With `trunks`, group i is training item `keys[i]`, and its frozen lower layers run once
    over training (`TrunkStates`).
    """
    inner = hf_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    if not runs_packed_rows(inner.config):
        ids, mask = pad_rows([r for g in groups for r in g], pad_id)
        return sequence_scores(model, ids, mask)
    packed = pack_groups(groups)
    if trunks is not None and trunks.depth:
        hidden = trunks.hidden_states(packed, groups, keys)
    else:
        hidden = packed_hidden_states(backbone, packed)
    return inner.score(hidden[packed.last_index.to(hidden.device)]).squeeze(-1).float()


class TrunkStates:
    """The reward model's frozen lower layers' output for each training item, kept across
    epochs (`model.lora.top_layers`).

    Layers beneath the first adapter never change, so an item's states after them are the
    same in every epoch: they run once, in the item's first step, and every later step over
    it runs the top layers alone from them (`tether.models.trunk` does the same for a PPO
    rollout's passes). Over two epochs with adapters on the top half, the lower half's cost
    falls from two forward and two backward passes to one forward. Groups pack side by side
    (`packing.pack_groups`), so a micro-batch's states are its items' states concatenated.
    The states cost Σ tokens × hidden × 4 bytes (~70 MB for the demo's 170 rankings); past
    `keep_bytes` (0 for a single epoch, where nothing is seen twice) an item's states are
    computed for its step and not kept, and backward still stops at the trunk.
    """

    def __init__(self, model: torch.nn.Module, keep_bytes: int):
        inner = hf_model(model)
        self.backbone = getattr(inner, inner.base_model_prefix)
        self.depth = frozen_depth(self.backbone) if runs_packed_rows(inner.config) else 0
        self.keep_bytes = keep_bytes
        self.kept_bytes = 0
        self.states: dict[int, torch.Tensor] = {}

    def hidden_states(
        self, packed: PackedGroups, groups: list[list[list[int]]], keys: Sequence[int]
    ) -> torch.Tensor:
        """[T, H] final hidden states of `packed` (of `groups`, item `keys[i]` being group i)."""
        states = dict(self.states)
        missing = [(key, group) for key, group in zip(keys, groups, strict=True)]
        missing = [(key, group) for key, group in missing if key not in states]
        if missing:
            states |= self._run_trunk(missing)
        device = model_device(self.backbone)
        row = torch.cat([states[key] for key in keys]).to(device)
        with only_layers(self.backbone, slice(self.depth, None), final_norm=True):
            return self.backbone(
                inputs_embeds=row.unsqueeze(0),
                attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
                position_ids=packed.position_ids.to(device),
                use_cache=False,
                **{SEGMENTS: packed.segments},
            ).last_hidden_state[0]

    @torch.no_grad()
    def _run_trunk(self, items: list[tuple[int, list[list[int]]]]) -> dict[int, torch.Tensor]:
        """The trunk's states of `items`, each kept while the budget allows."""
        packed = pack_groups([group for _, group in items])
        with only_layers(self.backbone, slice(0, self.depth), final_norm=False):
            states = packed_hidden_states(self.backbone, packed)
        # group i ends after its last row's last token: its span in the packed row
        last_rows = torch.tensor([len(group) for _, group in items]).cumsum(0) - 1
        ends = (packed.last_index[last_rows] + 1).tolist()
        lengths = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        computed = {}
        for (key, _), part in zip(items, states.split(lengths), strict=True):
            computed[key] = part
            size = part.numel() * part.element_size()
            if self.kept_bytes + size <= self.keep_bytes:
                self.states[key] = part.clone()  # alone, not a view that holds the whole row
                self.kept_bytes += size
        return computed


def packed_hidden_states(backbone: torch.nn.Module, packed: PackedGroups) -> torch.Tensor:
    """[T, H] final hidden states of a packed row (`packing.pack_groups`), for a backbone whose
    config passes `attention.runs_packed_rows`. The segments' masks move with each call."""
    device = model_device(backbone)
    return backbone(
        input_ids=packed.input_ids.to(device),
        # A placeholder 4D mask, which transformers passes on as it is: the segments carry
        # the real masks, and without it transformers would build a causal [T, T] one.
        attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
        position_ids=packed.position_ids.to(device),
        use_cache=False,
        **{SEGMENTS: packed.segments},
    ).last_hidden_state[0]


def load_reward_backbone(config: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """A sequence-classification model from a causal LM (new head) or a saved reward model.

    A new head is drawn from N(0, 1/sqrt(d+1)) (lm-human-preferences), seeded, so two runs
    with one seed start identically. The global RNG is left as it was: loading a reward model
    inside a run (PPO scoring) must not change that run's random stream.
    """
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(config.name)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    from transformers.utils import logging as hf_logging

    fresh_head = not _has_trained_head(source)
    verbosity = hf_logging.get_verbosity()
    if fresh_head:  # its "score.weight MISSING" report is expected: the head is drawn below
        hf_logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=1,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=config.trust_remote_code,
            )
        except OSError as e:
            raise ModelLoadError(f"cannot load a reward backbone from '{config.name}': {e}") from e
        finally:
            hf_logging.set_verbosity(verbosity)
        if fresh_head:
            hidden = model.score.weight.shape[1]
            torch.nn.init.normal_(model.score.weight, std=1.0 / math.sqrt(hidden + 1))
    model.config.pad_token_id = tokenizer.pad_token_id
    use_grouped_flash_attention(model)
    if config.gradient_checkpointing:
        # non-reentrant: the reentrant kind gives no gradient to adapters above inputs that need
        # none (frozen embeddings, the trunk's states)
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if config.lora.enabled:
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    return disable_dropout(model)  # docs/implementation-details.md#dropout-off


def _has_trained_head(source: str) -> bool:
    path = Path(source) / "config.json"
    if not path.is_file():
        return False
    archs = json.loads(path.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def save_reward_model(model, tokenizer, out_dir: Path, mean: float, std: float) -> None:
    hf_model(model).config.update({NORMALIZATION_KEY: {"mean": mean, "std": std}})
    save_pretrained_model(model, tokenizer, out_dir)


@dataclass
class RewardModel:
    """Scores (prompt, response) pairs; what the PPO stage and `tether score` call."""

    model: torch.nn.Module
    tokenizer: object
    max_length: int = 512
    mean: float = 0.0
    std: float = 1.0
    # bf16 autocast over the float32 weights: what a bf16 training run uses for its other
    # forward passes (3.5x the fp32 matmul rate on an AVX512-BF16 CPU). Off by default, so
    # `tether score` gives the raw scores `from_pretrained` gives.
    bf16: bool = False

    @classmethod
    def load(
        cls,
        path: str,
        max_length: int = 512,
        dtype: str = "float32",
        bf16: bool = False,
        device: str | torch.device = "cpu",
    ) -> RewardModel:
        """The reward model saved at `path`, on `device` (a run's own device: a PPO run on a
        GPU scores there)."""
        tokenizer = load_tokenizer(path)
        model = load_reward_backbone(ModelConfig(name=path, dtype=dtype), tokenizer, seed=0)
        model.to(device).eval().requires_grad_(False)
        if bf16:  # it only ever runs under bf16 autocast (`score`)
            store_frozen_linears(model, torch.bfloat16)
        norm = getattr(model.config, NORMALIZATION_KEY, None) or {"mean": 0.0, "std": 1.0}
        mean, std = float(norm["mean"]), float(norm["std"])
        return cls(model, tokenizer, max_length, mean, std, bf16)

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[str | list[Message]],
        responses: Sequence[str],
        batch_size: int = 16,
        normalize: bool = True,
    ) -> torch.Tensor:
        """[N] scores on the CPU, normalised to the reference set when `normalize`. Consecutive
        responses to the same prompt (k samples of a rollout, best-of-n candidates) are
        scored after one pass over their shared prompt; batches hold whole such runs,
        about `batch_size` rows each."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [
            encode_response(self.tokenizer, as_messages(p), r, self.max_length)
            for p, r in zip(prompts, responses, strict=True)
        ]
        groups: list[list[list[int]]] = []
        for i, row in enumerate(rows):
            if i and prompts[i] == prompts[i - 1]:
                groups[-1].append(row)
            else:
                groups.append([row])
        out = []
        device = model_device(self.model)
        # Called on the reward's own thread (rewards.call_with_timeout): autocast and the
        # current GPU are per thread, so both are set here rather than by the caller.
        on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        for batch in batches_of_groups(groups, batch_size):
            with on_device, autocast(self.bf16):
                scores = grouped_sequence_scores(self.model, batch, self.tokenizer.pad_token_id)
            out.append(scores.float().cpu())
        raw = torch.cat(out) if out else torch.zeros(0)
        return (raw - self.mean) / self.std if normalize else raw


def encode_response(tokenizer, prompt: list[Message], response: str, max_length: int) -> list[int]:
    """Token ids of prompt + response, cut from the LEFT to `max_length`.

    The score is read at the end, so the end is what must survive truncation; dropping
    over-long pairs instead (TRL) silently loses the long, often hardest, examples.
    """
    text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": response}], tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]
