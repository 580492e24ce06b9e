"""The online RL algorithms as rows of one table: what each changes in the shared PPO loop.

Every algorithm samples, scores and folds the KL penalty into the reward the same way; they
differ only in these columns:

    algo       advantage                            critic  epochs, clip   KL enters as
    ppo        GAE on the critic's values (λ)       yes     ppo_epochs     reward (k1)
    a2c        discounted return − V                yes     1, no clip     reward (k1)
    rloo       R − mean of the prompt's other k−1   no      ppo_epochs     reward (k1)
    grpo       (R − group mean) / group std         no      ppo_epochs     loss term (k3)
    reinforce  R − moving-average baseline          no      1, no clip     reward (k1)

Loss terms follow from the row: the policy-gradient loss (clipped where the row clips), a
value loss where there is a critic (clipped for PPO only), a KL term where the KL enters as a
loss, and the entropy bonus where `ent_coef` > 0. R is a response's summed per-token reward
(its score minus β·KL). Token-level estimators (critic rows) return per-token advantages and
returns; sequence-level ones give every token of a response its one advantage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tether.core.advantages import (
    MovingAverageBaseline,
    a2c_advantages,
    gae,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)
from tether.core.ops import masked_sum, masked_whiten


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read. Tensors are [B, R] over response tokens, rows
    laid out group after group (k = group_size consecutive samples of one prompt)."""

    rewards: torch.Tensor  # per-token reward: −β·KL_t, plus the score on the last token
    values: torch.Tensor  # the critic's V(s_t); zeros without a critic
    mask: torch.Tensor  # 1 on response tokens
    group_size: int  # k samples per prompt
    gamma: float
    lam: float
    whiten_rewards: bool  # critic rows: rescale rewards by their std (mean kept)
    whiten_advantages: bool  # critic rows: whiten advantages over the batch
    scale_by_std: bool  # GRPO: divide by the group's std (off: Dr. GRPO)
    baseline: MovingAverageBaseline  # REINFORCE's running baseline, updated in place


# An estimator returns (advantages [B, R], returns [B, R]); returns are 0 without a critic.
AdvantageFn = Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]


def _shaped_rewards(x: AdvantageInputs) -> torch.Tensor:
    return masked_whiten(x.rewards, x.mask, shift_mean=False) if x.whiten_rewards else x.rewards


def _whitened(advantages: torch.Tensor, x: AdvantageInputs) -> torch.Tensor:
    return masked_whiten(advantages, x.mask) if x.whiten_advantages else advantages


def gae_token_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: GAE(γ, λ) on the critic's values; returns = advantages + values."""
    advantages, returns = gae(_shaped_rewards(x), x.values, x.mask, x.gamma, x.lam)
    return _whitened(advantages, x), returns


def a2c_token_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A2C: the discounted return (GAE with λ = 1) minus V."""
    _, returns = gae(_shaped_rewards(x), x.values, x.mask, x.gamma, lam=1.0)
    return _whitened(a2c_advantages(returns, x.values, x.mask), x), returns


def _per_token(sequence_advantages: torch.Tensor, x: AdvantageInputs) -> tuple[torch.Tensor, ...]:
    """One advantage per response on each of its tokens; no returns (no critic)."""
    advantages = torch.where(x.mask.bool(), sequence_advantages[:, None], 0.0)
    return advantages, torch.zeros_like(x.values)


def rloo_token_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each response's return against the mean of its prompt's other k − 1."""
    return _per_token(rloo_advantages(masked_sum(x.rewards, x.mask, dim=1), x.group_size), x)


def grpo_token_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each response's return standardised within its prompt's group."""
    returns = masked_sum(x.rewards, x.mask, dim=1)
    return _per_token(grpo_advantages(returns, x.group_size, scale_by_std=x.scale_by_std), x)


def reinforce_token_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE: each response's return against a moving average of earlier batches'. The
    first batch, with no history, is its own baseline; the baseline moves after use, so a
    batch is never judged against itself."""
    returns = masked_sum(x.rewards, x.mask, dim=1)
    if not x.baseline.initialized:
        x.baseline.update(returns)
    advantages = reinforce_advantages(returns, x.baseline.value)
    x.baseline.update(returns)
    return _per_token(advantages, x)


@dataclass(frozen=True)
class Algorithm:
    """One row of the table in the module docstring."""

    advantages: AdvantageFn
    critic: bool  # a value function trained with the policy: a value loss term
    clipped: bool  # ppo_epochs passes with a clipped ratio; else one unclipped pass
    value_clip: bool  # the value loss clipped around the rollout's values
    grouped: bool  # compares the k answers to one prompt: needs samples_per_prompt >= 2
    kl_placement: str  # where the KL enters by default: "reward" or "loss"


ALGORITHMS: dict[str, Algorithm] = {
    "ppo": Algorithm(gae_token_advantages, True, True, True, False, "reward"),
    "a2c": Algorithm(a2c_token_advantages, True, False, False, False, "reward"),
    "rloo": Algorithm(rloo_token_advantages, False, True, False, True, "reward"),
    "grpo": Algorithm(grpo_token_advantages, False, True, False, True, "loss"),
    "reinforce": Algorithm(reinforce_token_advantages, False, False, False, False, "reward"),
}
