from __future__ import annotations

import math

import pytest
import torch

from tether.core.advantages import (
    MovingAverageBaseline,
    a2c_advantages,
    gae,
    grpo_advantages,
    reinforce_advantages,
    rloo_advantages,
)


def test_gae_hand_worked_gamma_1_lambda_095() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: δ = 1 + 0 - 0.7 = 0.3;         A = 0.3
    # t=1: δ = 0 + 0.7 - 0.6 = 0.1;       A = 0.1 + 0.95 * 0.3   = 0.385
    # t=0: δ = 0 + 0.6 - 0.5 = 0.1;       A = 0.1 + 0.95 * 0.385 = 0.46575
    assert torch.allclose(adv, torch.tensor([[0.46575, 0.385, 0.3]]), atol=1e-6)
    # returns = A + V
    assert torch.allclose(ret, torch.tensor([[0.96575, 0.985, 1.0]]), atol=1e-6)


def test_gae_lambda_1_is_discounted_return_minus_value() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    # G2 = 2, G1 = 0 + 0.9 * 2 = 1.8, G0 = 1 + 0.9 * 1.8 = 2.62; A = G - V.
    assert torch.allclose(ret, torch.tensor([[2.62, 1.8, 2.0]]), atol=1e-6)
    assert torch.allclose(adv, torch.tensor([[2.12, 1.2, 1.3]]), atol=1e-6)


def test_gae_single_token() -> None:
    # One response token: A = r - V (no bootstrap after the last token).
    adv, ret = gae(torch.tensor([[2.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 1.0, 0.95)
    assert adv.item() == 1.5 and ret.item() == 2.0


def test_gae_right_and_left_padding_match_unpadded() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 0.95)
    pad = torch.zeros(1, 2)
    right_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    adv_r, ret_r = gae(
        torch.cat([rewards, pad], 1), torch.cat([values, pad], 1), right_mask, 1, 0.95
    )
    left_mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    adv_l, ret_l = gae(
        torch.cat([pad, rewards], 1), torch.cat([pad, values], 1), left_mask, 1, 0.95
    )
    assert torch.allclose(adv_r[:, :3], adv) and torch.equal(adv_r[:, 3:], pad)
    assert torch.allclose(ret_r[:, :3], ret) and torch.equal(ret_r[:, 3:], pad)
    assert torch.allclose(adv_l[:, 2:], adv) and torch.equal(adv_l[:, :2], pad)
    assert torch.allclose(ret_l[:, 2:], ret) and torch.equal(ret_l[:, :2], pad)


def test_gae_invariant_to_masked_values_and_rewards() -> None:
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.tensor(
        [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    )
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    noisy_r, noisy_v = rewards.clone(), values.clone()
    off = mask == 0
    noisy_r[off] = torch.randn(int(off.sum())) * 100
    noisy_v[off] = float("nan")  # even NaN in padding must not leak
    adv2, ret2 = gae(noisy_r, noisy_v, mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_fully_masked_row_is_zero() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    adv, ret = gae(torch.ones(2, 3), torch.full((2, 3), 0.3), mask, 1.0, 0.95)
    assert torch.equal(adv[1], torch.zeros(3)) and torch.equal(ret[1], torch.zeros(3))
    assert not torch.isnan(adv).any()


def test_gae_is_detached() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_rloo_hand_values() -> None:
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    # Leave-one-out means: (2+3+4)/3 = 3, (1+3+4)/3 = 8/3, (1+2+4)/3 = 7/3, (1+2+3)/3 = 2.
    expected = torch.tensor([1 - 3, 2 - 8 / 3, 3 - 7 / 3, 4 - 2])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_rloo_groups_are_independent() -> None:
    # Two groups of 2: A = ±(difference) within each, regardless of the other group's scale.
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 10.0, 10.0]), group_size=2)
    assert torch.equal(adv, torch.tensor([1.0, -1.0, 0.0, 0.0]))


@pytest.mark.parametrize("group_size", [1, 3, 0])
def test_rloo_rejects_bad_group_size(group_size: int) -> None:
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(4), group_size)


def test_grpo_hand_values() -> None:
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    # mean 2.5; unbiased std = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    std = math.sqrt(5 / 3)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-6)
    assert torch.allclose(adv, expected, atol=1e-6)
    centred = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4, scale_by_std=False)
    assert torch.equal(centred, torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_grpo_all_equal_group_is_exactly_zero() -> None:
    # In fp32 the mean of seven 0.1s is 0.1 - 7.5e-9: naive (R - mean) / (0 + eps) would give
    # -0.0075, not 0. A flat group must give exact zeros.
    flat = torch.full((7,), 0.1)
    assert (flat - flat.mean() != 0).all()  # the round-off this guards against
    rewards = torch.cat([flat, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])])
    adv = grpo_advantages(rewards, group_size=7)
    assert torch.equal(adv[:7], torch.zeros(7))
    assert not torch.isnan(adv).any() and (adv[7:] != 0).all()
    # Second group [0, 1 x6]: mean 6/7, squared deviations 36/49 + 6 * 1/49 = 42/49,
    # unbiased std sqrt(42/49 / 6) = sqrt(1/7); A_0 = -(6/7) / sqrt(1/7).
    assert adv[7].item() == pytest.approx(-(6 / 7) / math.sqrt(1 / 7), rel=1e-5)


def test_grpo_group_size_one_is_zero_not_nan() -> None:
    adv = grpo_advantages(torch.tensor([1.0, -2.0, 3.0]), group_size=1)
    assert torch.equal(adv, torch.zeros(3))


def test_grpo_rejects_non_dividing_group() -> None:
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), group_size=2)


def test_reinforce_and_moving_baseline() -> None:
    assert torch.equal(
        reinforce_advantages(torch.tensor([1.0, 2.0, 3.0]), 2.0), torch.tensor([-1.0, 0.0, 1.0])
    )
    b = MovingAverageBaseline(decay=0.9)
    assert b.value == 0.0
    b.update(torch.tensor([1.0, 3.0]))  # first update: the batch mean, 2
    assert b.value == 2.0
    b.update(torch.tensor([4.0]))  # 0.9 * 2 + 0.1 * 4 = 2.2
    assert b.value == pytest.approx(2.2)
    resumed = MovingAverageBaseline(decay=0.9)
    resumed.load_state_dict(b.state_dict())
    b.update(torch.tensor([0.0]))
    resumed.update(torch.tensor([0.0]))
    assert resumed.value == b.value == pytest.approx(0.9 * 2.2)
    with pytest.raises(ValueError):
        MovingAverageBaseline(decay=1.0)


def test_a2c_advantages() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, float("nan")]])
    adv = a2c_advantages(returns, values, torch.tensor([[1, 1, 0]]))
    assert torch.equal(adv, torch.tensor([[0.5, 1.5, 0.0]]))


def test_kl_penalized_rewards_hand_values() -> None:
    from tether.core.advantages import kl_penalized_rewards

    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0], [1.0, 1.0, 1.0]])
    # Row 0: 3 response tokens; row 1: 2 (last position is padding); row 2: none at all.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards = kl_penalized_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.1, -0.15 + 2.0],  # −β·KL_t everywhere, the score on the last token
            [-0.2, 0.1 - 1.0, 0.0],  # negative k1 KL is a bonus; padding gets nothing
            [0.0, 0.0, 0.0],  # no response token: no score either
        ]
    )
    assert torch.allclose(rewards, expected)


def test_kl_penalized_rewards_left_padded_score_lands_on_last_real_token() -> None:
    from tether.core.advantages import kl_penalized_rewards

    rewards = kl_penalized_rewards(
        torch.tensor([1.0]), torch.zeros(1, 4), torch.tensor([[0, 1, 1, 0]]), kl_coef=0.1
    )
    assert rewards.tolist() == [[0.0, 0.0, 1.0, 0.0]]
