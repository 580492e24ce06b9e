"""Decoding with fixed shapes and no host sync: the rollout engine's path for a GPU.

On a GPU a small model's decode step is a few hundred small kernels, and what bounds it is
launching them and waiting on the host, not the arithmetic. So every tensor of the loop has
one shape for the whole decode and lives on the device:

- the KV cache is allocated once, [B, Hkv, prompt + max_new_tokens, D] per layer;
- finished rows keep decoding (a pad, thrown away) instead of being compacted out;
- positions, the attention bias over the cache, the step and the finished flags are device
  tensors, and the cache slot is written with `index_copy_` at a tensor index;
- every random draw is made before the loop (per-row generators where `row_seeds` are
  given, as the CPU engine draws them), so the loop draws nothing;
- the host looks at the finished flags only every `check_every` steps.

One decode step is then a fixed sequence of kernels, which a CUDA graph captures once per
call and replays every step. Batches are padded to a multiple of BUCKET rows, so a run sees
few distinct shapes. On a CPU the same loop runs eagerly (that is what the tests check:
tests/test_static_decode.py); the CPU engine (`tether.fast.engine.decode`), which compacts
finished rows and uses the fused kernels, stays the faster choice there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tether.console import warn
from tether.core.packing import distinct_rows, through_first_stop
from tether.fast.engine import Weights, _decode_attention, _rms_norm, _rotate, prefill

# Rows are padded to a multiple of this: one captured shape serves every batch in a bucket.
BUCKET = 16
# Steps between looks at the finished flags (each look waits for the device).
CHECK_EVERY = 8


def bucket_rows(rows: int, bucket: int = BUCKET) -> int:
    return -(-rows // bucket) * bucket


@dataclass
class DecodeState:
    """The loop's tensors, each of one shape for the whole decode (what a graph reads)."""

    hidden: torch.Tensor  # [B, hidden] the last position's final state
    positions: torch.Tensor  # [B] the next token's position
    bias: torch.Tensor  # [B, 1, 1, T] 0 where a key is visible, -inf elsewhere
    step: torch.Tensor  # [1] long
    finished: torch.Tensor  # [B] bool
    tokens: torch.Tensor  # [B, max_new] long, pad after a row's stop
    uniforms: torch.Tensor  # [B, max_new] float32 in [0, 1)

    def snapshot(self) -> DecodeState:
        return DecodeState(*(t.clone() for t in vars(self).values()))

    def restore(self, saved: DecodeState) -> None:
        for mine, theirs in zip(vars(self).values(), vars(saved).values(), strict=True):
            mine.copy_(theirs)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax at temperature 0, else the inverse CDF of
    softmax(logits / T) at `uniforms` [B] (the full distribution: what the trainer's
    log-probs are computed on). The target stays below the total, so rounding cannot pick
    an entry past the end."""
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[1] - 1)


def forward_token(
    w: Weights,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    bias: torch.Tensor,
    slot: torch.Tensor,
) -> torch.Tensor:
    """One token per row [B] at `positions` [B] through the model, its keys and values
    written at cache slot `slot` ([1], a tensor: the same kernels at every step). Returns
    the final hidden state [B, hidden]."""
    batch = tokens.shape[0]
    x = F.embedding(tokens[:, None], w.embed)
    cos, sin = w.rotary(x, positions[:, None])
    cos, sin = cos.unsqueeze(1).to(w.dtype), sin.unsqueeze(1).to(w.dtype)
    q_size, kv_size = w.heads * w.head_dim, w.kv_heads * w.head_dim
    for i, layer in enumerate(w.layers):
        h = _rms_norm(x, layer.ln1, w.eps)
        q, k, v = layer.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
        q = _rotate(q.view(batch, 1, w.heads, w.head_dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(batch, 1, w.kv_heads, w.head_dim).transpose(1, 2), cos, sin)
        keys[i].index_copy_(2, slot, k)
        values[i].index_copy_(2, slot, v.view(batch, 1, w.kv_heads, w.head_dim).transpose(1, 2))
        attn = _decode_attention(q, keys[i], values[i], bias, w.head_dim)
        x = x + layer.o(attn.transpose(1, 2).reshape(batch, 1, q_size))
        gate, up = layer.gate_up(_rms_norm(x, layer.ln2, w.eps)).chunk(2, dim=-1)
        x = x + layer.down(F.silu(gate) * up)
    return _rms_norm(x[:, -1], w.norm, w.eps)


def draw_uniforms(
    rows: int,
    max_new_tokens: int,
    generator: torch.Generator | None,
    row_seeds: Sequence[int] | None,
) -> torch.Tensor:
    """[rows, max_new_tokens] uniforms, drawn on the CPU as the CPU engine draws them: row i
    from its own generator seeded with row_seeds[i] where given (its sample then does not
    depend on the batch it falls in), else all from `generator` (or the global RNG)."""
    if row_seeds is None:
        return torch.rand(rows, max_new_tokens, generator=generator)
    return torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s)) for s in row_seeds]
    )


@torch.inference_mode()
def decode_static(
    w: Weights,
    prompt_rows: list[list[int]],
    pad_id: int,
    stops: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator | None = None,
    row_seeds: Sequence[int] | None = None,
    check_every: int = CHECK_EVERY,
    graph: bool | None = None,
    bucket: int = BUCKET,
) -> list[list[int]]:
    """Response token ids per prompt row (through the first stop token, if any), as
    `tether.fast.engine.decode` returns them. `graph`: capture the step as a CUDA graph
    (None: on a CUDA device); a capture that fails falls back to running the step as it is.
    """
    batch, device = len(prompt_rows), w.device
    rows = bucket_rows(batch, bucket)
    padded = prompt_rows + [prompt_rows[0]] * (rows - batch)  # extra rows: thrown away
    uniforms = draw_uniforms(batch, max_new_tokens, generator, row_seeds)
    uniforms = torch.cat([uniforms, uniforms[:1].expand(rows - batch, -1)])

    # Each distinct prompt is prefilled once, then its cache rows are copied to its rows.
    distinct, group_of_row = distinct_rows([tuple(p) for p in padded])
    cache, hidden, valid, next_position = prefill(
        w, [padded[i] for i in distinct], pad_id, max_new_tokens
    )
    of_row = group_of_row.to(device)
    keys = [k.index_select(0, of_row) for k in cache.keys]
    values = [v.index_select(0, of_row) for v in cache.values]
    width = valid.shape[1] - max_new_tokens
    zero = torch.zeros((), device=device)
    state = DecodeState(
        hidden=hidden.index_select(0, of_row),
        positions=next_position.index_select(0, of_row),
        bias=torch.where(valid.index_select(0, of_row), zero, -torch.inf)[:, None, None, :],
        step=torch.zeros(1, dtype=torch.long, device=device),
        finished=torch.zeros(rows, dtype=torch.bool, device=device),
        tokens=torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device),
        uniforms=uniforms.to(device),
    )
    stop_ids = torch.tensor(stops or [-1], device=device)
    del cache  # its rows live on in keys/values

    def step() -> None:
        s = state
        logits = w.lm_head(s.hidden)
        drawn = sample_tokens(logits, s.uniforms.index_select(1, s.step).squeeze(1), temperature)
        kept = torch.where(s.finished, pad_id, drawn)
        s.tokens.index_copy_(1, s.step, kept[:, None])
        s.finished |= torch.isin(drawn, stop_ids)
        slot = s.step + width
        s.bias.index_fill_(3, slot, 0.0)
        fed = torch.where(s.finished, pad_id, drawn)
        s.hidden.copy_(forward_token(w, keys, values, fed, s.positions, s.bias, slot))
        s.positions.add_(1)
        s.step.add_(1)

    run = _captured(step, state) if _use_graph(graph, device) else step
    for done in range(1, max_new_tokens + 1):
        run()
        if done % check_every == 0 and done < max_new_tokens and bool(state.finished.all()):
            break
    out = state.tokens[:batch].tolist()
    return [through_first_stop(row, stops) for row in out]


def _use_graph(graph: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if graph is None else graph


def _captured(step: Callable[[], None], state: DecodeState) -> Callable[[], None]:
    """`step` captured as a CUDA graph (after warm-up runs on a side stream, whose effects on
    the state are undone), or `step` itself where capture fails."""
    saved = state.snapshot()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        state.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        state.restore(saved)  # capture records the kernels; restore in case any ran
    except Exception as e:  # a model whose step cannot be captured still decodes
        warn(f"warning: the decode step is not captured as a CUDA graph ({e}); runs eagerly")
        state.restore(saved)
        return step
    return graph.replay
