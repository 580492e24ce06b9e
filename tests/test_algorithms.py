"""The algorithm table (tether.core.algorithms): each row's estimator on hand-worked values,
and the table agrees with what the config accepts."""

import math
import typing

import pytest
import torch

from tether.config import PPOConfig
from tether.core.advantages import MovingAverageBaseline
from tether.core.algorithms import ALGORITHMS, AdvantageInputs

# Two prompts x two samples; responses of 2, 3, 1 and 2 tokens.
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float)
# Per-token rewards: a KL penalty of −0.1 on every token, the score on the last one.
# Sequence returns R = [1.0 − 0.2, 3.0 − 0.3, −1.0 − 0.1, 2.0 − 0.2] = [0.8, 2.7, −1.1, 1.8].
REWARDS = torch.tensor([[-0.1, 0.9, 0.0], [-0.1, -0.1, 2.9], [-1.1, 0.0, 0.0], [-0.1, 1.9, 0.0]])
RETURNS = torch.tensor([0.8, 2.7, -1.1, 1.8])


def inputs(values=None, baseline=None, **overrides) -> AdvantageInputs:
    settings = {
        "rewards": REWARDS,
        "values": torch.zeros_like(REWARDS) if values is None else values,
        "mask": MASK,
        "group_size": 2,
        "gamma": 1.0,
        "lam": 1.0,
        "whiten_rewards": False,
        "whiten_advantages": False,
        "scale_by_std": True,
        "baseline": baseline or MovingAverageBaseline(0.5),
    }
    return AdvantageInputs(**(settings | overrides))


def on_tokens(per_sequence: list[float]) -> torch.Tensor:
    return torch.tensor(per_sequence)[:, None] * MASK


def test_rloo_row_is_each_return_against_the_other_sample_of_its_prompt():
    advantages, returns = ALGORITHMS["rloo"].advantages(inputs())
    # groups (0.8, 2.7) and (−1.1, 1.8): with k = 2 the baseline is the other sample
    expected = on_tokens([0.8 - 2.7, 2.7 - 0.8, -1.1 - 1.8, 1.8 + 1.1])
    torch.testing.assert_close(advantages, expected)
    assert torch.equal(returns, torch.zeros_like(REWARDS))


def test_grpo_row_standardises_within_each_group():
    advantages, _ = ALGORITHMS["grpo"].advantages(inputs())
    # a group of two: (R − mean) / std with the unbiased std |a − b| / √2 gives ±1/√2
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(advantages, on_tokens([-s, s, -s, s]), atol=1e-5, rtol=0)
    centred, _ = ALGORITHMS["grpo"].advantages(inputs(scale_by_std=False))
    torch.testing.assert_close(centred, on_tokens([-0.95, 0.95, -1.45, 1.45]))


def test_reinforce_row_judges_a_batch_against_earlier_batches_only():
    baseline = MovingAverageBaseline(0.5)
    first, _ = ALGORITHMS["reinforce"].advantages(inputs(baseline=baseline))
    mean = float(RETURNS.mean())  # 1.05: the first batch is its own baseline
    torch.testing.assert_close(first, on_tokens((RETURNS - mean).tolist()))
    second, _ = ALGORITHMS["reinforce"].advantages(inputs(baseline=baseline))
    # the baseline moved after the first batch: 0.5 · 1.05 + 0.5 · 1.05, still 1.05
    torch.testing.assert_close(second, first)
    # a batch whose every return is 1 higher: judged against the old baseline, then it moves
    last_token = torch.zeros_like(MASK)
    last_token[torch.arange(4), MASK.sum(dim=1).long() - 1] = 1.0
    third, _ = ALGORITHMS["reinforce"].advantages(
        inputs(baseline=baseline, rewards=REWARDS + last_token)
    )
    torch.testing.assert_close(third, on_tokens((RETURNS + 1 - mean).tolist()))
    assert baseline.value == pytest.approx(0.5 * mean + 0.5 * (mean + 1))


def test_ppo_row_is_reward_to_go_minus_value_with_gamma_and_lambda_one():
    values = torch.full_like(REWARDS, 0.5) * MASK
    advantages, returns = ALGORITHMS["ppo"].advantages(inputs(values=values))
    # λ = γ = 1: A_t = Σ_{t' ≥ t} r_t' − V_t; returns = A + V = reward to go
    to_go = torch.tensor([[0.8, 0.9, 0.0], [2.7, 2.8, 2.9], [-1.1, 0.0, 0.0], [1.8, 1.9, 0.0]])
    torch.testing.assert_close(returns * MASK, to_go)
    torch.testing.assert_close(advantages * MASK, (to_go - values) * MASK)


def test_a2c_row_ignores_lambda_and_whitens_where_asked():
    values = torch.full_like(REWARDS, 0.5) * MASK
    plain, returns = ALGORITHMS["a2c"].advantages(inputs(values=values, lam=0.0))
    to_go = torch.tensor([[0.8, 0.9, 0.0], [2.7, 2.8, 2.9], [-1.1, 0.0, 0.0], [1.8, 1.9, 0.0]])
    torch.testing.assert_close(returns * MASK, to_go)  # λ = 1 whatever ppo.lam says
    whitened, _ = ALGORITHMS["a2c"].advantages(
        inputs(values=values, lam=0.0, whiten_advantages=True)
    )
    real = MASK.bool()
    assert abs(float(whitened[real].mean())) < 1e-5
    assert float(whitened[real].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert not torch.allclose(plain, whitened)


def test_the_table_covers_exactly_the_algorithms_the_config_accepts():
    accepted = typing.get_args(typing.get_type_hints(PPOConfig)["algo"])
    assert set(accepted) == set(ALGORITHMS)
    assert {name for name, a in ALGORITHMS.items() if a.critic} == {"ppo", "a2c"}
    assert {name for name, a in ALGORITHMS.items() if a.grouped} == {"rloo", "grpo"}
    assert {name for name, a in ALGORITHMS.items() if not a.clipped} == {"reinforce", "a2c"}
    assert [name for name, a in ALGORITHMS.items() if a.kl_placement == "loss"] == ["grpo"]
