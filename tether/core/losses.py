"""Losses: SFT NLL, reward-model ranking, PPO policy and value, the DPO family.

Per-token losses are reduced with `masked_mean` (the mean over all unmasked tokens of the
batch). Losses return `(loss, metrics)` with metrics a dict of detached scalar tensors, except
`dpo_loss`, which returns per-pair losses so the caller chooses the reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tether.core.ops import logprobs_from_logits, masked_mean, masked_sum

Metrics = dict[str, torch.Tensor]


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level NLL: −Σ log p(label) / N. logits [B, T, V], labels [B, T].

    HF convention: labels[:, t] is the target of logits[:, t−1]; the shift happens here.
    N is the number of label tokens of this batch, or `num_tokens` when given: pass the token
    count of the whole optimizer step so that micro-batch losses add up to the full-batch
    loss (gradient accumulation 8 × 1 then equals one batch of 8, however tokens fall).
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    token_logprobs = logprobs_from_logits(logits, torch.where(mask, labels, 0))
    count = mask.sum()
    denom = count.clamp(min=1) if num_tokens is None else num_tokens
    loss = -masked_sum(token_logprobs, mask) / denom
    return loss, {"num_tokens": count.detach().float()}


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if weights is None else (x * weights).sum() / weights.sum()


def pairwise_ranking_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry: mean of −log σ(r_w − r_l − m) = softplus(−(r_w − r_l − m)). Shapes [P].

    Only the difference of scores enters, so the scores' offset is free (see
    `score_centering_penalty`). softplus avoids log(σ(x)) underflowing to −inf for large −x.
    `weights` (e.g. from `listwise_to_pairs`) give a weighted mean. Metrics: accuracy (ties
    count ½) and the mean margin r_w − r_l, weighted alike.
    """
    diff = chosen - rejected
    z = diff if margin is None else diff - margin
    loss = _weighted_mean(F.softplus(-z), weights)
    with torch.no_grad():
        correct = (diff > 0).float() + 0.5 * (diff == 0).float()
        metrics = {
            "accuracy": _weighted_mean(correct, weights),
            "margin": _weighted_mean(diff.float(), weights),
        }
    return loss, metrics


def listwise_to_pairs(
    ranking: list[int], adjacent_only: bool = False
) -> tuple[list[tuple[int, int]], list[float]]:
    """Ranking of K response indices (best first) -> (winner, loser) pairs and weights.

    All K(K−1)/2 ordered pairs, or the K−1 adjacent ones. Each pair weighs 1/len(pairs) so a
    prompt's pairs sum to 1: a prompt with many responses does not dominate (InstructGPT
    batched all pairs of a prompt as one element for the same reason). K < 2 gives no pairs.
    """
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking has repeated indices: {ranking}")
    k = len(ranking)
    if adjacent_only:
        pairs = [(ranking[i], ranking[i + 1]) for i in range(k - 1)]
    else:
        pairs = [(ranking[i], ranking[j]) for i in range(k) for j in range(i + 1, k)]
    return pairs, [1.0 / len(pairs) for _ in pairs]


def plackett_luce_loss(
    scores: torch.Tensor, ranking_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Plackett-Luce NLL of a full ranking. scores [N, K] ordered best first; mask [N, K].

        loss = mean_n −Σ_{i<K} [s_i − logsumexp(s_i, …, s_K)]

    i.e. the best item is picked from all, the second from the rest, and so on. The last term
    is always 0 and is left out. Masked entries (lists shorter than K) take no part in any
    logsumexp or sum; a list with < 2 entries contributes 0. For K = 2 this is Bradley-Terry.
    Metric: top1_accuracy, the fraction of lists whose best item has the highest score.
    """
    mask = torch.ones_like(scores, dtype=torch.bool) if ranking_mask is None else ranking_mask
    mask = mask.bool()
    # A finite sentinel, not −inf: exp(sentinel − s) is 0 in the sums, and the logcumsumexp
    # backward never meets (−inf) − (−inf) = NaN.
    masked = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    tail_lse = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)  # logsumexp(s_i..s_K)
    has_later = mask.flip(-1).long().cumsum(-1).flip(-1) > 1  # some valid item after i
    terms = torch.where(mask & has_later, masked - tail_lse, torch.zeros_like(masked))
    loss = -terms.sum(-1).mean()
    with torch.no_grad():
        top1 = (masked.argmax(-1) == mask.long().argmax(-1)).float().mean()
    return loss, {"top1_accuracy": top1}


def score_centering_penalty(
    chosen: torch.Tensor, rejected: torch.Tensor, coef: float
) -> torch.Tensor:
    """coef · mean((r_w + r_l)²): pins the BT scores' free offset near 0 (a plain tensor)."""
    return coef * ((chosen + rejected) ** 2).mean()


def list_centering_penalty(scores: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """coef · mean_n (2 · mean_k s_nk)² over each list's valid scores [N, K] (a plain tensor).

    For K = 2 it is `score_centering_penalty`: (2 · (r_w + r_l)/2)² = (r_w + r_l)².
    """
    mask = mask.to(scores.dtype)
    list_means = (scores * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return coef * ((2.0 * list_means) ** 2).mean()


def score_l2_penalty(scores: torch.Tensor, coef: float) -> torch.Tensor:
    """coef · mean(s²): keeps scores small, which also bounds their offset (a plain tensor)."""
    return coef * (scores**2).mean()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), all inputs [B, T].

        ρ = exp(log π − log π_old);  loss = masked_mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))

    The max takes the pessimistic branch: once ρ has moved past 1±ε in the direction A
    rewards, the gradient is 0. Stats: clipfrac (tokens where the clipped branch is strictly
    larger), approx_kl = masked mean of k3 = (ρ − 1) − log ρ (≥ 0), ratio_mean.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss, all inputs [B, T]:

        V_clip = V_old + clip(V − V_old, −ε, ε);  loss = ½ masked_mean(max((V−R)², (V_clip−R)²))

    As with the policy, the max is pessimistic: the critic gains nothing by moving more than ε
    from the rollout's values. clip_eps=None gives the plain ½ (V − R)². Stats: clipfrac.
    """
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        clipped = unclipped
    else:
        old_values = old_values.detach()
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def _dpo_sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # −(1−ε)·log σ(βh) − ε·log σ(−βh); eps > 0 is conservative DPO (labels flipped w.p. ε).
    return (1.0 - eps) * F.softplus(-beta * h) + eps * F.softplus(beta * h)


def _dpo_ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # (h − 1/(2β))²: regresses the log-ratio gap to a finite target instead of pushing to ∞.
    return (h - 1.0 / (2.0 * beta)) ** 2


def _dpo_hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # max(0, 1 − βh) (SLiC): no gradient once the gap clears the margin.
    return torch.relu(1.0 - beta * h)


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _dpo_sigmoid,
    "ipo": _dpo_ipo,
    "hinge": _dpo_hinge,
}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO family on sequence log-probs [B] -> (per-pair losses [B], chosen_rewards [B],
    rejected_rewards [B]).

    h = (log π_c − log ref_c) − (log π_r − log ref_r). The implicit rewards β·(log π − log ref)
    are detached, for logging. At π = ref the sigmoid loss is exactly ln 2. label_smoothing
    applies to "sigmoid" only; other types reject a non-zero value rather than ignore it.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {sorted(DPO_LOSSES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is only defined for 'sigmoid', not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratio - rejected_logratio
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
