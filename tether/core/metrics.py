"""Evaluation of a reward model on preference pairs: pure functions over score tensors."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with r_w > r_l; a tie counts half (a coin flip would pick it)."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()


def expected_calibration_error(
    chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10
) -> float:
    """ECE of p = σ(r_a − r_b) as the probability that a is preferred, in `bins` equal bins.

    Every pair is counted in both orientations, (σ(r_w − r_l), outcome 1) and
    (σ(r_l − r_w), outcome 0), so the bins see both outcomes; otherwise every label would be
    1 and ECE would only measure how confident the model is.
    ECE = Σ_b (n_b / N) · |mean outcome_b − mean p_b|.
    """
    p = torch.cat([torch.sigmoid(chosen - rejected), torch.sigmoid(rejected - chosen)]).double()
    outcome = torch.cat([torch.ones_like(chosen), torch.zeros_like(chosen)]).double()
    which = torch.clamp((p * bins).long(), max=bins - 1)
    ece = torch.zeros((), dtype=torch.float64, device=p.device)
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.double().mean() * (outcome[in_bin].mean() - p[in_bin].mean()).abs()
    return ece.item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Correlation coefficient; 0 when either side is constant (no linear relation to show)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.square().sum() * y.square().sum()).sqrt()
    return 0.0 if denom == 0 else (x * y).sum().div(denom).item()


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean(1[a > b] + ½·1[a = b]): how often a beats b on the same prompt, ties split."""
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def pairwise_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of within-row pairs (i < j) that a and b order the same way. [P, N], [P, N].

    Pairs that b ties are left out (no order to agree with); a tie in a alone counts ½.
    E.g. a = reward-model scores, b = gold scores of N answers to each of P prompts.
    """
    da = a.double()[:, :, None] - a.double()[:, None, :]
    db = b.double()[:, :, None] - b.double()[:, None, :]
    upper = torch.ones_like(da[0], dtype=torch.bool).triu(diagonal=1)
    counted = upper & (db != 0)
    agree = (da.sign() == db.sign()).double() + 0.5 * (da == 0).double()
    total = counted.sum().item()
    return float("nan") if total == 0 else (agree * counted).sum().item() / total


def best_of_n_mean(selector: torch.Tensor, values: torch.Tensor, n: int) -> float:
    """E[value of the best-by-selector of n draws], averaged over prompts. [P, N], [P, N].

    Unbiased from N ≥ n samples per prompt: over all C(N, n) subsets, the sample with the
    i-th lowest selector score (1-based) is the subset's best in C(i−1, n−1) of them, so

        E = Σ_i C(i−1, n−1) / C(N, n) · value_(i)

    which uses every sample instead of one arbitrary n-subset. n = 1 is the plain mean.
    """
    count = selector.shape[1]
    if not 1 <= n <= count:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {count} samples per prompt")
    order = selector.argsort(dim=1, stable=True)
    ranked = values.double().gather(1, order)
    weights = torch.tensor(
        [math.comb(i, n - 1) / math.comb(count, n) for i in range(count)],
        dtype=torch.float64,
        device=ranked.device,
    )
    return (ranked * weights).sum(dim=1).mean().item()


def preference_metrics(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    bins: int = 10,
) -> dict[str, float | int]:
    """Accuracy, margin, log-loss, calibration and length bias of scores on [N] pairs.

    Length bias is shown two ways: the correlation of score with response length over all
    responses, and accuracy split by whether the chosen answer is the longer one. A reward
    model that mostly rewards length has a high `length_corr` and a large gap between
    `accuracy_chosen_longer` and `accuracy_chosen_shorter`.
    """
    chosen_len, rejected_len = chosen_len.to(chosen.device), rejected_len.to(chosen.device)
    diff = chosen - rejected
    longer, shorter = chosen_len > rejected_len, chosen_len < rejected_len
    return {
        "n": int(chosen.numel()),
        "accuracy": pairwise_accuracy(chosen, rejected),
        "margin": diff.mean().item(),
        "log_loss": F.softplus(-diff).mean().item(),  # −log σ(r_w − r_l)
        "ece": expected_calibration_error(chosen, rejected, bins),
        "length_corr": pearson(
            torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]).float()
        ),
        "accuracy_chosen_longer": (
            pairwise_accuracy(chosen[longer], rejected[longer]) if longer.any() else float("nan")
        ),
        "accuracy_chosen_shorter": (
            pairwise_accuracy(chosen[shorter], rejected[shorter]) if shorter.any() else float("nan")
        ),
        "frac_chosen_longer": longer.float().mean().item(),
    }


def value_at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """A frontier's value at `kl`, linear between its (KL, value) points; None outside them.

    For comparing methods at equal KL (Gao et al. 2022): best-of-n gives a point per n at
    the analytic KL log n − (n−1)/n, and a PPO policy one point at its measured KL; the
    best-of-n value at the policy's KL is what PPO must beat to be the better use of KL.
    """
    ordered = sorted(points)
    if not ordered or not ordered[0][0] <= kl <= ordered[-1][0]:
        return None
    for (k0, v0), (k1, v1) in itertools.pairwise(ordered):
        if k0 <= kl <= k1:
            return v0 if k1 == k0 else v0 + (v1 - v0) * (kl - k0) / (k1 - k0)
    return ordered[-1][1]
