from __future__ import annotations

import math

import pytest
import torch

from tether.core.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    landing_scale,
)


def test_estimators_hand_values() -> None:
    # logp = -1, ref = -2: log r = ref - logp = -1, r = e^-1.
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)  # -log r
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)  # (log r)^2 / 2
    # (r - 1) - log r = e^-1 - 1 + 1 = e^-1
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1))


def test_estimators_zero_when_policy_equals_reference() -> None:
    x = torch.randn(3, 4)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(x, x, kind), torch.zeros(3, 4))


def test_k1_can_be_negative_k2_k3_never() -> None:
    torch.manual_seed(0)
    logp = torch.randn(1000) * 5
    ref = torch.randn(1000) * 5
    assert (kl_estimate(logp, ref, "k1") < 0).any()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    # Tiny log-ratios are where (r - 1) - log r could round negative without expm1.
    tiny = torch.tensor([1e-9, -1e-9, 1e-7, -1e-7])
    assert (kl_estimate(torch.zeros(4), tiny, "k3") >= 0).all()


def test_k1_and_k3_unbiased_for_sampled_tokens() -> None:
    # Over samples from p, E[k1] = E[k3] = KL(p || q); here p, q are 3-way categoricals.
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum().item()
    idx = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[idx], q.log()[idx]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=5e-3)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=5e-3)


def test_gradient_of_k3_pushes_policy_towards_reference() -> None:
    logp = torch.tensor([-1.0], requires_grad=True)
    kl_estimate(logp, torch.tensor([-2.0]), "k3").sum().backward()
    # d/dlogp [(e^(ref-logp) - 1) - (ref - logp)] = 1 - r = 1 - e^-1 > 0: descent lowers logp.
    assert logp.grad.item() == pytest.approx(1 - math.exp(-1))


def test_unknown_kind_names_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"k1.*k2.*k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


def test_fixed_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_step() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 12: 12/6 - 1 = 1, clipped to 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512.
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    # KL 0: error -1 clipped to -0.2; beta shrinks by (1 - 0.2 * 256 / 10000).
    ctl.update(0.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512 * (1 - 0.00512), abs=1e-12)
    # KL 6.6: error 0.1 is inside the clip.
    before = ctl.value
    ctl.update(torch.tensor(6.6), n_steps=100)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10_000))


def test_adaptive_controller_at_target_does_not_move() -> None:
    ctl = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    ctl.update(6.0, 512)
    assert ctl.value == 0.15


def test_adaptive_controller_resume_continues_identically() -> None:
    kls = [3.0, 9.0, 20.0, 5.5, 0.1, 7.0]
    whole = AdaptiveKLController(0.15, 6.0, 10_000)
    for kl in kls:
        whole.update(kl, 64)
    first = AdaptiveKLController(0.15, 6.0, 10_000)
    for kl in kls[:3]:
        first.update(kl, 64)
    state = first.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    resumed = AdaptiveKLController(0.15, 6.0, 10_000)
    resumed.load_state_dict(state)
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.value == whole.value


def test_adaptive_controller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10_000)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=6.0, horizon=0)


def test_the_budget_controller_keeps_its_floor_and_tracks_the_budget_from_above():
    from tether.core.kl import KLBudgetController

    ctl = KLBudgetController(0.05, budget=2.0)
    ctl.update(0.5, n_steps=16)  # under budget at the start: β stays at its floor
    assert ctl.value == 0.05
    ctl.update(4.0, n_steps=16)  # twice the budget: up by e^0.3 (the clip)
    assert ctl.value == pytest.approx(0.05 * math.exp(0.3))
    ctl.update(2.2, n_steps=16)  # 10% over: up by e^0.1
    assert ctl.value == pytest.approx(0.05 * math.exp(0.4))
    ctl.update(1.0, n_steps=16)  # half the budget: down by e^0.3, not below the floor
    assert ctl.value == pytest.approx(0.05 * math.exp(0.1))
    ctl.update(0.0, n_steps=16)
    assert ctl.value == 0.05
    restored = KLBudgetController(0.05, budget=2.0)
    restored.load_state_dict({"value": 0.2})
    assert restored.value == 0.2


def test_the_budget_controller_with_a_ramp_raises_the_budget_over_its_first_iterations():
    from tether.core.kl import KLBudgetController

    ctl = KLBudgetController(0.05, budget=2.0, ramp=4)  # budgets 0.5, 1.0, 1.5, 2.0, 2.0, …
    ctl.update(0.55, n_steps=16)  # 10% over the first budget of 0.5: up by e^0.1
    assert ctl.value == pytest.approx(0.05 * math.exp(0.1))
    ctl.update(1.0, n_steps=16)  # on budget: β holds
    assert ctl.value == pytest.approx(0.05 * math.exp(0.1))
    ctl.update(1.2, n_steps=16)  # 20% under 1.5: down by e^0.2, to the floor
    assert ctl.value == 0.05
    ctl.update(2.2, n_steps=16)  # 10% over the full budget
    assert ctl.value == pytest.approx(0.05 * math.exp(0.1))
    restored = KLBudgetController(0.05, budget=2.0, ramp=4)
    restored.load_state_dict(ctl.state_dict())
    restored.update(2.2, n_steps=16)  # resumed past the ramp: the full budget still
    assert restored.value == pytest.approx(0.05 * math.exp(0.2))


def test_the_budget_controller_with_a_lead_acts_on_where_the_kl_is_heading():
    from tether.core.kl import KLBudgetController

    ctl = KLBudgetController(0.05, budget=2.0, lead=2.0)
    ctl.update(0.4, n_steps=16)  # no slope yet: 0.4 under budget, β at its floor
    assert ctl.value == 0.05
    ctl.update(1.2, n_steps=16)  # rising 0.8 an iteration: projected 2.8, up by e^0.3 (clip)
    assert ctl.value == pytest.approx(0.05 * math.exp(0.3))
    ctl.update(2.2, n_steps=16)  # still rising (+1.0): projected 4.2, up by e^0.3 again
    assert ctl.value == pytest.approx(0.05 * math.exp(0.6))
    ctl.update(1.6, n_steps=16)  # over budget a step ago, now falling: projected 0.4
    assert ctl.value == pytest.approx(0.05 * math.exp(0.3))  # down before it is under
    restored = KLBudgetController(0.05, budget=2.0, lead=2.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.previous == 1.6


def test_the_landing_scale_takes_a_secant_step_in_log_log():
    # one measurement, KL 8 at α = 1, budget 2: KL ∝ α² gives α = sqrt(2/8) = 0.5
    assert landing_scale([(1.0, 8.0)], 2.0) == pytest.approx(0.5)
    # then KL 4 at α = 0.5: p = log(8/4) / log(1/0.5) = 1, so α = 0.5 · (2/4)^1 = 0.25
    assert landing_scale([(1.0, 8.0), (0.5, 4.0)], 2.0) == pytest.approx(0.25)
    # once the budget is bracketed, the nearest measurements on either side: (0.5, 4) above
    # and (0.25, 1) below, not the last two: p = log 4 / log 2 = 2, α = 0.25 · (2/1)^(1/2)
    bracketed = [(1.0, 8.0), (0.5, 4.0), (0.25, 1.0), (0.2, 0.5)]
    assert landing_scale(bracketed, 2.0) == pytest.approx(0.25 * math.sqrt(2))
    # a KL that barely moved gives p ≈ 0.02, clamped to 0.5: α = 0.5 · (2/7.9)^2
    assert landing_scale([(1.0, 8.0), (0.5, 7.9)], 2.0) == pytest.approx(0.5 * (2 / 7.9) ** 2)
    # never past the trained policy; a KL of 0 (or a negative k1 mean) gives it back whole
    assert landing_scale([(0.5, 0.125)], 2.0) == 1.0
    assert landing_scale([(0.3, 0.0)], 2.0) == landing_scale([(0.3, -0.1)], 2.0) == 1.0
