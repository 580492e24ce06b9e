"""Two training-step kernels against the textbook way, forward + backward, in one run.

    .venv/bin/python benchmarks/training_kernels.py

1. Attention at SmolLM2's head layout (9 query heads, 3 key/value heads of 64, bf16, a
   causal mask with left padding): PyTorch's SDPA (flash on CPU, k and v repeated as
   transformers does) against `tether.models.attention.FlashForwardAttention`.
2. Token log-probs and entropy over the 49,152-token vocabulary from bf16 logits: autograd
   through a float32 log-softmax against `tether.core.ops.logprobs_and_entropy_from_logits`.

Milliseconds per call (median of 7 after a warm-up), as JSON.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from tether.core.ops import logprobs_and_entropy_from_logits
from tether.models.attention import FlashForwardAttention


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def attention(batch: int, q_len: int, k_len: int) -> dict[str, float]:
    q = torch.randn(batch, 9, q_len, 64, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, 3, k_len, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, 3, k_len, 64, dtype=torch.bfloat16, requires_grad=True)
    keep = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    keep = keep.expand(batch, 1, q_len, k_len).clone()
    keep[: batch // 2, :, :, :8] = False  # left padding (every query still sees a key)
    upstream = torch.randn(batch, 9, q_len, 64, dtype=torch.bfloat16)

    def sdpa():
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=keep
        )
        out.backward(upstream)

    def tether():
        FlashForwardAttention.apply(q, k, v, keep, 64**-0.5).backward(upstream)

    return {"sdpa_ms": median_ms(sdpa), "tether_ms": median_ms(tether)}


def logprobs(tokens: int, vocab: int = 49_152) -> dict[str, float]:
    logits = (torch.randn(tokens, vocab) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    upstream = torch.randn(tokens)

    def autograd():
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(-1, labels[:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        ((picked * upstream).sum() + 0.01 * entropy.sum()).backward()

    def tether():
        picked, entropy = logprobs_and_entropy_from_logits(logits, labels)
        ((picked * upstream).sum() + 0.01 * entropy.sum()).backward()

    return {"autograd_ms": median_ms(autograd), "tether_ms": median_ms(tether)}


def main() -> None:
    torch.manual_seed(0)
    results = {
        "attention": {
            f"{b}x{lq}x{lk}": attention(b, lq, lk)
            for b, lq, lk in [(16, 90, 90), (32, 60, 100), (8, 150, 150)]
        },
        "logprobs_entropy": {f"{n}x49152": logprobs(n) for n in (216, 432)},
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
