"""Attention on CPU: PyTorch's flash forward over grouped heads, and a faster backward.

PyTorch's CPU flash-attention kernel is fast forward and slow backward. At the shapes of
tether's training steps (bf16, 9 query heads and 3 key/value heads of 64, 60-150 tokens, a
padding mask) its forward + backward took 18-27 ms a layer. `FlashForwardAttention` keeps
its forward and replaces the backward by the textbook one: 11-15 ms, with gradient errors
against a float64 reference no larger than flash's own, and the same saved tensors (q, k, v,
the output and the row log-sum-exps). PyTorch's math kernel took 12-25 ms, and keeps
float32 attention probabilities for backward (+0.3 GiB in a LoRA PPO iteration).

Passes without gradients take the same forward, so that a policy pass with gradients and a
reference pass without give the same log-probs bit for bit (the first PPO ratios are
exactly 1). Stacking a group's query heads instead of repeating k and v also makes that
forward faster than transformers' SDPA path: 2.9 against 4.2 ms at 16 rows of 90 tokens.

A packed row (`packing.pack_groups`: several rows in one, without padding) comes with its
groups' spans and masks under the keyword `SEGMENTS`; each group's attention then runs
alone, on any device, so it costs the sum of the groups' squared lengths, not the row's.

`use_grouped_flash_attention` switches a loaded model whose attention is SDPA to this one
(registered with transformers' attention interface as `NAME`); the saved config does not
record the switch. Other devices, float masks and attention features beyond a mask go to
transformers' SDPA attention unchanged.
"""

from __future__ import annotations

import math

import torch

NAME = "tether_sdpa"
# Keyword a caller passes through a transformers forward to its attention calls: the
# (start, end, [n, n] bool mask) spans of a packed row (`packing.pack_groups`), each attending
# only within itself.
SEGMENTS = "tether_segments"
# Families whose masks reach nothing but the attention calls and whose positions come from
# `position_ids` alone, so a packed row computes what its rows would alone.
PACKABLE = ("llama", "qwen2", "qwen3")
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class FlashForwardAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + mask) v, for grouped-query attention without repeating k, v.

    q [B, H, Lq, D]; k, v [B, G, Lk, D] with H = G·n: query head h reads key head h // n.
    `keep` [B or 1, 1, Lq, Lk] is True where a query may attend.

    Each group's n heads are stacked along the query axis ([B, G, n·Lq, D]): one flash call
    with the mask tiled n times, and backward GEMMs n times longer. Backward, from the saved
    output O and log-sum-exp L (P = exp(S − L) recomputes the probabilities):
        dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),
        dQ = scale · dS K,  dK = scale · dSᵀ Q.
    S and dP are float32 matmuls: P is exp(S − L), so an error in S is an error in P, and
    dP − rowsum(dO ∘ O) cancels. dV, dQ and dK run in the inputs' dtype (bf16 under
    autocast) with float32 accumulation, as in the forward. Rows with no key to attend
    (padding queries) give zero output and zero gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, keep, scale):
        batch, heads, q_len, dim = q.shape
        groups = k.shape[1]
        stacked = q.reshape(batch, groups, heads // groups * q_len, dim)
        keep = keep.repeat(1, 1, heads // groups, 1)
        bias = torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, -math.inf)
        out, lse = _flash_forward(stacked, k, v, 0.0, False, attn_mask=bias, scale=scale)
        ctx.save_for_backward(stacked, k, v, out, lse, keep)
        ctx.scale, ctx.q_shape = scale, q.shape
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        stacked, k, v, out, lse, keep = ctx.saved_tensors
        scale, dtype = ctx.scale, stacked.dtype
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.reshape(out.shape).to(dtype)
            q32, k32, grad_out32 = stacked.float(), k.float(), grad_out.float()
            scores = torch.matmul(q32, k32.transpose(-1, -2)).mul_(scale)
            probs = scores.sub_(lse.unsqueeze(-1)).exp_().masked_fill_(~keep, 0.0)
            grad_probs = torch.matmul(grad_out32, v.float().transpose(-1, -2))
            row = (grad_out32 * out.float()).sum(-1, keepdim=True)
            grad_v = torch.matmul(probs.to(dtype).transpose(-1, -2), grad_out)
            grad_scores = probs.mul_(grad_probs.sub_(row)).to(dtype)
            grad_q = torch.matmul(grad_scores, k).mul_(scale)
            grad_k = torch.matmul(grad_scores.transpose(-1, -2), stacked).mul_(scale)
        return grad_q.view(ctx.q_shape), grad_k, grad_v, None, None


# transformers' attention arguments beyond a mask, handled by its SDPA path only
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


def _keep_mask(attention_mask, q_len: int, k_len: int, is_causal: bool | None):
    """The boolean mask a call attends under, or None where this module does not handle it
    (an additive float mask, or no mask on a non-square causal call)."""
    if attention_mask is not None:
        return attention_mask if attention_mask.dtype == torch.bool else None
    if is_causal is False:
        return torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
    if q_len != k_len:
        return None
    return torch.ones(q_len, k_len, dtype=torch.bool).tril_().view(1, 1, q_len, k_len)


def grouped_flash_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw
):
    """transformers' attention-interface signature: `FlashForwardAttention` on CPU where
    nothing beyond a boolean mask is asked for, transformers' SDPA attention otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (segments := kw.pop(SEGMENTS, None)) is not None:
        # A packed row: each span's attention alone, under its own mask (the call's own
        # mask, causal over the whole row, is not the packed one and is not used).
        outs = [
            grouped_flash_attention(
                module,
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                block.view(1, 1, *block.shape).to(query.device),
                dropout,
                scaling,
                is_causal=False,
                **kw,
            )[0]
            for start, end, block in segments
        ]
        return torch.cat(outs, dim=1), None
    keep = None
    if (
        query.device.type == "cpu"
        and dropout == 0.0
        and all(kw.get(name) is None for name in _SDPA_ONLY)
        and key.shape[-1] == value.shape[-1]
        and query.shape[1] % key.shape[1] == 0
    ):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        keep = _keep_mask(attention_mask, query.shape[2], key.shape[2], causal)
    if keep is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kw
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # what autocast does for SDPA: q and k come out of RoPE in float32, v does not
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    query, key, value = (x.to(dtype) for x in (query, key, value))
    out = FlashForwardAttention.apply(query, key, value, keep, scale)
    return out.transpose(1, 2).contiguous(), None


def runs_packed_rows(config) -> bool:
    """Whether a model (by its config) may be given a packed row: tether's attention, which
    honours `SEGMENTS`, in a family where nothing else reads the mask, with no sliding window
    (a packed group longer than the window would see past it)."""
    return (
        getattr(config, "_attn_implementation", None) == NAME
        and config.model_type in PACKABLE
        and not getattr(config, "use_sliding_window", False)
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_grouped_flash_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a transformers model from SDPA to `NAME`, in place; models on another
    attention implementation, or that cannot switch, are returned unchanged."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model
    if not model._can_set_attn_implementation():
        return model
    _register()
    model.set_attn_implementation(NAME)
    return model
