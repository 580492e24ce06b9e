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
from dataclasses import dataclass
from pathlib import Path

import torch

from tether.config import ModelConfig
from tether.data import Message, as_messages, pad_rows
from tether.models import (
    ModelLoadError,
    apply_lora,
    disable_dropout,
    load_tokenizer,
    resolve_model_source,
    save_pretrained_model,
)
from tether.ops import last_token_index, position_ids_from_mask

NORMALIZATION_KEY = "tether_reward_normalization"


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B] raw head outputs at the last real token of each row.

    The head is applied to B hidden vectors instead of B*T, and padding is found from the
    attention mask, not from pad ids (a pad id that also occurs in text cannot fool it).
    """
    inner = hf_model(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).last_hidden_state
    last = hidden[torch.arange(hidden.shape[0]), last_token_index(attention_mask)]  # [B, H]
    return inner.score(last).squeeze(-1).float()


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
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.lora.enabled:
        model = apply_lora(model, config.lora, task_type="SEQ_CLS")
    return disable_dropout(model)  # RLHF-NOTES: dropout off in every model


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

    @classmethod
    def load(cls, path: str, max_length: int = 512, dtype: str = "float32") -> RewardModel:
        tokenizer = load_tokenizer(path)
        model = load_reward_backbone(ModelConfig(name=path, dtype=dtype), tokenizer, seed=0)
        model.eval()
        norm = getattr(model.config, NORMALIZATION_KEY, None) or {"mean": 0.0, "std": 1.0}
        return cls(model, tokenizer, max_length, float(norm["mean"]), float(norm["std"]))

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[str | list[Message]],
        responses: Sequence[str],
        batch_size: int = 16,
        normalize: bool = True,
    ) -> torch.Tensor:
        """[N] scores, normalised to the reference set when `normalize`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [
            encode_response(self.tokenizer, as_messages(p), r, self.max_length)
            for p, r in zip(prompts, responses, strict=True)
        ]
        out = []
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_rows(rows[start : start + batch_size], self.tokenizer.pad_token_id)
            out.append(sequence_scores(self.model, ids, mask))
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
