from __future__ import annotations

import math

import pytest
import torch

from tether.core.ops import (
    entropy_from_logits,
    logprobs_and_entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
)
from tether.core.packing import batches_of_groups, distinct_rows, pack_groups


def test_masked_mean_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Unmasked tokens 1, 2, 4: sum 7 over 3 tokens (not a mean of row means, 1.5 and 4).
    assert masked_sum(x, mask).item() == 7.0
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    assert torch.equal(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0]))


def test_masked_mean_ignores_nonfinite_padding() -> None:
    x = torch.tensor([1.0, float("nan"), -float("inf")], requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 0.0])
    out = masked_mean(x, mask)
    out.backward()
    assert out.item() == 1.0
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_fully_masked_is_zero_with_zero_grad() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    out = masked_mean(x, mask)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros(2, 3))
    # Per-row: the fully masked row is 0, the other row is its mean.
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    rows = masked_mean(x.detach(), mask, dim=1)
    assert rows[1].item() == 0.0 and not torch.isnan(rows).any()


def test_token_mean_same_whole_or_split_across_ranks() -> None:
    # The invariance behind the single reduction: sum of per-rank masked sums divided by the
    # global token count equals the whole-batch masked mean, however tokens fall per rank.
    torch.manual_seed(0)
    x = torch.randn(6, 7)
    mask = (torch.rand(6, 7) > 0.4).float()
    mask[2] = 0.0  # a fully masked row contributes nothing
    whole = masked_mean(x, mask)
    splits = [(0, 1), (1, 4), (4, 6)]  # uneven "ranks"
    total = sum(mask[a:b].sum() for a, b in splits)
    recombined = sum(masked_sum(x[a:b], mask[a:b]) for a, b in splits) / total
    assert torch.allclose(whole, recombined, atol=1e-6)
    # Weighted recombination of per-rank means (weights = token counts) gives the same.
    weighted = sum(masked_mean(x[a:b], mask[a:b]) * mask[a:b].sum() for a, b in splits) / total
    assert torch.allclose(whole, weighted, atol=1e-6)


def test_masked_var_population_and_unbiased() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # Values 1, 2, 3: mean 2, squared deviations 1, 0, 1 -> population 2/3, unbiased 2/2 = 1.
    assert masked_var(x, mask).item() == pytest.approx(2 / 3)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(1.0)
    # One element: no spread, 0 rather than 0/0.
    one = torch.tensor([1, 0, 0, 0])
    assert masked_var(x, one, unbiased=True).item() == 0.0


def test_masked_whiten_hand_values() -> None:
    x = torch.tensor([1.0, 3.0, 50.0])
    mask = torch.tensor([1, 1, 0])
    # mean 2, population var 1 -> (-1, +1); eps inside the sqrt barely moves it.
    out = masked_whiten(x, mask)
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6)
    # shift_mean=False keeps the mean: (-1 + 2, 1 + 2) = (1, 3); padding still 0.
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept, torch.tensor([1.0, 3.0, 0.0]), atol=1e-6)


def test_masked_whiten_constant_and_fully_masked() -> None:
    x = torch.full((4,), 5.0)
    out = masked_whiten(x, torch.ones(4))  # var 0: eps inside the sqrt, (x - mean) = 0
    assert torch.equal(out, torch.zeros(4))
    out = masked_whiten(torch.randn(4), torch.zeros(4))
    assert torch.equal(out, torch.zeros(4))


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.double() / t, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_log_softmax(temperature: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    labels = torch.randint(0, 11, (3, 5))
    # 15 rows in chunks of 4: the last chunk is partial.
    out = logprobs_from_logits(logits, labels, temperature=temperature, chunk_size=4)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    ref = _reference_logprobs(logits, labels, temperature)
    assert torch.allclose(out.double(), ref, atol=1e-6)


def test_chunked_logprobs_gradient_matches_unchunked() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 13, requires_grad=True)
    labels = torch.randint(0, 13, (2, 7))
    logprobs_from_logits(logits, labels, temperature=0.5, chunk_size=3).sum().backward()
    chunked = logits.grad.clone()
    logits.grad = None
    _reference_logprobs(logits, labels, 0.5).sum().backward()
    assert torch.allclose(chunked, logits.grad, atol=1e-5)


def test_logprobs_bf16_input_computed_in_fp32() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]]).to(torch.bfloat16)
    # softmax of (0, log 3) is (1/4, 3/4).
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log(0.75), abs=1e-2)


def test_entropy_hand_values_and_chunking() -> None:
    # Uniform over 4 tokens: H = ln 4. One-hot-ish (huge gap): H ~ 0.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    out = entropy_from_logits(logits, chunk_size=1)
    assert out[0, 0].item() == pytest.approx(math.log(4))
    assert out[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(2)
    logits = torch.randn(3, 5, 9)
    logp = torch.log_softmax(logits / 2.0, dim=-1)
    ref = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, 2.0, chunk_size=4), ref, atol=1e-6)


def test_entropy_is_differentiable() -> None:
    # Raising the top logit of a uniform distribution lowers the entropy.
    logits = torch.zeros(1, 1, 3, requires_grad=True)
    entropy_from_logits(logits, chunk_size=1).sum().backward()
    assert torch.allclose(logits.grad, torch.zeros(1, 1, 3), atol=1e-6)  # stationary point
    logits = torch.tensor([[[1.0, 0.0, 0.0]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert logits.grad[0, 0, 0] < 0


def _reference_entropy(logits: torch.Tensor, t: float) -> torch.Tensor:
    logp = torch.log_softmax(logits.double() / t, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_in_one_pass_equal_the_two_apart(temperature: float) -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels, temperature, 4)
    assert logprobs.shape == entropy.shape == (3, 5)
    assert torch.equal(logprobs, logprobs_from_logits(logits, labels, temperature, 4))
    assert torch.allclose(entropy, entropy_from_logits(logits, temperature, 4), atol=1e-6)
    # the hand-written backward, with arbitrary upstream gradients on both outputs
    g, h = torch.randn(3, 5), torch.randn(3, 5)
    ((logprobs * g).sum() + (entropy * h).sum()).backward()
    both = logits.grad.clone()
    logits.grad = None
    reference = _reference_logprobs(logits, labels, temperature) * g
    (reference.sum() + (_reference_entropy(logits, temperature) * h).sum()).backward()
    assert torch.allclose(both, logits.grad, atol=1e-5)


def test_bf16_logits_get_bf16_gradients_of_the_float32_maths() -> None:
    torch.manual_seed(4)
    logits = (torch.randn(70, 300) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (70,))
    logprobs, entropy = logprobs_and_entropy_from_logits(logits, labels, 0.9, chunk_size=64)
    (logprobs.sum() - entropy.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    exact = logits.detach().double().requires_grad_()
    (
        _reference_logprobs(exact, labels, 0.9).sum() - _reference_entropy(exact, 0.9).sum()
    ).backward()
    expected = _reference_logprobs(exact, labels, 0.9).detach()
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=1e-2, atol=1e-3)


def test_distinct_rows_hand_values() -> None:
    first, group_of = distinct_rows(["b", "a", "b", "c", "a"])
    assert first.tolist() == [0, 1, 3]  # "b", "a", "c" in order of first appearance
    assert group_of.tolist() == [0, 1, 0, 2, 1]
    first, group_of = distinct_rows([(1, 2), (3,)])
    assert first.tolist() == [0, 1] and group_of.tolist() == [0, 1]


def test_batches_of_groups_keep_groups_whole_hand_values() -> None:
    groups = [["a1", "a2"], ["b1"], ["c1", "c2", "c3"], ["d1", "d2", "d3", "d4", "d5"], ["e1"]]
    batches = batches_of_groups(groups, 4)
    # a + b fill 3 of 4 rows; c would make 6; d alone is over 4 but is never split
    assert batches == [[groups[0], groups[1]], [groups[2]], [groups[3]], [groups[4]]]
    assert batches_of_groups([], 4) == []


def test_sequence_logprobs_sums_masked_tokens() -> None:
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert torch.equal(sequence_logprobs(token_logprobs, mask), torch.tensor([-5.0, -1.0]))


def test_explained_variance_hand_values() -> None:
    from tether.core.ops import explained_variance

    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # Var(R) over 3 tokens = 2/3; perfect values -> 1; constant mean -> 0.
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == 0.0
    # V = R + (1, −1, 0): Var(R − V) = 2/3 -> 1 − 1 = 0; V = 0 -> Var(R − V) = Var(R) -> 0.
    off = returns + torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    assert explained_variance(off, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    worse = returns + torch.tensor([[3.0, -3.0, 0.0, 0.0]])  # Var(err) = 6 -> 1 − 9 = −8
    assert explained_variance(worse, returns, mask).item() == pytest.approx(-8.0)
    assert explained_variance(returns, torch.ones_like(returns), mask).item() == 0.0


def test_running_moments_equal_the_moments_of_everything_seen() -> None:
    from tether.core.ops import RunningMoments

    moments = RunningMoments()
    assert (moments.mean, moments.std) == (0.0, 1.0)  # nothing seen: the identity transform
    moments.update(torch.tensor([1.0, 3.0]))
    assert (moments.mean, moments.std) == (2.0, 1.0)
    moments.update(torch.tensor([5.0, 7.0, 9.0]))  # all five: mean 5, population var 8
    assert moments.mean == pytest.approx(5.0)
    assert moments.std == pytest.approx(8.0**0.5)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    restored.update(torch.tensor([-4.0]))
    moments.update(torch.tensor([-4.0]))
    everything = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, -4.0], dtype=torch.float64)
    assert restored.mean == pytest.approx(everything.mean().item())
    assert restored.std == pytest.approx(everything.std(unbiased=False).item())
    assert restored.state_dict() == moments.state_dict()


def test_length_buckets_cut_where_padding_costs_more_than_a_call():
    """Worked by hand with BUCKET_OVERHEAD_TOKENS = 80, prompts already run (length 0).
    Answers 1, 50, 2, 48: one bucket runs 4 × 50 + 80 = 280 tokens; {1, 2} {48, 50} runs
    2 × 2 + 80 + 2 × 50 + 80 = 264; {1, 2} {48} {50} runs 4 + 48 + 50 + 3 × 80 = 342."""
    from tether.core.packing import BUCKET_OVERHEAD_TOKENS, length_buckets

    assert BUCKET_OVERHEAD_TOKENS == 80
    zeros = torch.zeros(4, dtype=torch.long)
    buckets = length_buckets(torch.tensor([1, 50, 2, 48]), zeros)
    assert [b.tolist() for b in buckets] == [[0, 2], [3, 1]]
    # a dearer call (overhead 100): 4 + 100 + 200 = 304 > 300, so the batch stays whole
    assert len(length_buckets(torch.tensor([1, 50, 2, 48]), zeros, overhead=100)) == 1
    # answers 10 and 12: a cut saves 2 tokens and costs 80, so the batch stays whole, in order
    assert [b.tolist() for b in length_buckets(torch.tensor([12, 10]), zeros[:2])] == [[0, 1]]
    # a 60-token prompt in every row: 2 × 62 + 2 × 110 + 160 = 504 < 4 × 110 + 80 = 520
    prompts = torch.full((4,), 60)
    assert len(length_buckets(torch.tensor([1, 50, 2, 48]), prompts)) == 2
    assert [b.tolist() for b in length_buckets(torch.tensor([3, 1]), zeros[:2], most=1)] == [[0, 1]]


def test_pack_groups_hand_values() -> None:
    """Two answers after one prompt, then a row alone: every token sees its own context."""
    packed = pack_groups([[[1, 2, 3], [1, 2, 4, 5]], [[7, 8]]])
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1]]  # answers continue at 2
    assert [(start, end) for start, end, _ in packed.segments] == [(0, 5), (5, 7)]
    assert packed.last_index.tolist() == [2, 4, 6]
    assert packed.segments[0][2].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # answer 1: the prompt and itself
        [1, 1, 0, 1, 0],  # answer 2 does not see answer 1
        [1, 1, 0, 1, 1],
    ]
    assert packed.segments[1][2].int().tolist() == [[1, 0], [1, 1]]


def test_pack_groups_splits_a_group_that_shares_nothing() -> None:
    packed = pack_groups([[[7, 2], [1, 2]]])
    assert [(start, end) for start, end, _ in packed.segments] == [(0, 2), (2, 4)]
    assert packed.position_ids.tolist() == [[0, 1, 0, 1]]
    assert packed.last_index.tolist() == [1, 3]
