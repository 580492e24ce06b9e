"""Masked reductions, whitening, running moments, and log-probabilities from logits.

Every per-token loss in tether is reduced with `masked_mean`: the mean over all unmasked tokens
of the whole batch, sum(x * mask) / sum(mask). A token-mean is then the same whether the batch
is whole or split across ranks (sum the masked sums, divide by the total count).

Masks are 0/1 (bool or float) tensors broadcastable to `x`; 1 marks a token that counts.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all elements if None).

    Masked positions are selected out with `where` rather than multiplied by 0, so a NaN or
    -inf sitting in padding cannot leak into the sum or its gradient.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); 0 (not NaN, gradient 0) where nothing is unmasked."""
    count = mask.to(x.dtype).expand_as(x)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of the unmasked elements of `x` (a scalar).

    Population variance by default, as in lm-human-preferences whitening. With unbiased=True
    the Bessel factor n/(n-1) is applied; a single element gives 0, not a division by zero.
    """
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.to(x.dtype).expand_as(x).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over unmasked elements; 0 on masked positions.

    shift_mean=False adds the mean back: rewards are rescaled but keep their sign and offset
    (the RM score's offset carries information), advantages are fully centred.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over unmasked tokens (a scalar).

    1 means the critic predicts the returns, 0 no better than their mean, < 0 worse than a
    constant. Var(R) = 0 gives 0 rather than a division by zero.
    """
    var_returns = masked_var(returns, mask)
    var_error = masked_var(returns - values, mask)
    if float(var_returns) == 0.0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return 1.0 - var_error / var_returns


class RunningMoments:
    """Mean and (population) std of every value seen so far, updated a batch at a time.

    Batches merge with Chan et al.'s parallel formula: with counts n_a, n_b, means μ_a, μ_b
    and sums of squared deviations M_a, M_b,
        δ = μ_b − μ_a,  n = n_a + n_b,  μ = μ_a + δ·n_b/n,  M = M_a + M_b + δ²·n_a·n_b/n
    so the result equals the moments of all values concatenated, in any batching.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        if x.numel() == 0:
            return
        n_b, mean_b = x.numel(), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": float(self.count), "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), state["mean"], state["m2"]


class _LogprobsAndEntropy(torch.autograd.Function):
    """Per row of logits [N, V] at temperature T, with z = logits / T in float32:

        log p_y = z_y − logsumexp(z),   H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v

    and in backward, with upstream gradients g (of log p_y) and h (of H):

        ∂/∂z_v = g·(1[v = y] − p_v) − h·p_v·(log p_v + H),   ∂/∂logits = (∂/∂z) / T.

    Rows are taken `chunk_size` at a time, so no float32 [N, V] tensor exists, and only
    the logits (in their own dtype) and two floats a row are kept for backward. Autograd
    through checkpointed log-softmax chunks costs a fifth of a LoRA PPO minibatch's update on
    SmolLM2 (its intermediate [N, V] tensors are each allocated and zero-faulted afresh).
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy, chunk_size):
        n, device = logits.shape[0], logits.device
        logprobs = torch.empty(n, device=device)
        entropy = torch.zeros(n, device=device)
        normaliser = torch.empty(n, device=device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _scaled(logits[rows], temperature)
            lse = torch.logsumexp(z, dim=-1)
            normaliser[rows] = lse
            logprobs[rows] = z.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1) - lse
            if with_entropy:
                probs = (z - lse.unsqueeze(-1)).exp_()
                entropy[rows] = lse - torch.linalg.vecdot(probs, z)
        ctx.save_for_backward(logits, labels, normaliser, entropy)
        ctx.temperature, ctx.with_entropy, ctx.chunk_size = temperature, with_entropy, chunk_size
        ctx.set_materialize_grads(False)  # an output the loss leaves out costs no work
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, labels, normaliser, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        with_entropy = ctx.with_entropy and grad_entropy is not None
        if grad_logprobs is None:  # the entropy alone is in the loss
            grad_logprobs = torch.zeros(logits.shape[0], device=logits.device)
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            g = grad_logprobs[rows].unsqueeze(-1)
            logp = _scaled(logits[rows], temperature, copy=True)
            logp.sub_(normaliser[rows].unsqueeze(-1))
            probs = logp.exp()
            if with_entropy:
                h = grad_entropy[rows].unsqueeze(-1)
                weight = logp.add_(entropy[rows].unsqueeze(-1)).mul_(h).add_(g)
                dz = probs.mul_(weight).neg_()
            else:
                dz = probs.mul_(g).neg_()
            dz.scatter_add_(-1, labels[rows].unsqueeze(-1), g)
            grad[rows] = dz if temperature == 1.0 else dz.div_(temperature)
        return grad, None, None, None, None


def _logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] logits (and [...] labels) -> log p_label and entropy, each [...]."""
    rows = logits.reshape(-1, logits.shape[-1])
    if labels is None:
        ids = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    else:
        ids = labels.reshape(-1)
    logprobs, entropy = _LogprobsAndEntropy.apply(rows, ids, temperature, with_entropy, chunk_size)
    shape = logits.shape[:-1]
    return logprobs.view(shape), entropy.view(shape)


def _scaled(rows: torch.Tensor, temperature: float, copy: bool = False) -> torch.Tensor:
    """fp32 logits / T (at T = 1 the division, a second pass over [n, V], is skipped);
    `copy` guarantees a new tensor, for in-place work, where the rows are fp32 already."""
    scaled = rows.to(torch.float32, copy=copy)
    if temperature == 1.0:
        return scaled
    return scaled.div_(temperature) if copy else scaled / temperature


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 64
) -> torch.Tensor:
    """log softmax(logits / T)[label]: logits [B, T, V], labels [B, T] -> [B, T] fp32.

    logits[:, t] must already be the distribution of labels[:, t] (the caller shifts). Use the
    sampling temperature, or ratios and KL are wrong from the first step. Labels must be valid
    ids; mask padding afterwards. Computed `chunk_size` rows at a time (`_LogprobsAndEntropy`).
    """
    return _logprobs_and_entropy(logits, labels, temperature, False, chunk_size)[0]


def logprobs_and_entropy_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` and `entropy_from_logits` from one fp32 pass over the logits
    (the upcast and the log-normaliser are most of the cost of either): [B, T] each."""
    return _logprobs_and_entropy(logits, labels, temperature, True, chunk_size)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 64
) -> torch.Tensor:
    """H = -sum_v p_v log p_v of softmax(logits / T): [B, T, V] -> [B, T] fp32."""
    return _logprobs_and_entropy(logits, None, temperature, True, chunk_size)[1]


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(response) = sum of masked token log-probs: [B, T] -> [B]."""
    return masked_sum(token_logprobs, mask, dim=-1)
