"""The engine's fused C++ kernels (tether/fused_decode.cpp) against the ATen ops they replace,
the engine with and without them, and the fallback where they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tether.core.packing import pad_rows, position_ids_from_mask
from tether.fast import engine, fused
from tether.rollout.generation import encode_prompt


@pytest.fixture(scope="module")
def ops():
    kernels = fused.kernels()
    if kernels is None:
        pytest.skip("no C++ compiler here: the engine runs its ATen ops (tested elsewhere)")
    return kernels


DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_into_cache_rotates_as_hf_and_fills_only_its_slots(ops, dtype):
    torch.manual_seed(0)
    batch, steps, heads, kv_heads, dim, slots, start = 3, 4, 6, 2, 16, 12, 5
    qkv = torch.randn(batch, steps, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos, sin = torch.randn(2, batch, steps, dim, dtype=dtype)
    keys = torch.full((batch, kv_heads, slots, dim), 7.0, dtype=dtype)
    values = keys.clone()

    q = ops.rope_into_cache(qkv, cos, sin, keys, values, heads, start)

    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    expected_q = engine._rotate(q_ref.view(batch, steps, heads, dim).transpose(1, 2), c, s)
    expected_k = engine._rotate(k_ref.view(batch, steps, kv_heads, dim).transpose(1, 2), c, s)
    expected_v = v_ref.view(batch, steps, kv_heads, dim).transpose(1, 2)
    filled = slice(start, start + steps)
    assert torch.equal(q, expected_q)  # bit for bit: every product rounded as ATen rounds it
    assert torch.equal(keys[:, :, filled], expected_k)
    assert torch.equal(values[:, :, filled], expected_v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[filled] = False
    assert (keys[:, :, untouched] == 7).all() and (values[:, :, untouched] == 7).all()


def test_rotation_of_one_head_worked_by_hand(ops):
    # x = [1, 2, 3, 4]: rotate_half(x) = [-3, -4, 1, 2]; cos = 1/2, sin = 1/4:
    # out = x/2 + rotate_half(x)/4 = [0.5 - 0.75, 1 - 1, 1.5 + 0.25, 2 + 0.5]
    qkv = torch.tensor([[[1.0, 2, 3, 4, 0, 0, 0, 0, 9, 8, 7, 6]]])
    cos, sin = torch.full((1, 1, 4), 0.5), torch.full((1, 1, 4), 0.25)
    keys, values = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
    q = ops.rope_into_cache(qkv, cos, sin, keys, values, 1, 1)
    assert q.flatten().tolist() == [-0.25, 0.0, 1.75, 2.5]
    assert keys[0, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert values[0, 0].tolist() == [[0, 0, 0, 0], [9, 8, 7, 6]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_the_gate_times_up(ops, dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(5, 3, 2 * 96, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    out = ops.silu_mul(gate_up)
    expected = F.silu(gate) * up
    assert out.shape == (5, 3, 96)
    if dtype == torch.bfloat16:
        assert torch.equal(out, expected)
    else:  # its own exp: within a few float32 ulps
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
    worked = ops.silu_mul(torch.tensor([[0.0, 2.0, 3.0, 5.0]]))  # silu(0) = 0; silu(2) = 1.7616
    torch.testing.assert_close(worked, torch.tensor([[0.0, 2 / (1 + torch.e**-2) * 5]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_llamas_within_one_step_of_the_dtype(ops, dtype):
    torch.manual_seed(2)
    x = torch.randn(64, 2, 576, dtype=dtype) * 3
    weight = torch.randn(576, dtype=dtype)
    out = ops.rms_norm(x, weight, 1e-5)
    expected = engine._rms_norm(x, weight, 1e-5)
    exact = (
        weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    )
    if dtype == torch.bfloat16:
        # the float32 sum of squares runs in another order: a rare output moves one bf16 step
        step = expected.float().abs() * 2**-7
        assert ((out.float() - expected.float()).abs() <= step).all()
        assert (out == expected).float().mean() > 0.99
    else:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # as accurate as Llama's to within float32 rounding
    assert (out.double() - exact).abs().max() <= 2 * (expected.double() - exact).abs().max()
    by_hand = ops.rms_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0]), 0.0)
    # mean(x²) = 12.5: x / √12.5 = [0.8485, 1.1314], times the weights [1, 2]
    torch.testing.assert_close(by_hand, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]]))


def _attention_inputs(dtype, batch=5, heads=6, kv_heads=2, dim=32, slots=21, end=13):
    torch.manual_seed(3)
    q = torch.randn(batch, heads, 1, dim, dtype=dtype)
    keys = torch.randn(batch, kv_heads, slots, dim, dtype=dtype)
    values = torch.randn(batch, kv_heads, slots, dim, dtype=dtype)
    keys[:, :, end:] = values[:, :, end:] = 1e4  # slots not filled yet: must carry no weight
    bias = torch.full((batch, 1, 1, slots), -torch.inf)
    bias[..., :end] = 0.0
    bias[1, ..., :4] = -torch.inf  # a left-padded row
    bias[2, ..., end:] = 0.0  # a bias that wrongly shows unfilled slots: `end` still rules
    return q, keys, values, bias, end


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_decode_attention_is_as_accurate_as_the_eager_matmuls(ops, dtype, dim):
    q, keys, values, bias, end = _attention_inputs(dtype, dim=dim)
    out = ops.decode_attention(q, keys, values, bias.view(len(q), -1), end, dim**-0.5)
    visible = bias.clone()
    visible[..., end:] = -torch.inf
    exact = engine._decode_attention(q.double(), keys.double(), values.double(), visible, dim)
    eager = engine._decode_attention(q, keys, values, visible, dim)
    assert out.shape == q.shape and out.dtype == dtype
    # fp32 scores and one rounding of the weights, where the eager path rounds scores too
    assert (out.double() - exact).abs().max() <= 1.5 * (eager.double() - exact).abs().max()


def test_decode_attention_worked_by_hand(ops):
    # One head, D = 16, three slots filled of four, the first one padding. q = 4·ln3·e₀,
    # k₁ = 0, k₂ = e₀: the scores q·k/4 are [0, ln 3], the weights [1/4, 3/4], and the output
    # 4·1/4 + 8·3/4 = 7 in every lane.
    dim = 16
    q = torch.zeros(1, 1, 1, dim)
    q[..., 0] = 4 * torch.log(torch.tensor(3.0))
    keys, values = torch.zeros(2, 1, 1, 4, dim)
    keys[0, 0, 0] = 5.0  # padding: would dominate if it were seen
    keys[0, 0, 2, 0] = 1.0
    values[0, 0, 0] = 100.0
    values[0, 0, 1, :] = 4.0
    values[0, 0, 2, :] = 8.0
    values[0, 0, 3] = 1000.0  # not filled
    bias = torch.tensor([[-torch.inf, 0.0, 0.0, 0.0]])
    out = ops.decode_attention(q, keys, values, bias, 3, 0.25)
    torch.testing.assert_close(out, torch.full((1, 1, 1, dim), 7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_softmax_weights_are_the_samplers_and_their_block_sums(ops, dtype, temperature):
    torch.manual_seed(4)
    vocab = 2 * engine.DRAW_BLOCK + 300  # a last block only partly filled
    logits = (torch.randn(5, vocab) * 6).to(dtype)
    logits[1, 17] = -torch.inf  # a token the caller ruled out
    buffer = engine.draw_buffer(7, vocab)  # more rows than the batch, as after compaction
    sums = ops.softmax_weights(logits, buffer[:5], temperature)
    scaled = logits.float() / temperature
    expected = (scaled - scaled.amax(-1, keepdim=True)).exp()
    torch.testing.assert_close(buffer[:5, :vocab], expected, rtol=1e-6, atol=1e-30)
    assert buffer[1, 17] == 0
    assert (buffer[:, vocab:] == 0).all() and (buffer[5:] == 0).all()  # padding left alone
    blocks = buffer[:5].view(5, -1, engine.DRAW_BLOCK).double().sum(-1)
    torch.testing.assert_close(sums.double(), blocks, rtol=1e-5, atol=0)  # a float32 sum
    # by hand: logits [0, ln 2, ln 4] → weights e^(x − ln 4) = [1/4, 1/2, 1], block sum 7/4
    small = engine.draw_buffer(1, 3)
    small_sums = ops.softmax_weights(torch.tensor([[1.0, 2.0, 4.0]]).log(), small, 1.0)
    torch.testing.assert_close(small[0, :3], torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(small_sums, torch.tensor([[1.75]]))


def test_sampling_through_the_kernel_draws_the_tokens_the_aten_path_draws(ops):
    torch.manual_seed(5)
    logits = torch.randn(64, 49_152).to(torch.bfloat16) * 4
    uniforms = torch.rand(64)
    for temperature in (1.0, 0.6):
        args = (logits, temperature, 1.0, 0, None, uniforms)
        assert torch.equal(engine.sample(*args, kernels=ops), engine.sample(*args))


def test_kernels_reject_bad_input_with_the_reason(ops):
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.rms_norm(torch.randn(4, 8).t(), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.silu_mul(torch.randn(2, 8, dtype=torch.float64))
    q, keys, values, bias, end = _attention_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="head dimension must be 16, 32, 64 or 128, not 24"):
        ops.decode_attention(
            q[..., :24].contiguous(),
            *(t[..., :24].contiguous() for t in (keys, values)),
            bias.view(len(q), -1),
            end,
            1.0,
        )
    with pytest.raises(RuntimeError, match=r"end 22 out of 1\.\.21"):
        ops.decode_attention(q, keys, values, bias.view(len(q), -1), 22, 1.0)
    with pytest.raises(RuntimeError, match="bias has dtype"):
        ops.decode_attention(q, keys, values, bias.view(len(q), -1).bool(), end, 1.0)
    with pytest.raises(RuntimeError, match="rounded up to 1024"):
        ops.softmax_weights(torch.randn(2, 1500), torch.zeros(2, 1500), 1.0)
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        ops.softmax_weights(torch.randn(2, 100), torch.zeros(2, 1024), 0.0)
    keys = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="out of 4"):
        ops.rope_into_cache(
            torch.zeros(1, 2, 12), *torch.ones(2, 1, 2, 4), keys, keys.clone(), 1, 3
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_with_kernels_decodes_as_without(ops, tiny, dtype):
    model, tokenizer = tiny
    rows = [encode_prompt(tokenizer, p) for p in ["Hi", "Tell me about the sea.", "Why?"]]
    ids, mask = pad_rows(rows, 0, "left")
    results = []
    for use in (True, False):
        w = engine.Weights(model, dtype, fused=use)
        assert (w.kernels is not None) == use
        cache = engine.KVCache(w, len(rows), ids.shape[1] + 6)
        with torch.inference_mode():
            hidden = engine.forward(w, cache, ids, position_ids_from_mask(mask), mask.bool())
            greedy = engine.decode(
                w, rows, 0, [], max_new_tokens=6, temperature=0, top_p=1.0, top_k=0, generator=None
            )
        results.append((hidden, cache.keys[-1], cache.values[-1], greedy))
    (h1, k1, v1, g1), (h0, k0, v0, g0) = results
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(h1, h0, **tolerance)
    torch.testing.assert_close(k1, k0, **tolerance)
    torch.testing.assert_close(v1, v0, **tolerance)
    if dtype == torch.float32:
        assert g1 == g0


def test_switched_off_or_unbuildable_kernels_leave_the_aten_ops(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(fused.SWITCH, "0")
    assert fused.kernels.__wrapped__() is None
    monkeypatch.delenv(fused.SWITCH)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    assert fused.kernels.__wrapped__() is None
    assert "fused decode kernels unavailable" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.so"))  # a failed build leaves nothing to load later
    with pytest.raises(RuntimeError, match=r"compiling fused_decode\.cpp failed"):
        fused.build()
