"""The trainable parts of PPO as one module: the policy LM plus its critic.

One module means one optimizer, one gradient clip and one checkpoint cover policy and critic
together (A2C-style joint training). The critic is either a linear value head on the policy's
own backbone (one model in memory) or a separate backbone with its own head, usually
initialised from the reward model (docs/implementation-details.md#critic-initialisation).
The reference policy is kept outside: with a LoRA policy it is the same backbone with the
adapters disabled.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tether.config import ModelConfig, PPOConfig
from tether.models.loading import ModelLoadError, hf_model, load_causal_lm, store_frozen_linears
from tether.models.reward_model import NORMALIZATION_KEY, load_reward_backbone
from tether.rollout.passes import RolloutBatch, response_hidden, token_logprobs


class ActorCritic(nn.Module):
    def __init__(
        self,
        policy: nn.Module,
        value_head: nn.Module | None,
        critic: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy  # a causal LM, optionally peft-wrapped
        # hidden -> 1, on the critic's backbone when separate; None for critic-free algorithms
        self.value_head = value_head
        self.critic = critic  # a separate backbone (sequence-classification model) or None

    def forward_responses(
        self, batch: RolloutBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-probs [B, R], values [B, R], entropy [B, R] or None) of the response tokens.

        With a value head on the policy, one backbone pass gives all three; without a critic
        the values are 0.
        """
        hidden = response_hidden(self.policy, batch)
        logprobs, entropy = token_logprobs(self.policy, hidden, batch, temperature, with_entropy)
        if self.value_head is None:
            return logprobs, torch.zeros_like(logprobs), entropy
        if self.critic is not None:
            hidden = response_hidden(self.critic, batch)
        values = self.value_head(hidden).squeeze(-1).float()
        return logprobs, values, entropy

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The LoRA policy with its adapters disabled: π_ref without a second copy."""
        with self.policy.disable_adapter():
            yield self.policy


def init_head_from_reward_model(head: nn.Linear, reward_model_dir: str) -> None:
    """Set a value head to a reward model's normalised score head: V(s_t) starts as the
    reward model's score of the response so far, (w·h − mean) / std, the quantity the value
    must predict at the end. The reward model and the policy share their base model, so the
    head reads hidden states of the same kind (the adapters differ a little)."""
    path = Path(reward_model_dir)
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            name = next(k for k in f.keys() if k.endswith("score.weight"))  # noqa: SIM118
            weight = f.get_tensor(name).float()
            bias_name = name.removesuffix("weight") + "bias"
            bias = f.get_tensor(bias_name).float() if bias_name in f.keys() else None  # noqa: SIM118
    except (OSError, StopIteration) as e:
        raise ModelLoadError(
            f"critic.init: {reward_model_dir} holds no reward model (model.safetensors with a "
            "score head); give a `tether rm` final/ dir"
        ) from e
    if weight.shape != head.weight.shape:
        raise ModelLoadError(
            f"critic.init: {reward_model_dir}'s score head reads {weight.shape[1]} hidden "
            f"units, the policy has {head.weight.shape[1]}: it needs the same base model"
        )
    config = json.loads((path / "config.json").read_text())
    norm = config.get(NORMALIZATION_KEY) or {"mean": 0.0, "std": 1.0}
    mean, std = float(norm["mean"]), float(norm["std"])
    with torch.no_grad():
        head.weight.copy_(weight / std)
        head.bias.fill_(((float(bias) if bias is not None else 0.0) - mean) / std)


def load_actor_critic(
    cfg: PPOConfig, tokenizer, with_critic: bool = True, bf16: bool = False
) -> tuple[ActorCritic, nn.Module | None]:
    """(actor-critic, reference model or None when the LoRA policy serves as its own reference).

    `with_critic=False` (RLOO, GRPO, REINFORCE) builds no value function at all. In a bf16
    run a separate reference keeps its linear layers in bf16 (`store_frozen_linears`).
    A new value head starts at 0 (weight and bias), so the first values are 0 and the first
    value loss is the plain squared return: no random offset for the critic to unlearn. A
    separate critic keeps its backbone's head: a reward model's (raw, unnormalised scores) or,
    from a plain LM, one drawn from N(0, 1/sqrt(d+1)). Dropout is off in every model.
    """
    policy = load_causal_lm(cfg.model, tokenizer, dropout=False)
    hidden_size = hf_model(policy).config.hidden_size
    critic, value_head = None, None
    if with_critic and cfg.critic.kind == "separate":
        critic_cfg = ModelConfig(
            name=cfg.critic.init or cfg.model.name,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            lora=cfg.model.lora,
        )
        critic = load_reward_backbone(critic_cfg, tokenizer, cfg.train.seed)
        value_head = hf_model(critic).score
    elif with_critic:
        value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        if cfg.critic.init:
            init_head_from_reward_model(value_head, cfg.critic.init)
    reference = None
    if not cfg.model.lora.enabled or cfg.reference:
        ref_cfg = ModelConfig(
            name=cfg.reference or cfg.model.name,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        reference = load_causal_lm(ref_cfg, tokenizer, dropout=False)
        reference.eval().requires_grad_(False)
        if bf16:
            store_frozen_linears(reference, torch.bfloat16)
    return ActorCritic(policy, value_head, critic), reference
