"""A rollout engine for Llama-family decoders: prefill, then decode with a preallocated KV cache.

Why not `model.generate`: on a CPU, a 135M model's decode step is a few small matmuls per
layer, and generate's per-step overhead (autocast re-casting fp32 weights every op, a cache
that grows by concatenation, logits processors over the full batch) costs more than the
maths. Here the weights are exported once per rollout in the compute dtype (LoRA adapters
merged in, weights reordered for oneDNN: `Linear`), the cache is allocated once, the
LM head runs on the last position only, and rows that finished are compacted out of the
batch.

It reuses the model's own modules where the maths could vary by architecture (rotary
embedding with its scaling rules, RMSNorm epsilon, activation), and covers the Llama layout
(Llama, Mistral, Qwen2, SmolLM: q/k/v/o projections with optional bias, gated MLP, RMSNorm).
`supports(model)` says whether a model fits; other models go through `generate`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tether.core.packing import (
    common_prefix_length,
    distinct_rows,
    pad_rows,
    position_ids_from_mask,
)
from tether.fast import fused as tether_fused
from tether.hardware import bf16_weight_packing
from tether.models.loading import hf_model, model_device

SUPPORTED = {"llama", "mistral", "qwen2"}
# The batch size oneDNN lays the weights out for; any batch runs on the layout, and
# 16-64 rows (the rollout sizes) run fastest on this one (benchmarks/RESULTS.md).
PACK_ROWS = 64
# Compact the batch once this share of its rows has finished: copying the KV cache costs
# about one decode step, so doing it for every finished row would cost more than it saves.
COMPACT_SHARE = 0.25


def supports(model) -> bool:
    """Whether this engine decodes `model`: a Llama-family model on the CPU (on a GPU,
    `tether.fast.static_decode` decodes it)."""
    return model_device(hf_model(model)).type == "cpu" and fits_layout(model)


def fits_layout(model) -> bool:
    """Whether `model` has the Llama layout the engine's weights and forward assume."""
    inner = hf_model(model)
    config = inner.config
    return (
        config.model_type in SUPPORTED
        and not getattr(config, "sliding_window", None)  # a full cache is assumed
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "mlp_bias", False)  # the MLP below has no biases
        and hasattr(inner, "model")
        and hasattr(inner.model, "layers")
    )


def _weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's effective weight: peft's LoRA layers add their active adapters."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight
    weight = base.weight
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_A", {}):
                weight = weight + module.get_delta_weight(adapter)
    return weight


def _bias(module: torch.nn.Module) -> torch.Tensor | None:
    return getattr(getattr(module, "base_layer", module), "bias", None)


# Exports of frozen weights, kept from one rollout to the next per module: with adapters on
# the top layers only, most of a LoRA policy's layers never change, and exporting them again
# cost the demo 0.2 s a rollout. A weight that trains (requires_grad) and a layer that peft
# wraps (its adapters train; merging writes its base weight through `.data`, which no version
# counter sees) are exported anew each time, and no second copy of them outlives a rollout.
_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple, object]]] = (
    weakref.WeakKeyDictionary()
)


def _kept(owner: torch.nn.Module, name: str, sources: Sequence[torch.nn.Module], make: Callable):
    """`make()`, or its result from an earlier rollout where `sources` are frozen and their
    tensors the same, unchanged since (an in-place update bumps a tensor's version)."""
    tensors = [t for m in sources for t in (m.weight, getattr(m, "bias", None)) if t is not None]
    if any(hasattr(m, "base_layer") for m in sources) or any(t.requires_grad for t in tensors):
        return make()
    key = (name, *((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))
    slot = _KEPT.setdefault(owner, {})
    if name in slot and slot[name][0] == key:
        return slot[name][1]
    slot.pop(name, None)  # the stale export goes before the new one is made
    value = make()
    slot[name] = (key, value)
    return value


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the weights on the CPU can go through oneDNN's reordered-weight linear.

    The reordered weight is in oneDNN's blocked layout, made once per rollout; `F.linear`
    starts from the plain layout on every call, which costs most for the few rows of a decode
    step. In float32 it runs MKL's sgemm: on a 2-core AVX2 EPYC the 49,152 × 576 LM
    head runs at 24 GFLOP/s for 16 rows and 51 for 64, against 58 and 107 with the weight
    reordered once for oneDNN, and the layers' matmuls are 1.1-1.8x slower. In bf16 on a
    2-core AVX-512 EPYC (Zen 4) the reordered weights are 1.2-1.3x faster at 16 rows (the LM
    head 2.1x) and 1.1-1.3x at 64 (benchmarks/RESULTS.md). bf16 packing needs the CPU
    features PyTorch checks for (`hardware.bf16_weight_packing`); without them the bf16
    engine runs `F.linear`.
    """
    mkldnn = torch.ops.mkldnn
    return (
        (dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_weight_packing()))
        and device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class Linear:
    """y = x·Wᵀ + b with W fixed for a rollout: reordered once into oneDNN's blocked layout
    where `can_pack` (an opaque tensor only `_linear_pointwise` reads), else plain F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.bias = bias
        self.packed = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Linear  # [(H + 2·Hkv)·D, hidden]: one matmul for q, k and v
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear  # [2·I, hidden]
    down: Linear


class Weights:
    """The model's weights in the compute dtype, exported once per rollout."""

    @torch.no_grad()
    def __init__(
        self, model, dtype: torch.dtype, pack: bool | None = None, fused: bool | None = None
    ) -> None:
        """`pack`: reorder the weights for oneDNN (`Linear`); None: where `can_pack`.
        `fused`: run norms, RoPE, SiLU, decode attention and the sampler's softmax in
        `tether.fast.fused`'s kernels; None: where they build (the same maths; the norm's last
        bit, attention's roundings and the exp's last bits can differ, so bf16 samples do)."""
        inner = hf_model(model)
        config = inner.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.rotary = inner.model.rotary_emb
        self.dtype = dtype

        device = inner.model.embed_tokens.weight.device
        self.device = device
        if pack is None:
            pack = can_pack(dtype, device)
        self.kernels = None
        if fused is not False and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            self.kernels = tether_fused.kernels()
        # The shapes the attention kernel unrolls its loops for (tether/fast/fused_decode.cpp)
        self.fused_attention = (
            self.kernels is not None
            and self.head_dim in (16, 32, 64, 128)
            and self.heads // self.kv_heads <= 8
        )

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype).contiguous()

        def linear(name: str, modules: Sequence[torch.nn.Module]) -> Linear:
            def make() -> Linear:
                weights = [_weight(m) for m in modules]
                biases = [_bias(m) for m in modules]
                weight = weights[0] if len(weights) == 1 else torch.cat(weights)
                bias = None if biases[0] is None else torch.cat(biases)
                return Linear(cast(weight), cast(bias), pack)

            return _kept(modules[0], f"{name}:{dtype}:{pack}", modules, make)

        embed_tokens = inner.model.embed_tokens
        self.embed = _kept(
            embed_tokens, f"embed:{dtype}", [embed_tokens], lambda: cast(_weight(embed_tokens))
        )
        self.layers = []
        for layer in inner.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                Layer(
                    ln1=cast(layer.input_layernorm.weight),
                    qkv=linear("qkv", (attn.q_proj, attn.k_proj, attn.v_proj)),
                    o=linear("o", (attn.o_proj,)),
                    ln2=cast(layer.post_attention_layernorm.weight),
                    gate_up=linear("gate_up", (mlp.gate_proj, mlp.up_proj)),
                    down=linear("down", (mlp.down_proj,)),
                )
            )
        self.norm = cast(inner.model.norm.weight)
        self.lm_head = linear("lm_head", (inner.get_output_embeddings(),))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As Llama's: the variance in fp32, the result back in the compute dtype."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, dim: int
) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias) v for ONE query per row: q [B, H, 1, D], keys/values the whole
    cache [B, Hkv, T_max, D], bias [B, 1, 1, T_max] float32 (0 where a key is visible, -inf
    for padding and for slots not filled yet). Where the fused kernels are built, the engine
    runs `decode_attention` from tether/fast/fused_decode.cpp instead, which reads only the filled
    slots; this is the fallback and the tests' reference.

    Two small batched matmuls with the query heads grouped by their KV head; for a single
    query this is several times faster on CPU than the fused SDPA kernel, which is built for
    long query blocks. They run over all T_max slots: a cache sliced to its filled length is
    not contiguous over the batch, and bmm then copied the keys every layer and step (bf16,
    64 rows: 1.46 ms a layer against 0.50 ms over the whole cache with its unused slots).
    """
    batch, heads, _, _ = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)  # [B, Hkv, rep, D]
    scores = (grouped @ keys.transpose(-1, -2)).float()  # [B, Hkv, rep, T_max]
    weights = scores.mul_(dim**-0.5).add_(bias).softmax(-1).to(values.dtype)
    return (weights @ values).view(batch, heads, 1, dim)


class KVCache:
    """[layers] of [B, Hkv, T_max, D] keys and values, filled up to `length`."""

    def __init__(self, w: Weights, batch: int, max_len: int) -> None:
        shape = (batch, w.kv_heads, max_len, w.head_dim)
        self.keys = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in w.layers]
        self.values = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in w.layers]
        self.length = 0

    def extend(self, head: KVCache) -> None:
        """Append the filled slots of a one-row cache to every row (a shared opening)."""
        start, end = self.length, self.length + head.length
        for mine, theirs in zip(self.keys + self.values, head.keys + head.values, strict=True):
            mine[:, :, start:end] = theirs[:, :, : head.length]
        self.length = end

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


def forward(
    w: Weights,
    cache: KVCache,
    ids: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Run `ids` [B, T] at `positions` [B, T] through the model, appending to the cache.

    key_mask [B, T_cache + T] is True for keys a query may see apart from causality (not
    padding). Returns the final hidden state of the last position, [B, hidden].
    """
    batch, steps = ids.shape
    start, end = cache.length, cache.length + steps
    x = F.embedding(ids, w.embed)
    cos, sin = w.rotary(x, positions)
    device = ids.device
    if steps > 1:  # prefill: causal over the block, padding keys hidden
        causal = torch.ones(steps, end, dtype=torch.bool, device=device).tril(diagonal=start)
        itself = torch.zeros(steps, end, dtype=torch.bool, device=device)
        itself[:, start:end] = torch.eye(steps, dtype=torch.bool, device=device)
        # Every position may see itself: a padding query with no visible key would make SDPA
        # return NaN, which would reach later layers' keys and values and, as 0·NaN, real rows.
        mask = ((causal[None] & key_mask[:, None, :end]) | itself[None])[:, None]  # [B,1,T,T']
    else:  # decode: one additive mask over the whole cache serves every layer
        slots = cache.keys[0].shape[2]
        bias = torch.full((batch, 1, 1, slots), -torch.inf, device=device)
        bias[:, 0, 0, :end].masked_fill_(key_mask[:, :end], 0.0)
    q_size, kv_size = w.heads * w.head_dim, w.kv_heads * w.head_dim
    fused = w.kernels
    if fused is not None:
        norm = fused.rms_norm
        cos, sin = cos.to(w.dtype).contiguous(), sin.to(w.dtype).contiguous()  # [B, T, D]
    else:
        norm = _rms_norm
        cos, sin = cos.unsqueeze(1).to(w.dtype), sin.unsqueeze(1).to(w.dtype)
    for i, layer in enumerate(w.layers):
        h = norm(x, layer.ln1, w.eps)
        qkv = layer.qkv(h)
        if fused is not None:
            q = fused.rope_into_cache(qkv, cos, sin, cache.keys[i], cache.values[i], w.heads, start)
        else:
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rotate(q.view(batch, steps, w.heads, w.head_dim).transpose(1, 2), cos, sin)
            k = _rotate(k.view(batch, steps, w.kv_heads, w.head_dim).transpose(1, 2), cos, sin)
            cache.keys[i][:, :, start:end] = k
            cache.values[i][:, :, start:end] = v.view(
                batch, steps, w.kv_heads, w.head_dim
            ).transpose(1, 2)
        if steps == 1 and w.fused_attention:
            attn = fused.decode_attention(
                q, cache.keys[i], cache.values[i], bias.view(batch, -1), end, w.head_dim**-0.5
            )
        elif steps == 1:
            attn = _decode_attention(q, cache.keys[i], cache.values[i], bias, w.head_dim)
        else:
            keys, values = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]
            attn = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=w.kv_heads != w.heads
            )
        x = x + layer.o(attn.transpose(1, 2).reshape(batch, steps, q_size))
        h = norm(x, layer.ln2, w.eps)
        if fused is not None:
            x = x + layer.down(fused.silu_mul(layer.gate_up(h)))
        else:
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
    cache.length = end
    return norm(x[:, -1].contiguous(), w.norm, w.eps)


# Entries per block of the two-level inverse-CDF draw (`draw`): cumulative sums then run over
# V / 1024 block totals and one block's 1,024 entries instead of all V (49,152 for SmolLM2).
DRAW_BLOCK = 1024


def draw_buffer(batch: int, vocab: int) -> torch.Tensor:
    """Zeros [batch, vocab rounded up to DRAW_BLOCK] in float32, for `sample` to reuse.

    One buffer for the whole decode: a [64, 49,152] float32 tensor is above glibc's mmap
    threshold, so allocating one afresh each step maps and faults in fresh pages: a draw at
    batch 64 takes 18 ms that way and 2-2.5 ms in one buffer (benchmarks/RESULTS.md). The
    padding columns stay zero, so they carry no weight.
    """
    return torch.zeros(batch, -(-vocab // DRAW_BLOCK) * DRAW_BLOCK)


def draw(
    weights: torch.Tensor, uniforms: torch.Tensor, block_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row, the first index i with w_0 + … + w_i > u · Σ w: a draw from the distribution
    proportional to `weights` [B, W] ≥ 0 (W a multiple of DRAW_BLOCK, zero-padded), given
    `uniforms` u [B] in [0, 1). `block_sums` [B, W / DRAW_BLOCK]: the sums of the weights'
    blocks where the caller has them (the fused `softmax_weights`), else summed here.

    Inverse-CDF sampling, the same distribution as torch.multinomial, which draws an exponential
    per vocabulary entry (3M of them at batch 64). In two levels: the block whose running total
    first exceeds the target, then the entry inside it. The target is held strictly below each
    level's total, so rounding cannot land on a zero-weight entry or past the end.
    """
    batch, width = weights.shape
    blocks = weights.view(batch, width // DRAW_BLOCK, DRAW_BLOCK)
    block_cdf = (blocks.sum(-1) if block_sums is None else block_sums).cumsum(-1)  # [B, blocks]
    zero = torch.zeros(())
    target = torch.minimum(uniforms * block_cdf[:, -1], block_cdf[:, -1].nextafter(zero))
    chosen = torch.searchsorted(block_cdf, target[:, None], right=True).squeeze(-1)
    before = block_cdf.gather(1, (chosen - 1).clamp(min=0)[:, None]).squeeze(-1)
    rest = torch.where(chosen > 0, target - before, target).clamp(min=0)
    flat_block = torch.arange(batch) * blocks.shape[1] + chosen
    inner_cdf = blocks.view(-1, DRAW_BLOCK).index_select(0, flat_block).cumsum(-1)  # [B, block]
    rest = torch.minimum(rest, inner_cdf[:, -1].nextafter(zero))
    inner = torch.searchsorted(inner_cdf, rest[:, None], right=True).squeeze(-1)
    return chosen * DRAW_BLOCK + inner


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
    buffer: torch.Tensor | None = None,
    kernels=None,
) -> torch.Tensor:
    """Next tokens [B] from last-position logits [B, V]: greedy at temperature 0, else
    softmax(logits / T) restricted to the top-k and then the top-p mass, renormalised.
    `uniforms` [B] in [0, 1) are the rows' draws when given (else drawn from `generator`);
    `buffer` (`draw_buffer`, at least B rows) holds the weights exp((logits − max) / T).
    `kernels` (`tether.fast.fused.kernels()`): compute those weights and their block sums in one
    kernel (two passes over the logits) where there is no truncation (the same maths; its exp
    differs in the last bits)."""
    if temperature == 0:
        return logits.argmax(-1)
    batch, vocab = logits.shape
    if buffer is None:
        buffer = draw_buffer(batch, vocab)
    weights = buffer[:batch]
    if uniforms is None:
        uniforms = torch.rand(batch, generator=generator)
    if kernels is not None and not top_k and top_p == 1.0:
        sums = kernels.softmax_weights(logits.contiguous(), weights, temperature)
        return draw(weights, uniforms, sums)
    scaled = weights[:, :vocab]
    if top_k or top_p < 1.0:
        scaled.copy_(_truncate(logits.float() / temperature, top_p, top_k))
    else:
        scaled.copy_(logits)
        if temperature != 1.0:
            scaled.div_(temperature)
    scaled.sub_(scaled.amax(-1, keepdim=True)).exp_()  # the truncated entries: exp(-inf) = 0
    return draw(weights, uniforms)


def _truncate(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """`logits` with everything outside the top-k, then outside the top-p mass, set to -inf."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token crossing top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits


# Tokens a shared opening must save (its length × the other rows) to be prefilled on its own.
# Its extra forward reads every weight once (a 1-token forward: 12 ms, SmolLM2 in bf16 on 2
# cores). Break-even is near 20 saved tokens: two 39-token prompts take 57 ms, against 23 ms
# for their 24-token opening plus 28 ms for their rests, 6 ms saved for 24 tokens. 32 keeps
# a margin where reading the weights costs more. Sixteen distinct prompts prefill in 23 + 168 ms
# with their opening shared, against 394 ms without (benchmarks/RESULTS.md).
OPENING_MIN_SAVED_TOKENS = 32


def shared_opening(
    prompts: Sequence[Sequence[int]], min_saved: int = OPENING_MIN_SAVED_TOKENS
) -> int:
    """The tokens every prompt opens with (a chat template's system turn: 24 of SmolLM2's ~40
    prompt tokens) where prefilling them once pays, else 0; each prompt keeps at least its
    last token, whose state emits the first response token."""
    opening = common_prefix_length(prompts)
    return opening if opening * (len(prompts) - 1) >= min_saved else 0


def prefill(
    w: Weights, prompts: list[list[int]], pad_id: int, max_new_tokens: int
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the prompts into a cache with room for `max_new_tokens` more: the cache, the last
    hidden state of each row [G, hidden], the key mask [G, width + max_new_tokens] (True on
    real prompt tokens; decoding sets the rest as it goes) and each row's next position [G].

    The prompts' `shared_opening` runs once, in a row of its own, and its keys and values are
    copied to every row; then each prompt's rest, left-padded after it. A row of the cache is
    [opening | padding | rest of the prompt | response], its positions counted over the real
    tokens, so every row computes what it would alone."""
    opening = shared_opening(prompts)
    rest, rest_mask = pad_rows([p[opening:] for p in prompts], pad_id, "left")
    rows, width = len(prompts), opening + rest.shape[1]
    valid = torch.zeros((rows, width + max_new_tokens), dtype=torch.bool)
    valid[:, :opening] = True
    valid[:, opening:width] = rest_mask.bool()
    positions = position_ids_from_mask(valid[:, :width])
    valid, positions, rest = valid.to(w.device), positions.to(w.device), rest.to(w.device)
    cache = KVCache(w, rows, width + max_new_tokens)
    if opening:
        head = KVCache(w, 1, opening)
        opening_ids = torch.tensor([prompts[0][:opening]], device=w.device)
        forward(w, head, opening_ids, positions[:1, :opening], valid[:1])
        cache.extend(head)
    hidden = forward(w, cache, rest, positions[:, opening:], valid)
    return cache, hidden, valid, positions[:, -1] + 1


@torch.inference_mode()
def decode(
    w: Weights,
    prompt_rows: list[list[int]],
    pad_id: int,
    stops: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    generator: torch.Generator | None,
    row_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """Response token ids per prompt row (through the first stop token, if any); with no
    stop tokens every row runs to max_new_tokens.

    With `row_seeds`, row i draws its tokens from its own generator seeded with row_seeds[i]:
    its sample is then the same whatever batch (or torchrun rank) it is decoded in.
    """
    batch = len(prompt_rows)
    # A prompt repeated over rows (k samples, best-of-n) is prefilled once, then its cache
    # and last state are copied to its rows.
    distinct, group_of_row = distinct_rows([tuple(p) for p in prompt_rows])
    cache, hidden, valid, next_position = prefill(
        w, [prompt_rows[i] for i in distinct], pad_id, max_new_tokens
    )
    if len(distinct) < batch:
        cache.keep(group_of_row)
        hidden, valid = hidden[group_of_row], valid[group_of_row]
        next_position = next_position[group_of_row]
    width = valid.shape[1] - max_new_tokens
    rows = torch.arange(batch)  # original row of each active row
    finished = torch.zeros(batch, dtype=torch.bool)  # per active row: has emitted a stop
    out: list[list[int]] = [[] for _ in range(batch)]
    stop_ids = torch.tensor(stops or [-1])
    row_draws = None
    if row_seeds is not None:
        row_draws = torch.stack(
            [
                torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s))
                for s in row_seeds
            ]
        )
    buffer = None
    for step in range(max_new_tokens):
        logits = w.lm_head(hidden)
        if buffer is None:
            buffer = draw_buffer(*logits.shape)
        uniforms = None if row_draws is None else row_draws[rows, step]
        tokens = sample(logits, temperature, top_p, top_k, generator, uniforms, buffer, w.kernels)
        for row, token, done in zip(rows.tolist(), tokens.tolist(), finished.tolist(), strict=True):
            if not done:
                out[row].append(token)
        finished |= torch.isin(tokens, stop_ids)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        valid[:, width + step] = True
        if finished.float().mean() >= COMPACT_SHARE:
            keep = (~finished).nonzero().squeeze(-1)
            rows, tokens, next_position = rows[keep], tokens[keep], next_position[keep]
            valid, finished = valid[keep], finished[keep]
            cache.keep(keep)
        # Rows that finished but are not compacted yet decode a pad that is thrown away.
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        hidden = forward(w, cache, tokens[:, None], next_position[:, None], valid)
        next_position = next_position + 1
    return out
