"""`critic.fit: least_squares`: the value head refit in closed form after every update.

The rollout's value pass records the head's inputs (the backbone's hidden states at each
response token); after the update, the head becomes the ridge solution over those features
and the returns of this rollout and, fading by `critic.fit_decay`, the earlier ones
(tether.core.regression). The backbone still learns from the value loss as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tether.core.regression import normal_equations, ridge_solution, with_bias
from tether.runs import distributed


@contextlib.contextmanager
def recorded_inputs(module: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """The first input of every call of `module` inside the block, detached (none when
    `module` is None)."""
    seen: list[torch.Tensor] = []
    if module is None:
        yield seen
        return
    handle = module.register_forward_hook(lambda _, args, __: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@dataclass
class LeastSquaresValueHead:
    """The decayed normal equations of the value head's fit, carried across iterations (and
    saved in checkpoints: a resumed run refits exactly as the uninterrupted one)."""

    decay: float
    ridge: float
    gram: torch.Tensor | None = None  # [d+1, d+1] float64
    cross: torch.Tensor | None = None  # [d+1] float64
    chosen: float = 1.0  # the ridge picked where `ridge` is 0 (auto)

    @torch.no_grad()
    def refit(
        self, head: nn.Linear, features: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, float]:
        """Fold this rollout's (features [B, R, d], returns [B, R]) at `mask` into the sums,
        over every rank, and set the head to their solution. Returns the fit's R² on this
        rollout (how much a linear head on these features can explain)."""
        on = mask.bool()
        x, y = features[on].double(), returns[on].double()
        gram, cross = (distributed.all_sum(t) for t in normal_equations(x, y))
        metrics = {}
        if self.gram is not None:
            if not self.ridge:  # the ridge that best predicts this rollout from the earlier ones
                earlier = (self.gram.to(gram), self.cross.to(cross))
                self.chosen = best_ridge(*earlier, x, y, bias=head.bias is not None)
            gram = gram + self.decay * self.gram.to(gram)
            cross = cross + self.decay * self.cross.to(cross)
        self.gram, self.cross = gram, cross
        w = ridge_solution(gram, cross, self.ridge or self.chosen, bias=head.bias is not None)
        metrics["value/fit_ridge"] = self.ridge or self.chosen
        head.weight.copy_(w[: x.shape[1]].reshape(head.weight.shape).to(head.weight))
        if head.bias is not None:
            head.bias.copy_(w[-1:].to(head.bias))
        else:  # a reward model's score head has none: the fit has none either
            w = torch.cat([w, w.new_zeros(1)])
        fitted = with_bias(x) @ w
        sums = torch.stack([((y - fitted) ** 2).sum(), y.sum(), (y**2).sum(), y.new_tensor(len(y))])
        residual, total, square, n = distributed.all_sum(sums).tolist()
        variance = square - total**2 / max(n, 1.0)  # n·Var(y) over the job's tokens
        metrics["value/fit_r2"] = 1.0 - residual / variance if variance > 0 else 0.0
        return metrics

    def state_dict(self) -> dict:
        return {"gram": self.gram, "cross": self.cross, "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        self.gram, self.cross, self.chosen = state["gram"], state["cross"], state["chosen"]


RIDGES = (1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def best_ridge(
    gram: torch.Tensor, cross: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bias: bool = True
) -> float:
    """The ridge of RIDGES whose solution on (gram, cross) predicts (x, y) best: validation
    on the next rollout, which the head is about to be asked about. The squared errors are
    summed over every rank, so every rank picks the same."""
    inputs = with_bias(x) if bias else x
    errors = torch.stack(
        [((inputs @ ridge_solution(gram, cross, r, bias) - y) ** 2).sum() for r in RIDGES]
    )
    return RIDGES[int(distributed.all_sum(errors).argmin())]
