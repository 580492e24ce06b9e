from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.core.losses import (
    dpo_loss,
    listwise_to_pairs,
    pairwise_ranking_loss,
    plackett_luce_loss,
    ppo_policy_loss,
    score_centering_penalty,
    score_l2_penalty,
    sft_loss,
    value_loss,
)

E = math.e


# --- SFT ---------------------------------------------------------------------------------


def _sft_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 7)
    labels = torch.randint(0, 7, (4, 6))
    labels[0, 4:] = -100  # right padding
    labels[1, :3] = -100  # masked prompt
    labels[3, 1:] = -100  # only labels[3, 0] is real, and it is shifted away: no tokens
    return logits, labels


def test_sft_loss_matches_shifted_cross_entropy() -> None:
    logits, labels = _sft_batch()
    loss, metrics = sft_loss(logits, labels)
    # HF convention: logits[:, t-1] predicts labels[:, t].
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert metrics["num_tokens"].item() == (labels[:, 1:] != -100).sum().item()


def test_sft_loss_uniform_logits_is_log_vocab() -> None:
    labels = torch.tensor([[5, 1, 2, -100]])
    loss, metrics = sft_loss(torch.zeros(1, 4, 10), labels)
    assert loss.item() == pytest.approx(math.log(10))  # -log(1/10) on each of 2 tokens
    assert metrics["num_tokens"].item() == 2


def test_sft_loss_accumulation_with_num_tokens_equals_full_batch() -> None:
    logits, labels = _sft_batch()
    logits.requires_grad_(True)
    full, _ = sft_loss(logits, labels)
    full.backward()
    full_grad = logits.grad.clone()
    logits.grad = None
    total = int((labels[:, 1:] != -100).sum())
    # Halves have different token counts; each is divided by the step's total count.
    parts = [sft_loss(logits[a:b], labels[a:b], num_tokens=total)[0] for a, b in [(0, 1), (1, 4)]]
    summed = parts[0] + parts[1]
    summed.backward()
    assert torch.allclose(summed, full, atol=1e-6)
    assert torch.allclose(logits.grad, full_grad, atol=1e-6)
    # Without num_tokens, the mean of per-half means is NOT the full-batch loss.
    halves = [sft_loss(logits[a:b], labels[a:b])[0] for a, b in [(0, 1), (1, 4)]]
    assert not torch.allclose((halves[0] + halves[1]) / 2, full, atol=1e-4)


def test_sft_loss_no_label_tokens_is_zero() -> None:
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, metrics = sft_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and metrics["num_tokens"].item() == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sft_gradient_raises_label_logit() -> None:
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    sft_loss(logits, torch.tensor([[-100, 2]]))[0].backward()
    # d(-log p_2)/d logit_2 = p_2 - 1 = -2/3 < 0: descent raises the target's logit.
    assert logits.grad[0, 0, 2].item() == pytest.approx(-2 / 3)
    assert torch.equal(logits.grad[0, 1], torch.zeros(3))  # the last position predicts nothing


# --- Reward model --------------------------------------------------------------------------


def test_pairwise_loss_depends_only_on_difference() -> None:
    # Both pairs differ by 1.7 (the brief's (-0.5, -2.0) differs by 1.5, so -0.3 is used).
    expected = math.log(1 + math.exp(-1.7))
    for c, r in [(3.2, 1.5), (-0.3, -2.0)]:
        loss, metrics = pairwise_ranking_loss(torch.tensor([c]), torch.tensor([r]))
        assert loss.item() == pytest.approx(expected, abs=1e-6)
        assert metrics["accuracy"].item() == 1.0
        assert metrics["margin"].item() == pytest.approx(1.7, abs=1e-6)


def test_pairwise_loss_margin_weights_and_ties() -> None:
    # Margin 1 shrinks the effective difference 1.7 -> 0.7.
    loss, _ = pairwise_ranking_loss(torch.tensor([3.2]), torch.tensor([1.5]), margin=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.7)), abs=1e-6)
    # Diffs 0, -1, 1: a tie counts half -> accuracy (0.5 + 0 + 1) / 3 = 0.5; margin 0.
    chosen, rejected = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, -1.0])
    loss, metrics = pairwise_ranking_loss(chosen, rejected)
    assert metrics["accuracy"].item() == pytest.approx(0.5)
    assert metrics["margin"].item() == pytest.approx(0.0)
    per_pair = [math.log(2), math.log(1 + E), math.log(1 + 1 / E)]
    assert loss.item() == pytest.approx(sum(per_pair) / 3, abs=1e-6)
    # Weights 1, 0, 3: (l0 + 3 l2) / 4; accuracy (0.5 + 3) / 4.
    w = torch.tensor([1.0, 0.0, 3.0])
    loss, metrics = pairwise_ranking_loss(chosen, rejected, weights=w)
    assert loss.item() == pytest.approx((per_pair[0] + 3 * per_pair[2]) / 4, abs=1e-6)
    assert metrics["accuracy"].item() == pytest.approx(3.5 / 4)


def test_pairwise_loss_gradient_and_stability() -> None:
    chosen = torch.tensor([0.0, -1000.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1000.0], requires_grad=True)
    loss, _ = pairwise_ranking_loss(chosen, rejected)
    loss.backward()
    # Pair 1: diff -2000 -> loss 2000 exactly (softplus), not inf. Mean = (ln 2 + 2000) / 2.
    assert loss.item() == pytest.approx((math.log(2) + 2000) / 2)
    # Pair 0: dL/dr_w = -σ(0) / 2 = -0.25: descent raises the chosen score, lowers rejected.
    assert chosen.grad[0].item() == pytest.approx(-0.25)
    assert rejected.grad[0].item() == pytest.approx(0.25)


def test_listwise_to_pairs() -> None:
    pairs, weights = listwise_to_pairs([2, 0, 1])
    assert pairs == [(2, 0), (2, 1), (0, 1)]
    assert weights == pytest.approx([1 / 3] * 3)
    pairs, weights = listwise_to_pairs([3, 1, 0, 2], adjacent_only=True)
    assert pairs == [(3, 1), (1, 0), (0, 2)]
    assert weights == pytest.approx([1 / 3] * 3)
    pairs, weights = listwise_to_pairs([3, 1, 0, 2])
    assert len(pairs) == 6 and sum(weights) == pytest.approx(1.0)
    assert listwise_to_pairs([0]) == ([], [])
    with pytest.raises(ValueError):
        listwise_to_pairs([0, 1, 0])


def test_plackett_luce_k2_equals_bradley_terry() -> None:
    torch.manual_seed(0)
    scores = torch.randn(5, 2) * 3
    pl, _ = plackett_luce_loss(scores)
    bt, _ = pairwise_ranking_loss(scores[:, 0], scores[:, 1])
    assert torch.allclose(pl, bt, atol=1e-6)


def test_plackett_luce_hand_value_and_mask() -> None:
    # Ranking (2, 1, 0): pick 2 from {2,1,0}, then 1 from {1,0}; the last pick is certain.
    hand = -(2 - math.log(E**2 + E + 1)) - (1 - math.log(E + 1))
    loss, metrics = plackett_luce_loss(torch.tensor([[2.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert metrics["top1_accuracy"].item() == 1.0
    # Padding a list to K=4 with a masked (huge) score changes nothing, gradient included.
    scores = torch.tensor([[2.0, 1.0, 0.0, 99.0], [0.5, -0.5, 7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, _ = plackett_luce_loss(scores, mask)
    loss.backward()
    bt = math.log(1 + math.exp(-1.0))  # the 2-item list is Bradley-Terry with diff 1
    assert loss.item() == pytest.approx((hand + bt) / 2, abs=1e-6)
    assert torch.isfinite(scores.grad).all()
    assert scores.grad[0, 3] == 0 and (scores.grad[1, 2:] == 0).all()
    # Gradient sign: descent raises the best item's score, lowers the worst.
    assert scores.grad[0, 0] < 0 and scores.grad[0, 2] > 0


def test_plackett_luce_single_item_list_contributes_zero() -> None:
    scores = torch.tensor([[3.0, 5.0]], requires_grad=True)
    loss, _ = plackett_luce_loss(scores, torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(scores.grad, torch.zeros(1, 2))


def test_score_penalties() -> None:
    # (1 + 1)^2 = 4, (2 - 2)^2 = 0 -> mean 2, times 0.5 = 1.
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -2.0])
    assert score_centering_penalty(c, r, 0.5).item() == pytest.approx(1.0)
    # (1 + 9) / 2 = 5, times 0.1 = 0.5.
    assert score_l2_penalty(torch.tensor([1.0, -3.0]), 0.1).item() == pytest.approx(0.5)


def test_list_centering_penalty_hand_values_and_k2_equals_pairs() -> None:
    from tether.core.losses import list_centering_penalty

    # List 0: mean of (1, 2, 3) = 2 -> (2·2)² = 16; list 1: mean of (−1, 1) = 0 -> 0.
    scores = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert list_centering_penalty(scores, mask, 0.5).item() == pytest.approx(0.5 * 16 / 2)
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([1.0, -2.0])
    pairs = torch.stack([c, r], dim=1)
    assert list_centering_penalty(pairs, torch.ones(2, 2), 0.5).item() == pytest.approx(
        score_centering_penalty(c, r, 0.5).item()
    )


# --- PPO -----------------------------------------------------------------------------------


def _ppo(
    logp: float, old: float, adv: float, eps: float = 0.2
) -> tuple[float, dict[str, torch.Tensor], float]:
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, stats = ppo_policy_loss(
        lp, torch.tensor([[old]]), torch.tensor([[adv]]), torch.ones(1, 1), eps
    )
    loss.backward()
    return loss.item(), stats, lp.grad.item()


def test_ppo_ratio_above_clip_positive_advantage() -> None:
    # ratio is e, clipped ratio 1.2, A = 1: max(-e, -1.2) = -1.2; clipped branch, no gradient.
    loss, stats, grad = _ppo(1.0, 0.0, 1.0)
    assert loss == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == 1.0
    assert grad == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(E)
    assert stats["approx_kl"].item() == pytest.approx(E - 2)  # (e - 1) - 1


def test_ppo_ratio_above_clip_negative_advantage_is_not_clipped() -> None:
    # ratio e, A = -1: max(e, 1.2) = e (pessimistic: the unclipped branch keeps the gradient).
    loss, stats, grad = _ppo(1.0, 0.0, -1.0)
    assert loss == pytest.approx(E)
    assert stats["clipfrac"].item() == 0.0
    assert grad == pytest.approx(E)  # d(-A ratio)/dlogp = ratio > 0: descent lowers logp


def test_ppo_ratio_below_clip() -> None:
    # ratio e^-1 ~ 0.368, clip 0.8. A = 1: max(-0.368, -0.8) = -0.368, unclipped.
    loss, stats, grad = _ppo(-1.0, 0.0, 1.0)
    assert loss == pytest.approx(-1 / E) and stats["clipfrac"].item() == 0.0
    assert grad == pytest.approx(-1 / E)
    # A = -1: max(0.368, 0.8) = 0.8, clipped, no gradient.
    loss, stats, grad = _ppo(-1.0, 0.0, -1.0)
    assert loss == pytest.approx(0.8) and stats["clipfrac"].item() == 1.0 and grad == 0.0


def test_ppo_positive_advantage_pushes_logprob_up() -> None:
    # ratio 1, A = 2: loss -2, dL/dlogp = -A * ratio = -2 < 0, descent raises logp.
    loss, stats, grad = _ppo(-0.7, -0.7, 2.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-2.0)
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0


def test_ppo_zero_advantage() -> None:
    loss, stats, grad = _ppo(1.0, 0.0, 0.0)
    assert loss == 0.0 and grad == 0.0 and stats["clipfrac"].item() == 0.0


def test_ppo_masked_token_mean() -> None:
    # Token 0: ratio e, A = 1 -> -1.2 (clipped). Token 1: ratio 1, A = 2 -> -2. Token 2 masked.
    logp = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.6)  # (-1.2 - 2) / 2
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.0, 0.0]]))  # -A ratio / 2 tokens


def test_ppo_all_masked() -> None:
    logp = torch.randn(2, 3, requires_grad=True)
    loss, stats = ppo_policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(not torch.isnan(v) for v in stats.values())


def test_value_loss_clipped_hand_values() -> None:
    # V = 2, V_old = 1, R = 3, ε = 0.2: (2-3)² = 1; V_clip = 1.2, (1.2-3)² = 3.24.
    # max = 3.24 -> loss 0.5 * 3.24 = 1.62, clipped branch (constant in V): no gradient.
    v = torch.tensor([[2.0]], requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(1.62) and stats["clipfrac"].item() == 1.0
    assert v.grad.item() == 0.0
    # R = 1.5: (2-1.5)² = 0.25 vs (1.2-1.5)² = 0.09 -> 0.25, unclipped; grad = (V - R) = 0.5.
    v = torch.tensor([[2.0]], requires_grad=True)
    loss, stats = value_loss(v, torch.tensor([[1.0]]), torch.tensor([[1.5]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.125) and stats["clipfrac"].item() == 0.0
    assert v.grad.item() == pytest.approx(0.5)


def test_value_loss_unclipped_and_masked() -> None:
    values = torch.tensor([[2.0, 0.0, 9.0]])
    returns = torch.tensor([[3.0, 2.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, torch.zeros(1, 3), returns, mask, None)
    assert loss.item() == pytest.approx(0.5 * (1 + 4) / 2)
    assert stats["clipfrac"].item() == 0.0


# --- DPO -----------------------------------------------------------------------------------


def _dpo_inputs() -> tuple[torch.Tensor, ...]:
    # chosen log-ratio -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5 -> h = 1.
    return torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_at_reference_is_ln2(label_smoothing: float) -> None:
    logps = torch.tensor([-3.0, -10.0, -0.5])
    rejected = torch.tensor([-4.0, -1.0, -7.0])
    losses, cr, rr = dpo_loss(logps, rejected, logps, rejected, 0.1, "sigmoid", label_smoothing)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.equal(cr, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))


def test_dpo_sigmoid_hand_value_gradient_and_rewards() -> None:
    pc, pr, rc, rr = _dpo_inputs()
    pc.requires_grad_(True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.1)))  # -log σ(0.1 * 1)
    assert chosen_r.item() == pytest.approx(0.05) and rejected_r.item() == pytest.approx(-0.05)
    assert not chosen_r.requires_grad
    # dL/dπ_c = -β σ(-βh) < 0: descent raises the chosen log-prob.
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))
    # Conservative DPO, ε = 0.1: 0.9 · softplus(-0.1) + 0.1 · softplus(0.1).
    losses, _, _ = dpo_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-0.1)) + 0.1 * math.log(1 + math.exp(0.1))
    assert losses.item() == pytest.approx(expected)


def test_dpo_ipo_and_hinge_hand_values() -> None:
    # IPO: (h - 1/(2β))² = (1 - 5)² = 16 at β = 0.1; at π = ref, (0 - 5)² = 25.
    assert dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="ipo")[0].item() == pytest.approx(16.0)
    z = torch.zeros(1)
    assert dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")[0].item() == pytest.approx(25.0)
    # Hinge: max(0, 1 - βh) = 0.9 at β = 0.1; 0 at β = 2 (margin cleared).
    assert dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.9)
    assert dpo_loss(*_dpo_inputs(), beta=2.0, loss_type="hinge")[0].item() == 0.0


def test_dpo_rejects_unknown_type_and_bad_smoothing() -> None:
    with pytest.raises(ValueError, match=r"hinge.*ipo.*sigmoid"):
        dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="kto")
    with pytest.raises(ValueError):
        dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        dpo_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.5)


def test_a_frontier_is_read_at_a_kl_between_its_points_and_not_beyond():
    from tether.core.metrics import value_at_kl

    best_of_n = [(0.0, 0.2), (0.5, 0.4), (1.0, 0.5)]  # (KL, gold), e.g. n = 1, 2, 4
    assert value_at_kl(best_of_n, 0.25) == pytest.approx(0.3)
    assert value_at_kl(best_of_n, 0.75) == pytest.approx(0.45)
    assert value_at_kl(best_of_n, 1.0) == pytest.approx(0.5)
    assert value_at_kl(best_of_n, 1.5) is None  # past best-of-n's largest n: no claim
    assert value_at_kl([], 0.1) is None
