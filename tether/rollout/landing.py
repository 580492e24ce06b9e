"""Landing a KL budget: the trained policy's update scaled down until its KL is the budget.

A budget run can end well past its budget: a stopped run's last update can move the KL by
more than a nat, and the budget controller steers from noisy 16-answer estimates and answers
an iteration or two late. After the last step the policy's KL is measured on answers it
samples for a fixed set of training prompts; where it is over the budget, the update
θ − θ_ref is scaled by α < 1 (θ_ref + α·(θ − θ_ref), the linear interpolation towards the
initialisation of Ramé et al.'s WARP, 2024) with α from
`tether.core.kl.landing_scale`, measured again, and so on for a few rounds. Each KL is a
mean over sampled answers, with a standard error; a measurement counts as over the budget only
where it passes it by more than its noise (two standard errors, or a tenth of the budget).
The α with the largest KL that is not over is kept in the weights that `final/` saves. A
trained policy that is not over is left as it is.

With LoRA the update is the adapters' B·A, so scaling B scales it exactly; a fully trained
policy is interpolated towards the reference model's weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tether.core.kl import kl_estimate, landing_scale
from tether.core.ops import masked_sum
from tether.hardware import autocast
from tether.models.loading import ModelLoadError
from tether.rollout.actor_critic import ActorCritic
from tether.rollout.experience import OnlineRun, reference_pass, sample_responses
from tether.runs import distributed

# Measurements of the KL, the trained policy's included. Each costs a sampling of the
# landing prompts and two forward passes over them.
LANDING_ROUNDS = 4
# A measured KL within this share of the budget, or within two of its standard errors,
# counts as on it. 128 answers of the demo's policies measure their KL with a standard
# error of about 0.2 nats, so a trained policy is scaled only where it is over its budget by
# more than that noise.
LANDING_TOLERANCE = 0.1
# Rows per forward pass of the measurement.
PASS_ROWS = 16


@dataclass
class Landing:
    """What a landing did: every (α, KL, standard error of the KL) measured, and the α kept."""

    budget: float
    measured: list[tuple[float, float, float]] = field(default_factory=list)
    scale: float = 1.0

    def as_dict(self) -> dict:
        kl_at = {a: k for a, k, _ in self.measured}
        return {
            "budget": self.budget,
            "scale": self.scale,
            "kl_trained": self.measured[0][1] if self.measured else None,
            "kl_landed": kl_at.get(self.scale),
            "measured": [{"scale": a, "kl": k, "kl_se": e} for a, k, e in self.measured],
        }


def check_scalable(ac: ActorCritic, reference: torch.nn.Module | None) -> None:
    """Raise before training where the policy's update cannot be scaled: a fully trained
    policy interpolates towards its reference model, weight by weight, so the two need the
    same architecture."""
    if any(".lora_B." in n for n, _ in ac.policy.named_parameters()):
        return
    ref = {} if reference is None else dict(reference.named_parameters())
    for name, param in ac.policy.named_parameters():
        if param.requires_grad and (name not in ref or ref[name].shape != param.shape):
            raise ModelLoadError(
                "ppo.kl.budget_landing: the reference model has no weight like the policy's "
                f"{name}; landing interpolates between them, so it needs the same "
                "architecture (or set ppo.kl.budget_landing: 0)"
            )


def update_scaler(ac: ActorCritic, reference: torch.nn.Module | None) -> Callable[[float], None]:
    """A function that sets the policy to θ_ref + α·(θ − θ_ref) for the trained θ (α = 1 gives
    the trained policy back): scaling the LoRA B matrices, or, without adapters, every
    trainable weight between its reference value and its trained one."""
    check_scalable(ac, reference)
    lora = [p for n, p in ac.policy.named_parameters() if ".lora_B." in n]
    if lora:
        pairs = [(p, torch.zeros_like(p), p.detach().clone()) for p in lora]
    else:
        ref = dict(reference.named_parameters())
        pairs = [
            (p, ref[n].detach().to(p), p.detach().clone())
            for n, p in ac.policy.named_parameters()
            if p.requires_grad
        ]

    @torch.no_grad()
    def set_scale(alpha: float) -> None:
        for param, start, trained in pairs:
            param.copy_(start + alpha * (trained - start))

    return set_scale


@torch.no_grad()
def measure_kl(
    run: OnlineRun, rows: Sequence[list[int]], seeds: Sequence[int]
) -> tuple[float, float]:
    """The policy's mean sequence KL to π_ref (k1, the unbiased estimator) over one sampled
    answer per prompt row of every rank, and the standard error of that mean."""
    _, batch = sample_responses(run, list(rows), list(seeds))
    temperature, kl_sum, kl_squares = run.cfg.rollout.temperature, 0.0, 0.0
    run.parallel.model.eval()
    try:
        for start in range(0, len(rows), PASS_ROWS):
            sub = batch.rows(torch.arange(start, min(start + PASS_ROWS, len(rows))))
            with autocast(run.bf16):
                logprobs = run.parallel(ActorCritic.forward_responses, sub, temperature)[0]
                ref_logprobs = reference_pass(run, sub)
            kl = kl_estimate(logprobs.float(), ref_logprobs.to(logprobs.device).float(), "k1")
            per_answer = masked_sum(kl, sub.response_mask.to(kl.device), dim=1).double()
            kl_sum += float(per_answer.sum())
            kl_squares += float((per_answer**2).sum())
    finally:
        run.parallel.model.train()
    sums = torch.tensor([kl_sum, kl_squares, float(len(rows))], dtype=torch.float64)
    total, squares, n = distributed.all_sum(sums).tolist()
    mean = total / max(n, 1.0)
    variance = max(squares / max(n, 1.0) - mean**2, 0.0) * n / max(n - 1, 1.0)
    return mean, math.sqrt(variance / max(n, 1.0))


def land_on_budget(
    run: OnlineRun, rows: Sequence[list[int]], seeds: Sequence[int], budget: float
) -> Landing:
    """Scale the trained policy's update down until its KL on `rows` is the budget (see the
    module docstring); the policy keeps the scale chosen."""
    landing = Landing(budget)
    set_scale = update_scaler(run.parallel.model, run.reference)
    alpha, best = 1.0, None
    for _ in range(LANDING_ROUNDS):
        set_scale(alpha)
        kl, error = measure_kl(run, rows, seeds)
        landing.measured.append((alpha, kl, error))
        slack = max(LANDING_TOLERANCE * budget, 2.0 * error)
        within = kl <= budget + slack
        if within and (best is None or kl > best[1]):
            best = (alpha, kl)  # the largest KL within the budget: the most of the update
        if within and (alpha == 1.0 or kl >= budget - slack):
            break  # the trained policy is within its budget, or the scaled one is on it
        alpha = landing_scale([(a, k) for a, k, _ in landing.measured], budget)
    if best is None:  # every measurement over: the smallest update measured
        best = min(landing.measured)[:2]
    landing.scale = best[0]
    set_scale(landing.scale)
    return landing
