"""Training-pass attention: flash forward, a textbook backward, against float64 SDPA."""

import pytest
import torch
import torch.nn.functional as F

from tether.models.attention import FlashForwardAttention


def _reference(q, k, v, keep, scale):
    """float64 softmax attention with k, v repeated per query head; rows with no key give 0."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    n = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(n, 1).transpose(-1, -2) * scale
    probs = scores.masked_fill(~keep, -torch.inf).softmax(-1).nan_to_num(0.0)
    return probs @ v.repeat_interleave(n, 1), (q, k, v)


def _inputs(dtype, batch=3, heads=6, groups=2, q_len=7, k_len=10, dim=16):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, groups, k_len, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, groups, k_len, dim, dtype=dtype, requires_grad=True)
    # causal over a 3-token prefix (answers reading a prompt's cache), left padding of
    # 4 keys in row 0: its first query row sees no key at all
    keep = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    keep = keep.expand(batch, 1, q_len, k_len).clone()
    keep[0, :, :, :4] = False
    return q, k, v, keep


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_output_and_gradients_match_float64_attention(dtype, tol):
    q, k, v, keep = _inputs(dtype)
    assert not keep[0, 0, 0].any()  # the case flash must not turn into NaN
    out = FlashForwardAttention.apply(q, k, v, keep, 0.25)
    expected, leaves = _reference(q, k, v, keep, 0.25)
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (expected * weights).sum().backward()

    def close(a, b):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol * b.abs().max().item())

    close(out, expected.detach())
    for got, want in zip((q.grad, k.grad, v.grad), (x.grad for x in leaves), strict=True):
        close(got, want)
    assert torch.all(out[0, :, 0] == 0) and torch.all(q.grad[0, :, 0] == 0)


def test_gradients_no_worse_than_the_flash_kernels_own():
    """In bf16 the backward keeps S and dP in float32: its gradient error is at most
    flash's, which is the kernel this replaces."""
    q, k, v, keep = _inputs(torch.bfloat16, batch=4, heads=9, groups=3, q_len=40, k_len=60)
    keep[0, :, :, :4] = True  # flash's own backward needs every row to see a key
    weights = torch.randn(q.shape, dtype=torch.float64)
    expected, leaves = _reference(q, k, v, keep, 0.125)
    (expected * weights).sum().backward()

    def errors():
        return [
            ((got.double() - want.grad).abs().max() / want.grad.abs().max()).item()
            for got, want in zip((q.grad, k.grad, v.grad), leaves, strict=True)
        ]

    out = FlashForwardAttention.apply(q, k, v, keep, 0.125)
    (out.double() * weights).sum().backward()
    ours = errors()
    q.grad = k.grad = v.grad = None
    flash = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=keep, scale=0.125
    )
    (flash.double() * weights).sum().backward()
    theirs = errors()
    assert all(o <= t * 1.25 for o, t in zip(ours, theirs, strict=True)), (ours, theirs)


def _attention_ops(model, ids, mask) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()] ** 2).mean().backward()
    return {e.key for e in prof.key_averages() if "attention" in e.key}


def test_a_loaded_model_trains_through_it_with_the_gradients_of_plain_sdpa(tiny_model_dir):
    """Gradients as plain SDPA's, without its flash backward; a pass without gradients
    gives the same logits bit for bit (a PPO ratio starts at exactly 1)."""
    from transformers import AutoModelForCausalLM

    from tether.config import ModelConfig
    from tether.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(name=str(tiny_model_dir)), dropout=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, plain.config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row

    with torch.inference_mode():
        frozen = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, frozen)
    flash_backward = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    assert flash_backward in _attention_ops(plain, ids, mask)
    assert flash_backward not in _attention_ops(model, ids, mask)
    for (name, ours), theirs in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)
