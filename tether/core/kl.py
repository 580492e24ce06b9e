"""KL(π ‖ π_ref) estimators and the KL-coefficient controllers.

The estimators (Schulman, "Approximating KL divergence", 2020) are per-token and unbiased or
low-variance for KL(π ‖ π_ref) when tokens are sampled from π. With log r = log π_ref − log π:

    k1 = −log r               unbiased, high variance, can be negative per token
    k2 = ½ (log r)²           biased, low variance, ≥ 0
    k3 = (r − 1) − log r      unbiased, low variance, ≥ 0 (GRPO's KL loss term)

Log the KL with the same estimator and tokens that are trained on, or diagnoses mislead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": lambda log_r: -log_r,
    "k2": lambda log_r: 0.5 * log_r**2,
    # expm1 keeps (r − 1) exact for small log r, so k3 stays ≥ 0 instead of rounding negative.
    "k3": lambda log_r: torch.expm1(log_r) - log_r,
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate [B, T] (any shape) from policy and reference token log-probs.

    Gradients flow through both inputs; detach `ref_logprobs` (it is frozen anyway) and, for a
    reward penalty, the whole result.
    """
    if kind not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {sorted(_ESTIMATORS)}")
    return _ESTIMATORS[kind](ref_logprobs - logprobs)


def best_of_n_kl(n: int) -> float:
    """KL(π_best-of-n ‖ π) = log n − (n−1)/n nats, for continuous-valued rewards.

    The analytic KL of picking the best of n samples (Stiennon et al. 2020, appendix; Beirami
    et al. 2024 show it is an upper bound when rewards tie). 0 for n = 1, ~log n for large n.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def landing_scale(measured: Sequence[tuple[float, float]], budget: float) -> float:
    """The scale α of the policy's update, θ = θ_ref + α·(θ − θ_ref), that brings its KL to
    `budget`, from the (α, KL) pairs measured so far, the last the latest.

    KL(π_θ ‖ π_ref) is second order in θ − θ_ref about the reference (½ Δθᵀ F Δθ, F the
    Fisher information), so near it KL(α) ≈ c·α^p with p = 2. Further out p drifts, so once
    two scales are measured p is read off two of them, (α₁, KL₁) and (α₂, KL₂): the nearest
    measurements on either side of the budget where there are both (regula falsi), else the
    last two (secant), p within [0.5, 4]:

        p = log(KL₁ / KL₂) / log(α₁ / α₂),   α' = α₂ · (budget / KL₂)^(1/p),   at most 1

    Never above 1: scaling the update past the trained policy spends KL without finding
    reward (benchmarks/RESULTS.md). A last KL of 0 or less (k1's mean can be) gives 1.
    """
    if measured[-1][1] <= 0:
        return 1.0
    above = [m for m in measured if m[1] > budget]
    below = [m for m in measured if 0 < m[1] <= budget]
    if above and below:
        first, (alpha, kl) = min(above, key=lambda m: m[1]), max(below, key=lambda m: m[1])
    else:
        first, (alpha, kl) = (measured[-2] if len(measured) > 1 else None), measured[-1]
    power = 2.0
    if first is not None and first[1] > 0 and first[0] != alpha and first[1] != kl:
        power = math.log(first[1] / kl) / math.log(first[0] / alpha)
        power = min(max(power, 0.5), 4.0)
    return min(1.0, alpha * (budget / kl) ** (1.0 / power))


class KLController(Protocol):
    """What a trainer needs from a KL coefficient: read it, update it, save and restore it."""

    @property
    def value(self) -> float: ...

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A constant β; `update` is a no-op so trainers treat both controllers alike."""

    def __init__(self, value: float) -> None:
        self._value = float(value)

    @property
    def value(self) -> float:
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards `target` (Ziegler et al. 2019).

        e = clip(KL / target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    The clip bounds how fast β moves on one noisy batch; n_steps is the number of samples
    (episodes) seen since the last update, so β's speed does not depend on the batch size.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=}, {horizon=}")
        self._value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    @property
    def value(self) -> float:
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self._value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        # Only β is state; target and horizon come from the config of the resumed run.
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._value = float(state["value"])


class KLBudgetController:
    """β for a KL budget: the configured β is a floor, raised while the KL is over budget.

        K̂ = KL_t + lead · (KL_t − KL_{t−1})          (the KL projected `lead` iterations on)
        B_t = budget · min(1, t / ramp)              (t = 1, 2, …; ramp 0: B_t = budget)
        e = clip(K̂ / B_t − 1, −rate, rate);   β ← max(β₀, β · exp(e))   (per iteration)

    A target controller (`AdaptiveKLController`) lowers β while the KL is still under its
    target, which in a short run means the KL overshoots before β climbs back. A budget never
    lowers β below β₀: the run starts with the penalty it was configured with, β grows by
    up to e^rate an iteration once the KL passes the budget, and falls back to β₀ as the KL
    returns under it. The KL answers β an iteration or two late (it is measured on the
    rollout before the update), so a controller reading the KL alone raises β only once the
    KL is already over budget, and lets it fall only once it is under: the KL swings around
    the budget. `lead` acts on where the KL is heading instead (0: on the KL alone). The rate
    is modest because a faster β overshoots and drives the policy back to the reference.
    `ramp` raises the budget over the run's first iterations instead: β then acts while the
    KL is small and rising slowly, not once it has run to the full budget at speed.
    """

    def __init__(
        self,
        init_kl_coef: float,
        budget: float,
        rate: float = 0.3,
        lead: float = 0.0,
        ramp: int = 0,
    ):
        if budget <= 0 or init_kl_coef <= 0:
            raise ValueError(f"budget and initial β must be > 0, got {budget=}, {init_kl_coef=}")
        self._value = self.floor = float(init_kl_coef)
        self.budget, self.rate, self.lead = float(budget), float(rate), float(lead)
        self.ramp = int(ramp)
        self.previous: float | None = None
        self.iteration = 0

    @property
    def value(self) -> float:
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        kl = float(current_kl)
        projected = kl if self.previous is None else kl + self.lead * (kl - self.previous)
        self.previous = kl
        self.iteration += 1
        budget = self.budget * min(1.0, self.iteration / self.ramp) if self.ramp else self.budget
        error = min(max(projected / budget - 1.0, -self.rate), self.rate)
        self._value = max(self.floor, self._value * math.exp(error))

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self._value, "previous": self.previous, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self._value = float(state["value"])
        self.previous = state.get("previous")
        self.iteration = int(state.get("iteration") or 0)
