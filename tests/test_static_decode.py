"""The fixed-shape decode loop (the GPU's rollout path), run on the CPU: greedy tokens equal
Hugging Face `generate`'s, each sampled token is the inverse CDF of the teacher-forced
softmax(logits / T) at its row's uniform, stops, padding, shared prompts and buckets."""

import math

import pytest
import torch
from conftest import greedy_rows_with_a_stop

from tether.fast import engine
from tether.fast.static_decode import bucket_rows, decode_static, draw_uniforms, sample_tokens
from tether.rollout.generation import encode_prompt, generate

PROMPTS = ["Hi", "Tell me about the sea and the sky.", "Why?", "Hi"]  # "Hi" twice: shared


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def test_sample_tokens_inverts_the_cdf_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]] * 3)  # softmax: [0.25, 0.75]
    assert sample_tokens(logits, torch.tensor([0.2, 0.3, 0.9999]), 1.0).tolist() == [0, 1, 1]
    assert sample_tokens(logits, torch.tensor([0.2, 0.3, 0.9]), 0.0).tolist() == [1, 1, 1]
    # T = 2: softmax(logits / 2) = [1, √3] / (1 + √3) = [0.366, 0.634]
    assert sample_tokens(logits, torch.tensor([0.36, 0.37, 0.5]), 2.0).tolist() == [0, 1, 1]


def test_greedy_tokens_equal_hf_generate_prompt_by_prompt(tiny):
    model, tokenizer = tiny
    out = generate(
        model, tokenizer, PROMPTS, max_new_tokens=7, temperature=0, engine="static",
        dtype=torch.float32,
    )  # fmt: skip
    for prompt, response in zip(PROMPTS, out.response_ids, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        alone = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0)
        assert response == alone[0, ids.shape[1] :].tolist()[: len(response)]
    assert out.sync_s > 0  # the weight export is timed


def test_each_sampled_token_is_the_teacher_forced_inverse_cdf(tiny):
    """With the row's uniforms known, every token must be the one that softmax(logits / T)
    of a full, teacher-forced pass over prompt + response so far gives at that uniform: the
    loop samples the distribution the trainer computes log-probs on."""
    model, tokenizer = tiny
    rows = [encode_prompt(tokenizer, p) for p in PROMPTS]
    seeds, temperature, steps = [11, 12, 13, 14], 0.7, 6
    decoded = decode_static(
        engine.Weights(model, torch.float32, pack=False, fused=False),
        rows, 0, [], max_new_tokens=steps, temperature=temperature, row_seeds=seeds,
    )  # fmt: skip
    uniforms = draw_uniforms(len(rows), steps, None, seeds)
    for i, (prompt, response) in enumerate(zip(rows, decoded, strict=True)):
        assert len(response) == steps
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        expected = sample_tokens(logits, uniforms[i], temperature)
        assert response == expected.tolist()


def test_a_rows_sample_does_not_depend_on_its_batch(tiny):
    model, tokenizer = tiny
    w = engine.Weights(model, torch.float32, pack=False, fused=False)
    rows = [encode_prompt(tokenizer, p) for p in PROMPTS]
    together = decode_static(
        w, rows, 0, [], max_new_tokens=5, temperature=1.0, row_seeds=[1, 2, 3, 4]
    )
    alone = decode_static(w, rows[1:2], 0, [], max_new_tokens=5, temperature=1.0, row_seeds=[2])
    assert alone[0] == together[1]
    assert together[0] != together[3]  # the same prompt, other seeds: other samples


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_rows_stop_at_their_stop_token_however_often_the_host_looks(peaked_model_dir, check_every):
    model, rows, stop, expected = greedy_rows_with_a_stop(peaked_model_dir)
    decoded = decode_static(
        engine.Weights(model, torch.float32, pack=False, fused=False),
        rows, 0, [stop], max_new_tokens=10, temperature=0, check_every=check_every,
    )  # fmt: skip
    assert decoded == expected


def test_batches_pad_to_a_bucket():
    assert [bucket_rows(n) for n in (1, 16, 17, 64, 250)] == [16, 16, 32, 64, 256]


def test_the_cpu_engine_is_still_the_cpus_choice(tiny):
    model, _ = tiny
    assert engine.supports(model) and engine.fits_layout(model)
