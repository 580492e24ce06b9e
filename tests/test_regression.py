"""The least-squares value head: the normal equations and their ridge solution on
hand-worked values, and the refit recovering a linear target from recorded features."""

import torch
from torch import nn

from tether.core.regression import normal_equations, ridge_solution
from tether.rollout.value_fit import LeastSquaresValueHead, recorded_inputs


def test_normal_equations_fade_by_the_decay():
    gram, cross = normal_equations(torch.tensor([[1.0]]), torch.tensor([1.0]))
    torch.testing.assert_close(gram, torch.ones(2, 2, dtype=torch.float64))  # [1,1]ᵀ[1,1]
    torch.testing.assert_close(cross, torch.ones(2, dtype=torch.float64))
    fit = LeastSquaresValueHead(decay=0.5, ridge=1e-6)
    head = nn.Linear(1, 1)
    fit.refit(head, torch.tensor([[[1.0]]]), torch.tensor([[1.0]]), torch.ones(1, 1))
    fit.refit(head, torch.tensor([[[2.0]]]), torch.tensor([[3.0]]), torch.ones(1, 1))
    # 0.5·[1,1;1,1] + [4,2;2,1], and 0.5·[1,1] + [6,3]
    torch.testing.assert_close(
        fit.gram, torch.tensor([[4.5, 2.5], [2.5, 1.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(fit.cross, torch.tensor([6.5, 3.5], dtype=torch.float64))


def test_ridge_shrinks_the_weights_and_not_the_bias():
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([2.0, 4.0, 6.0])
    gram, cross = normal_equations(x, y)  # [14, 6; 6, 3], [28, 12]
    exact = ridge_solution(gram, cross, 1e-12)
    torch.testing.assert_close(exact, torch.tensor([2.0, 0.0], dtype=torch.float64))
    # λ·tr/d = 1/14 · 14 = 1 on the slope only: [15, 6; 6, 3]⁻¹ [28, 12] = [4/3, 4/3]
    shrunk = ridge_solution(gram, cross, 1 / 14)
    torch.testing.assert_close(shrunk, torch.tensor([4 / 3, 4 / 3], dtype=torch.float64))


def test_refit_sets_the_head_to_the_linear_target_from_its_recorded_inputs():
    torch.manual_seed(0)
    head = nn.Linear(8, 1)
    true_w, true_b = torch.randn(8), 0.7
    features = torch.randn(4, 6, 8)
    returns = features @ true_w + true_b
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    returns[0, 3:] = 1e6  # off the mask: must not count
    with recorded_inputs(head) as seen:
        head(features)
    fit = LeastSquaresValueHead(decay=0.5, ridge=1e-9)
    r2 = fit.refit(head, seen[0], returns, mask)["value/fit_r2"]
    assert r2 > 0.999999
    torch.testing.assert_close(head.weight.detach()[0], true_w, atol=1e-4, rtol=0)
    torch.testing.assert_close(head.bias.detach(), torch.tensor([true_b]), atol=1e-4, rtol=0)
    state = fit.state_dict()
    again = LeastSquaresValueHead(decay=0.5, ridge=1e-9)
    again.load_state_dict(state)
    torch.testing.assert_close(again.gram, fit.gram)


def test_a_head_without_bias_is_fit_through_the_origin():
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([3.0, 5.0])
    gram, cross = normal_equations(x, y)
    # min Σ(y − w·x)²: w = Σxy / Σx² = 13 / 5
    through_origin = ridge_solution(gram, cross, 1e-12, bias=False)
    torch.testing.assert_close(through_origin, torch.tensor([2.6], dtype=torch.float64))
    head = nn.Linear(1, 1, bias=False)
    LeastSquaresValueHead(0.0, 1e-12).refit(head, x[None], y[None], torch.ones(1, 2))
    assert abs(float(head.weight) - 2.6) < 1e-6
