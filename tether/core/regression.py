"""Least squares for a linear value head: the critic fitted in closed form to the returns.

A value head is one linear layer on the backbone's hidden states. Trained by gradient steps
alongside the policy it barely moves: a few dozen Adam steps on 576 badly scaled features
fitting a target that moves. Its least-squares solution over the recent rollouts costs one
d×d solve instead (rllab's linear feature baseline, here on the LM's own features).

The statistics are sums, so the ranks of a job add theirs and solve the same system, and
older rollouts fade by a decay, because the features move as the policy trains.
"""

from __future__ import annotations

import torch


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, d + 1]: a column of ones, whose weight is the head's bias."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def normal_equations(
    features: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, c) = (X̃ᵀX̃, X̃ᵀy) with X̃ = [X, 1] ([N, d+1]), y [N]: sums over the rows, so the
    ranks' add up, and older ones fade as decay·G_old + G_new.

    In float64: the sums run over thousands of tokens whose features are large (LM hidden
    states have a few dimensions in the hundreds).
    """
    x = with_bias(features.double())
    return x.T @ x, x.T @ targets.double()


def ridge_solution(
    gram: torch.Tensor, cross: torch.Tensor, ridge: float, bias: bool = True
) -> torch.Tensor:
    """w = (G + λ·(tr G_x / d)·J)⁻¹ c, [d + 1] (the last entry is the bias).

    J is the identity on the d feature dimensions and 0 on the bias, which is not shrunk;
    λ is relative to the features' mean square (tr G_x / d), so one value suits any model's
    scale. λ > 0 also keeps G invertible when the tokens are fewer than the dimensions.
    Without `bias` (a head that has none) the bias row and column are dropped: w is [d].
    """
    d = gram.shape[0] - 1
    if not bias:
        gram, cross = gram[:d, :d], cross[:d]
    scale = torch.diagonal(gram)[:d].sum() / d
    shrink = torch.zeros_like(gram)
    shrink.diagonal()[:d] = ridge * scale
    return torch.linalg.solve(gram + shrink, cross)
