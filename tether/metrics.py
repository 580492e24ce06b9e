"""Evaluation of a reward model on preference pairs: pure functions over score tensors."""

from __future__ import annotations

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
    ece = torch.zeros((), dtype=torch.float64)
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
