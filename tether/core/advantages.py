"""Advantage estimators: GAE (PPO), RLOO, GRPO, REINFORCE with a moving baseline, A2C.

All of them are targets, not things to differentiate through: they run under no_grad and
return detached tensors. Group-based estimators take 1-D rewards laid out group after group:
[p0s0, p0s1, …, p0s(k−1), p1s0, …], k = group_size consecutive samples per prompt.
"""

from __future__ import annotations

import torch

from tether.core.packing import last_token_index


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γλ A_{t+1},   returns_t = A_t + V_t

    rewards, values, mask: [B, T]; returns (advantages, returns), both [B, T], 0 on padding.
    "t+1" is the next unmasked position of the row (V = A = 0 after the last), so right or
    left padding, or gaps, are handled alike, and whatever sits in masked positions of
    `rewards` or `values` cannot change the result.
    """
    keep = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(keep, rewards, zeros)
    values = torch.where(keep, values, zeros)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_adv = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(keep[:, t], adv, 0.0)
        next_value = torch.where(keep[:, t], values[:, t], next_value)
        next_adv = torch.where(keep[:, t], adv, next_adv)
    returns = torch.where(keep, advantages + values, zeros)
    return advantages, returns


@torch.no_grad()
def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards of PPO for LMs (Ziegler et al. 2019): [B], [B, T], [B, T] -> [B, T].

        r_t = −β·KL_t on every response token, plus the sequence score on the last one

    The score is end-of-sequence: the reward model judged the whole response, so it lands on
    the token that finished it. "Last" is the rightmost unmasked position; a row with no
    response token gets nothing. 0 on padding.
    """
    keep = mask.bool()
    rewards = torch.where(keep, -kl_coef * kl, torch.zeros_like(kl))
    last = last_token_index(keep.long())  # [B]
    has_any = keep.any(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += torch.where(has_any, scores.to(rewards.dtype), 0.0)
    return rewards


def _groups(rewards: torch.Tensor, group_size: int, min_size: int) -> torch.Tensor:
    """[B] -> [B / k, k], validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < min_size or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size must be >= {min_size} and divide {rewards.numel()}, got {group_size}"
        )
    return rewards.detach().view(-1, group_size)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): A_i = R_i − mean_{j≠i} R_j.

    rewards [B] (KL already folded in) -> [B]. The baseline excludes the sample itself, so it
    is unbiased; this needs k >= 2.
    """
    g = _groups(rewards, group_size, min_size=2)
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(-1)


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i − mean) / (std + eps) within each group: [B] -> [B].

    std is the unbiased (n − 1) group standard deviation, as in TRL's GRPOTrainer. A group
    whose rewards are all equal carries no signal and gets exactly 0 (not round-off, not NaN);
    group_size=1 is such a group by definition (one sample has no spread), so it is all 0.
    scale_by_std=False gives the mean-centred form (Dr. GRPO), which avoids up-weighting
    near-uniform groups.
    """
    g = _groups(rewards, group_size, min_size=1)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=g.dtype)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(dim=1, keepdim=True, unbiased=True) + eps)
    flat = (g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True)).expand_as(g)
    return torch.where(flat, torch.zeros_like(adv), adv).reshape(-1)


@torch.no_grad()
def reinforce_advantages(rewards: torch.Tensor, baseline: float | torch.Tensor) -> torch.Tensor:
    """A = R − b: [B] -> [B]. Use the baseline from *before* this batch's update."""
    return rewards.detach() - baseline


class MovingAverageBaseline:
    """Exponential moving average of the mean reward: b ← decay·b + (1 − decay)·mean(R).

    The first update sets b to the batch mean, so early advantages are not biased towards
    the reward scale by a baseline starting at 0.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value = 0.0
        self.initialized = False

    def update(self, rewards: torch.Tensor) -> None:
        mean = float(rewards.detach().float().mean())
        if self.initialized:
            self.value = self.decay * self.value + (1.0 - self.decay) * mean
        else:
            self.value, self.initialized = mean, True

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "initialized": float(self.initialized)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.initialized = bool(state["initialized"])


@torch.no_grad()
def a2c_advantages(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A = returns − V on masked tokens, 0 elsewhere: [B, T] -> [B, T]."""
    adv = returns - values
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))
