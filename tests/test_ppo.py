"""PPO on a tiny real Llama: rollout layout, learning, the effect of β, LoRA reference, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import backbone_inputs, greedy_rows_with_a_stop
from test_sft import run_cli

from tether.config import ConfigError, PPOConfig, load_config
from tether.fast.engine import can_pack
from tether.runs.rundir import read_metrics
from tether.stages.ppo import run_ppo

TIMING_KEYS = {
    "throughput/tokens_per_s",
    "time/step_s",
    "time/rollout_s",
    "time/train_s",
    "time/sync_s",
}


def ppo_overrides(model_dir, files, *extra) -> list[str]:
    prompts, reward = files
    return [
        f"model.name={model_dir}",
        f"data.train={prompts}",
        f"reward.terms=[{{name: '{reward}:vowel_share'}}]",
        "rollout.max_new_tokens=8",
        "rollout.missing_eos=none",  # a random model never says EOS: the penalty is a constant
        "train.batch_size=10",
        "train.threads=1",
        "train.precision=fp32",
        "train.save_every=0",
        "optim.lr=0.01",
        "optim.schedule=constant",
        "ppo.ppo_epochs=2",
        *extra,
    ]


def ppo_config(model_dir, files, *extra) -> PPOConfig:
    return load_config(PPOConfig, None, ppo_overrides(model_dir, files, *extra))


def series(run_dir: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------- rollout layout


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def test_response_logprobs_match_an_unpadded_full_forward(tiny):
    from tether.rollout.passes import build_batch, sequence_logprobs_of

    model, _ = tiny
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    responses = [[21, 22], [23, 24, 25, 26], [27]]
    batch = build_batch(prompts, responses, pad_id=0)
    assert batch.prompt_width == 5 and batch.response_mask.tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
    ]
    with torch.no_grad():
        batched = sequence_logprobs_of(model, batch, temperature=0.7)
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            logits = model(torch.tensor([p + r])).logits[0] / 0.7
            logp = torch.log_softmax(logits, -1)
            expected = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(r)])
            assert torch.allclose(batched[row, : len(r)], expected, atol=1e-5), row


def assert_same_as_row_by_row(model, batch, logprobs, prompts, responses) -> None:
    """`logprobs` of `batch` (at T = 0.7, with their graph) are each row's own full pass,
    in value and in the gradient of their sum (up to float32 rounding)."""
    from tether.rollout.passes import build_batch, sequence_logprobs_of

    logprobs[batch.response_mask.bool()].sum().backward()
    batched_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        alone = sequence_logprobs_of(model, build_batch([p], [r], pad_id=0), temperature=0.7)
        assert torch.allclose(logprobs[row, : len(r)], alone[0], atol=1e-5), row
        alone[0].sum().backward()
    for p, g in zip(model.parameters(), batched_grads, strict=True):
        assert (g - p.grad).abs().max() <= 5e-5 * p.grad.abs().max()


def test_rows_that_share_a_prompt_run_it_once_with_the_same_logprobs_and_gradients(tiny):
    """k samples of a prompt (GRPO/RLOO groups): the prompt runs once for its rows, and the
    response log-probs and their gradients are those of a full pass per row."""
    from transformers import AutoModelForCausalLM

    from tether.rollout.passes import build_batch, response_hidden, sequence_logprobs_of

    model, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    long_prompt, short_prompt = list(range(30, 60)), [11, 12]
    prompts = [long_prompt] * 3 + [short_prompt] * 2
    responses = [[21, 22], [23, 24, 25, 26], [27], [28, 29, 30], [31]]
    batch = build_batch(prompts, responses, pad_id=0)
    with backbone_inputs(model) as seen:
        grouped = sequence_logprobs_of(model, batch, temperature=0.7)
    assert sum(x.numel() for x in seen) == 2 * 30 + 5 * 3  # two prompts once, then the answers
    assert_same_as_row_by_row(model, batch, grouped, prompts, responses)
    # one response token each: the prompt pass alone gives every state
    single = build_batch([short_prompt] * 2, [[40], [41]], pad_id=0)
    assert response_hidden(model, single).shape[:2] == (2, 1)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_rows_that_share_a_prompt_run_packed_with_the_same_logprobs_and_gradients(
    tiny, checkpointed
):
    """With tether's attention, rows that share a prompt run in one packed row without
    padding (each prompt once, then each response but its last token), under gradient
    checkpointing too, and keep each row's own log-probs and gradients."""
    from transformers import AutoModelForCausalLM

    from tether.models.attention import use_grouped_flash_attention
    from tether.rollout.passes import build_batch, sequence_logprobs_of

    model, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(
        model.name_or_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    use_grouped_flash_attention(model)
    if checkpointed:
        model.gradient_checkpointing_enable()
        model.train()
    long_prompt, short_prompt = list(range(30, 60)), [11, 12]
    prompts = [long_prompt, short_prompt, long_prompt, short_prompt, long_prompt]
    responses = [[21, 22], [28, 29, 30], [21, 24, 25, 26], [31], list(range(100, 140))]
    batch = build_batch(prompts, responses, pad_id=0)
    with backbone_inputs(model) as seen:
        packed = sequence_logprobs_of(model, batch, temperature=0.7)
    # the long prompt once, then the responses but their last tokens: 30 + 1 + 3 + 39; the
    # short one: its first token once, its last token with each row's own (every row keeps
    # a token of its own): 1 + 3 + 1
    assert [tuple(x) for x in seen] == [(1, 73 + 5)]
    assert_same_as_row_by_row(model, batch, packed, prompts, responses)


def test_prompts_that_open_alike_run_the_opening_once(tiny):
    """Distinct prompts with a common opening (a system prompt, an instruction): the opening
    runs once for all rows, and log-probs and gradients are those of a full pass per row."""
    from transformers import AutoModelForCausalLM

    from tether.rollout.passes import build_batch, common_prompt_opening, sequence_logprobs_of

    model, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    opening = list(range(100, 125))
    prompts = [[*opening, 5], [*opening, 6, 7, 8], [*opening, 9, 9]]
    responses = [[21, 22], [23, 24, 25, 26], [27]]
    batch = build_batch(prompts, responses, pad_id=0)
    assert common_prompt_opening(batch) == 25
    assert common_prompt_opening(build_batch([[1, 2, 3], [1, 2, 3, 4]], [[5], [5]], 0)) == 2
    assert common_prompt_opening(build_batch([[1, 2, 3], [9, 1, 2]], [[5], [5]], 0)) == 0
    with backbone_inputs(model) as seen:
        shared = sequence_logprobs_of(model, batch, temperature=0.7)
    assert sum(x.numel() for x in seen) == 25 + 3 * (batch.ids.shape[1] - 25)
    assert_same_as_row_by_row(model, batch, shared, prompts, responses)


@pytest.mark.parametrize("shared_prompts", [True, False])
def test_rows_in_length_buckets_have_the_logprobs_and_gradients_of_full_passes(
    tiny, shared_prompts
):
    """Short and long responses in one batch run in buckets, each padded to its own longest
    response only; log-probs and gradients are still those of a full pass per row."""
    from transformers import AutoModelForCausalLM

    from tether.rollout.passes import build_batch, sequence_logprobs_of

    model, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32)
    long_answer, short_answer = list(range(200, 250)), [21]
    if shared_prompts:
        prompts = [[5, 6, 7, 8]] * 2 + [[11, 12]] * 2
    else:
        prompts = [[5, 6, 7, 8], [11, 12], [13, 14, 15], [16]]
    responses = [short_answer, long_answer, long_answer[:48], [22, 23]]
    batch = build_batch(prompts, responses, pad_id=0)
    with backbone_inputs(model) as seen:
        bucketed = sequence_logprobs_of(model, batch, temperature=0.7)
    answers_run = sum(x.numel() for x in seen) - (2 * 4 if shared_prompts else 0)
    assert answers_run < 4 * 50  # well under every row padded to the longest
    assert_same_as_row_by_row(model, batch, bucketed, prompts, responses)
    # a minibatch of the short rows keeps the rollout's width
    minibatch = batch.rows([0, 3])
    assert sequence_logprobs_of(model, minibatch, 0.7).shape == minibatch.response_mask.shape


@pytest.mark.parametrize("checkpointing", [False, True])
def test_passes_from_the_trunk_are_whole_passes_without_the_lower_layers(
    tiny_model_dir, checkpointing
):
    """With adapters on the upper layer only, the lower layer runs once for the batch
    (`with_trunk`); the policy's and π_ref's log-probs and the adapters' gradients from it are
    those of whole passes, with gradient checkpointing too, and other models ignore it."""
    from tether.config import LoraConfig, ModelConfig
    from tether.models.loading import load_causal_lm, load_tokenizer
    from tether.rollout.passes import build_batch, sequence_logprobs_of, with_trunk

    tokenizer = load_tokenizer(str(tiny_model_dir))
    lora = LoraConfig(enabled=True, r=4, alpha=8, top_layers=1)
    model = ModelConfig(name=str(tiny_model_dir), lora=lora, gradient_checkpointing=checkpointing)
    policy = load_causal_lm(model, tokenizer).train()  # checkpointing acts in train mode only
    torch.manual_seed(1)
    with torch.no_grad():  # adapters that change the policy (peft starts them at 0)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [11, 12], [13, 14, 15]]
    responses = [[21, 22], [23, 24, 25, 26], [27], list(range(30, 42))]
    batch = build_batch(prompts, responses, pad_id=0)
    lower = policy.get_base_model().model.layers[0]
    calls = []
    lower.register_forward_hook(lambda *_: calls.append(1))

    trunked = with_trunk(policy, batch)
    assert trunked.trunk is not None and trunked.trunk.depth == 1 and len(calls) == 1
    from_trunk = sequence_logprobs_of(policy, trunked, 0.7)
    with policy.disable_adapter(), torch.no_grad():
        reference_from_trunk = sequence_logprobs_of(policy, trunked, 0.7)
        reference = sequence_logprobs_of(policy, batch, 0.7)
    assert len(calls) == 2  # the trunk's own call and the whole π_ref pass alone
    whole = sequence_logprobs_of(policy, batch, 0.7)
    real = batch.response_mask.bool()
    assert not torch.allclose(whole[real], reference[real], atol=1e-3)  # the adapters act
    assert torch.allclose(from_trunk, whole, atol=1e-5)
    assert torch.allclose(reference_from_trunk, reference, atol=1e-5)
    minibatch = [3, 1]
    assert torch.allclose(
        sequence_logprobs_of(policy, trunked.rows(minibatch), 0.7), whole[minibatch], atol=1e-5
    )

    adapters = [p for p in policy.parameters() if p.requires_grad]
    grads_from_trunk = torch.autograd.grad(from_trunk[real].sum(), adapters)
    grads_whole = torch.autograd.grad(whole[real].sum(), adapters)
    for g, expected in zip(grads_from_trunk, grads_whole, strict=True):
        assert (g - expected).abs().max() <= 1e-5 * expected.abs().max()

    other = load_causal_lm(ModelConfig(name=str(tiny_model_dir)), tokenizer)  # all trainable
    assert with_trunk(other, batch).trunk is None  # nothing beneath to freeze
    with torch.no_grad():
        assert torch.equal(
            sequence_logprobs_of(other, trunked, 0.7), sequence_logprobs_of(other, batch, 0.7)
        )


@pytest.mark.parametrize("sliding", [False, True])
def test_no_trunk_under_layers_of_mixed_attention_types(sliding):
    """Qwen2 with a sliding window on its upper layers picks each layer's mask by its place in
    the layer list, so a list cut at the trunk would give them the lower layers' masks: such a
    model runs its passes whole."""
    from transformers import Qwen2Config, Qwen2Model

    from tether.models.trunk import frozen_depth

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=sliding,
        sliding_window=8,
        max_window_layers=1,
    )
    backbone = Qwen2Model(config)
    for name, p in backbone.named_parameters():
        p.requires_grad = name.startswith("layers.2.")  # the top layer trains
    assert len(set(config.layer_types)) == (2 if sliding else 1)
    assert frozen_depth(backbone) == (0 if sliding else 2)


@pytest.mark.parametrize("engine", ["hf", "auto"])
def test_greedy_generate_matches_hf_generate_prompt_by_prompt(tiny, engine):
    from tether.rollout.generation import encode_prompt, generate

    model, tokenizer = tiny
    prompts = ["Hi", "Tell me about the sea and the sky.", "Why?"]
    out = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=6,
        temperature=0,
        engine=engine,
        dtype=torch.float32,
    )
    for prompt, response in zip(prompts, out.response_ids, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        alone = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert response == alone[0, ids.shape[1] :].tolist()[: len(response)]
    assert out.ended == [False] * 3 and all(len(r) == 6 for r in out.response_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_packed_weights_compute_the_same_linears_and_states(tiny, dtype):
    from tether.core.packing import pad_rows, position_ids_from_mask
    from tether.fast import engine
    from tether.hardware import bf16_available
    from tether.rollout.generation import encode_prompt

    if not can_pack(dtype, torch.device("cpu")):
        pytest.skip("no oneDNN in this torch build")
    if dtype == torch.bfloat16 and not bf16_available():
        pytest.skip("the engine runs bf16 only where the CPU has it")
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 40, dtype=dtype), torch.randn(96, dtype=dtype)
    packed = engine.Linear(weight, bias, pack=True)
    for shape in [(1, 40), (5, 40), (64, 40), (3, 100, 40)]:  # any row count, any batch dims
        x = torch.randn(shape, dtype=dtype)
        torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, weight, bias))

    model, tokenizer = tiny
    rows = [encode_prompt(tokenizer, p) for p in ["Hi", "Tell me about the sea."]]
    ids, mask = pad_rows(rows, 0, "left")
    states = []
    for pack in (True, False):
        w = engine.Weights(model, dtype, pack=pack)
        assert all(layer.qkv.packed == pack for layer in w.layers) and w.lm_head.packed == pack
        cache = engine.KVCache(w, 2, ids.shape[1])
        with torch.inference_mode():
            hidden = engine.forward(w, cache, ids, position_ids_from_mask(mask), mask.bool())
            states.append((hidden, w.lm_head(hidden)))
    torch.testing.assert_close(states[0], states[1])


def test_engine_keeps_frozen_layers_exports_until_their_weights_change(tiny_model_dir):
    """A LoRA policy with adapters on its top layer: the frozen layers' exported weights are
    reused by the next rollout, the adapted layer's are made anew (its adapters train), and an
    in-place update of a frozen weight (an optimiser step, a loaded checkpoint) is seen."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tether.fast import engine

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    top = base.config.num_hidden_layers - 1
    lora = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[top])
    policy = get_peft_model(base, lora)
    first, second = (engine.Weights(policy, torch.bfloat16) for _ in range(2))
    kept = [
        (a.qkv is b.qkv, a.o is b.o, a.down is b.down)
        for a, b in zip(first.layers, second.layers, strict=True)
    ]
    assert kept[:top] == [(True, True, True)] * top
    assert kept[top] == (False, True, False)  # q and down carry adapters; o does not
    assert second.embed is first.embed and second.lm_head is first.lm_head

    q = base.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q.add_(1.0)
    third = engine.Weights(policy, torch.bfloat16)
    assert third.layers[0].qkv is not second.layers[0].qkv
    assert third.layers[0].o is second.layers[0].o
    x = torch.randn(3, q.shape[1], dtype=torch.bfloat16)
    torch.testing.assert_close(third.layers[0].qkv(x)[:, : q.shape[0]], x @ q.bfloat16().T)

    trained = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    a, b = (engine.Weights(trained, torch.bfloat16) for _ in range(2))  # weights that train
    assert a.layers[0].qkv is not b.layers[0].qkv and a.lm_head is not b.lm_head


def test_engine_stops_rows_at_their_stop_token_and_compacts_the_rest(peaked_model_dir):
    """A stop token that ends one row early (a third of the batch finishes, so the cache is
    compacted); every row must decode exactly as Hugging Face does alone, cut at the stop."""
    from tether.fast import engine

    model, rows, stop, expected = greedy_rows_with_a_stop(peaked_model_dir)
    decoded = engine.decode(
        engine.Weights(model, torch.float32),
        rows,
        0,
        [stop],
        max_new_tokens=10,
        temperature=0,
        top_p=1.0,
        top_k=0,
        generator=None,
    )
    assert decoded == expected
    assert any(len(e) < 10 for e in expected)  # somebody did stop early


def test_shared_opening_is_prefilled_alone_only_where_it_saves_enough_tokens():
    from tether.fast.engine import shared_opening

    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]
    assert shared_opening(rows, min_saved=4) == 2  # [1, 2]: then 3, 3, 9
    assert shared_opening(rows, min_saved=5) == 0  # 2 tokens × 2 other rows save 4 < 5
    assert shared_opening([[1, 2], [1, 2, 3]], min_saved=1) == 1  # [1, 2] keeps its last token
    assert shared_opening([[1, 2, 3]], min_saved=1) == 0  # nobody to share it with
    assert shared_opening([[1, 2], [3, 2]], min_saved=0) == 0  # nothing in common


def test_engine_prefills_a_shared_opening_once_and_decodes_each_row_as_alone(tiny, monkeypatch):
    """Prompts that open alike (a chat template's system turn), one of them twice: the
    opening runs once in a row of its own, then each distinct prompt's rest, and every row
    still decodes greedily as Hugging Face does with the row alone."""
    from tether.fast import engine

    model, _ = tiny
    weights = engine.Weights(model, torch.float32)
    opening = list(range(30, 50))
    calls = []
    forward = engine.forward

    def recording(w, cache, ids, positions, key_mask):
        calls.append((tuple(ids.shape), positions.tolist()))
        return forward(w, cache, ids, positions, key_mask)

    monkeypatch.setattr(engine, "forward", recording)

    def decode_and_check(tails: list[list[int]]) -> None:
        rows = [opening + tail for tail in tails]
        assert engine.shared_opening(rows[:3]) == len(opening)
        alone = []
        for r in rows:
            out = model.generate(
                torch.tensor([r]), max_new_tokens=5, do_sample=False, pad_token_id=0
            )
            alone.append(out[0, len(r) :].tolist())
        calls.clear()
        decoded = engine.decode(
            weights,
            rows,
            0,
            [],
            max_new_tokens=5,
            temperature=0,
            top_p=1.0,
            top_k=0,
            generator=None,
        )
        assert decoded == alone

    decode_and_check([[7], [8], [9], [8]])  # rests of one token: a decode-sized block
    assert calls[1] == ((3, 1), [[20], [20], [20]])
    decode_and_check([[7], [8, 9, 10, 11], [12, 13], [8, 9, 10, 11]])
    assert calls[0] == ((1, 20), [list(range(20))])
    # then the three distinct rests, left-padded, their positions going on from the opening
    # (a padding slot repeats the last real position; no query sees its key)
    assert calls[1] == ((3, 4), [[19, 19, 19, 20], [20, 21, 22, 23], [19, 19, 20, 21]])
    assert calls[2][0] == (4, 1) and [p[0] for p in calls[2][1]] == [21, 24, 22, 24]


def test_engine_draw_inverts_the_cumulative_weights_across_blocks():
    """Weights 1 at index 0, 0 up to 1,030 (the second block), 2 at 1,030 and 1 at the last
    index 2,047: Σ = 4, so u·4 in [0, 1) → 0, [1, 3) → 1,030, [3, 4) → 2,047. A draw must
    never land on a zero-weight entry, u = 0 and u just below 1 included."""
    from tether.fast.engine import DRAW_BLOCK, draw

    weights = torch.zeros(1, 2 * DRAW_BLOCK)
    weights[0, 0], weights[0, 1030], weights[0, 2047] = 1.0, 2.0, 1.0
    uniforms = torch.tensor([0.0, 0.2, 0.25, 0.5, 0.74, 0.75, 0.9, 1 - 2**-24])
    tokens = draw(weights.expand(len(uniforms), -1).contiguous(), uniforms)
    assert tokens.tolist() == [0, 0, 1030, 1030, 1030, 2047, 2047, 2047]


def test_engine_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    from tether.fast.engine import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    top_k = sample(logits, 1.0, 1.0, 2, gen)
    assert set(top_k.tolist()) == {0, 1}
    assert abs((top_k == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised
    top_p = sample(logits, 1.0, 0.7, 0, gen)  # 0.5 < 0.7: the 0.3 token crosses and stays
    assert set(top_p.tolist()) == {0, 1}
    assert set(sample(logits, 1.0, 1.0, 0, gen).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("engine", ["hf", "auto"])
def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(tiny, engine):
    from tether.rollout.generation import generate

    model, tokenizer = tiny
    state = torch.get_rng_state()
    a = generate(model, tokenizer, ["Hi", "Yo"], max_new_tokens=5, seed=3, engine=engine)
    b = generate(model, tokenizer, ["Hi", "Yo"], max_new_tokens=5, seed=3, engine=engine)
    assert a.response_ids == b.response_ids
    assert torch.equal(torch.get_rng_state(), state)


def test_row_seeded_samples_do_not_depend_on_the_batch(peaked_model_dir, monkeypatch):
    """With row_seeds a row's answer is a function of its seed alone: decoded in one batch of
    6, in chunks of 2, or alone (as on the ranks of a torchrun job), it is the same. The
    answers still differ from row to row (the seeds are not all alike). A batch prefills
    each of its distinct prompts once."""
    from transformers import AutoModelForCausalLM

    from tether.fast import engine
    from tether.models.loading import load_tokenizer
    from tether.rollout.generation import generate
    from tether.stages.ppo import row_seed

    tokenizer = load_tokenizer(str(peaked_model_dir))
    model = AutoModelForCausalLM.from_pretrained(peaked_model_dir).eval()
    prompts = ["Write about cats.", "Write about tea."] * 3
    seeds = [row_seed(0, 1, r) for r in range(len(prompts))]

    def answers(batch_size: int, rows: slice = slice(None)) -> list[list[int]]:
        return generate(
            model,
            tokenizer,
            prompts[rows],
            max_new_tokens=8,
            batch_size=batch_size,
            row_seeds=seeds[rows],
        ).response_ids

    prefill_rows = []
    real_forward = engine.forward

    def spy(w, cache, ids, *rest):
        if ids.shape[1] > 1:
            prefill_rows.append(ids.shape[0])
        return real_forward(w, cache, ids, *rest)

    monkeypatch.setattr(engine, "forward", spy)
    whole = answers(6)
    assert prefill_rows == [2]  # 6 rows, 2 distinct prompts
    assert answers(2) == whole
    assert [answers(1, slice(i, i + 1))[0] for i in range(6)] == whole
    assert len({tuple(a) for a in whole}) > 2


def test_sampling_ignores_the_models_own_generation_defaults(tiny):
    """A repetition penalty (or top_k, min_p...) in generation_config.json would change the
    distribution sampled from; tether's samples must follow the plain softmax it scores."""
    from tether.rollout.generation import encode_prompt, generate

    model, tokenizer = tiny
    ids = torch.tensor([encode_prompt(tokenizer, "Hi")])
    plain = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.top_k = 3
    try:
        penalised = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        ours = generate(model, tokenizer, ["Hi"], max_new_tokens=8, temperature=0, engine="hf")
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.top_k = 50
    assert not torch.equal(plain, penalised)  # the setting does bite in plain HF
    assert ours.response_ids[0] == plain[0, ids.shape[1] :].tolist()
    assert model.generation_config.repetition_penalty == 1.0  # restored, not overwritten


def test_a_response_ends_at_any_of_the_models_stop_tokens(tiny):
    from tether.core.packing import through_first_stop
    from tether.rollout.generation import stop_token_ids

    model, tokenizer = tiny
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    try:
        stops = stop_token_ids(model, tokenizer)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert stops == sorted({tokenizer.eos_token_id, 7})
    assert through_first_stop([5, 6, 7, 8, tokenizer.eos_token_id], stops) == [5, 6, 7]
    assert through_first_stop([5, 6], stops) == [5, 6]


def test_dropout_is_off_in_rl_models(tiny_model_dir, ppo_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer
    from tether.rollout.actor_critic import load_actor_critic

    noisy = tmp_path / "noisy"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    model.save_pretrained(noisy)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(noisy)
    cfg = ppo_config(noisy, ppo_files, "model.lora.enabled=true", "model.lora.dropout=0.3")
    ac, _ = load_actor_critic(cfg, load_tokenizer(str(noisy)))
    ac.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(ac.policy(ids).logits, ac.policy(ids).logits)


# --------------------------------------------------------------------------- the loop


def test_first_update_starts_at_ratio_one_and_logs_every_metric(
    tiny_model_dir, ppo_files, tmp_path
):
    """With one epoch of one minibatch, the update's forward pass must reproduce the rollout's
    log-probs exactly: any mismatch (temperature, positions, dropout) shows as approx_kl > 0."""
    cfg = ppo_config(tiny_model_dir, ppo_files, "train.max_steps=2", "ppo.ppo_epochs=1")
    run_ppo(cfg, tmp_path / "run")
    first = read_metrics(tmp_path / "run/metrics.jsonl")[0]
    assert first["policy/approx_kl"] < 1e-7 and first["policy/clipfrac"] == 0.0
    assert first["kl/mean"] == 0.0  # policy == reference before any update
    required = [
        "reward/score_mean",
        "reward/score_std",
        "reward/total_mean",
        "kl/mean",
        "kl/coef",
        "policy/loss",
        "policy/clipfrac",
        "policy/approx_kl",
        "policy/entropy",
        "value/loss",
        "value/clipfrac",
        "value/explained_var",
        "response/length_mean",
        "response/eos_frac",
        "time/rollout_s",
        "time/train_s",
        "throughput/tokens_per_s",
    ]
    assert not [k for k in required if k not in first]
    samples = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 20
    assert {"prompt", "response", "score", "kl", "ended"} <= samples[0].keys()


def blue_overrides(files) -> list[str]:
    """The learning tests: the peaked model, rewarded for saying 'blue'."""
    return [
        f"reward.terms=[{{name: '{files[1]}:says_blue'}}]",
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.target_modules=[lm_head]",
        "optim.lr=3e-3",
    ]


def test_rule_reward_rises_while_kl_stays_bounded(peaked_model_dir, ppo_files, tmp_path):
    cfg = ppo_config(
        peaked_model_dir,
        ppo_files,
        *blue_overrides(ppo_files),
        "train.max_steps=20",
        "ppo.kl.coef=0.05",
    )
    run_ppo(cfg, tmp_path / "run")
    score, kl = series(tmp_path / "run", "reward/score_mean"), series(tmp_path / "run", "kl/mean")
    assert mean(score[-4:]) > mean(score[:4]) + 0.3, score
    assert max(kl) < 8.0, kl  # 8 tokens: under 1 nat per token


def test_kl_coefficient_sets_how_far_the_policy_moves(peaked_model_dir, ppo_files, tmp_path):
    """β is the regularisation strength: huge β pins the policy to the reference (KL ~ 0,
    reward flat); β = 0 lets KL grow much faster than a moderate β does. One 16-step run's
    KL varies by 2x from seed to seed, so β = 0 and β = 0.05 are each averaged over 2 seeds."""
    kl_end, score = {}, {}
    for beta, seeds in ((0.0, (0, 1)), (0.05, (0, 1)), (50.0, (0,))):
        kls = []
        for seed in seeds:
            out = tmp_path / f"beta-{beta}-seed-{seed}"
            cfg = ppo_config(
                peaked_model_dir,
                ppo_files,
                *blue_overrides(ppo_files),
                "train.max_steps=16",
                f"ppo.kl.coef={beta}",
                f"train.seed={seed}",
            )
            run_ppo(cfg, out)
            kls.append(mean(series(out, "kl/mean")[-4:]))
            score.setdefault(beta, series(out, "reward/score_mean"))  # seed 0's
        kl_end[beta] = mean(kls)
    gain = {beta: mean(s[-4:]) - mean(s[:4]) for beta, s in score.items()}
    assert abs(kl_end[50.0]) < 0.1, kl_end
    # Flat: within the noise of a mean of 40 binary rewards (σ ≈ 0.08), and below β = 0.05's.
    assert abs(gain[50.0]) < 0.25 and gain[50.0] < gain[0.05], gain
    assert kl_end[0.0] > 1.5 * kl_end[0.05] > 0, kl_end


def test_lora_reference_is_the_same_backbone_with_adapters_off(tiny_model_dir, ppo_files):
    from transformers import AutoModelForCausalLM

    from tether.models.loading import load_tokenizer
    from tether.rollout.actor_critic import load_actor_critic
    from tether.rollout.passes import build_batch, sequence_logprobs_of

    cfg = ppo_config(tiny_model_dir, ppo_files, "model.lora.enabled=true", "model.lora.r=4")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ac, reference = load_actor_critic(cfg, tokenizer)
    assert reference is None  # no second copy of the weights
    with torch.no_grad():  # move the adapters so policy and reference differ
        for name, p in ac.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = build_batch([[5, 6, 7]], [[8, 9, 10]], tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        with ac.as_reference() as ref:
            ref_logprobs = sequence_logprobs_of(ref, batch, 1.0)
        policy_logprobs = sequence_logprobs_of(ac.policy, batch, 1.0)
        base_logprobs = sequence_logprobs_of(base, batch, 1.0)
    assert torch.allclose(ref_logprobs, base_logprobs, atol=1e-5)
    assert not torch.allclose(policy_logprobs, base_logprobs, atol=1e-3)


def test_constant_scores_with_running_normalisation_stay_finite(
    tiny_model_dir, ppo_files, tmp_path
):
    """A first batch whose scores are all equal has std 0: normalising must not divide by it."""
    _, reward = ppo_files
    cfg = ppo_config(
        tiny_model_dir,
        ppo_files,
        "train.max_steps=2",
        f"reward.terms=[{{name: '{reward}:constant'}}]",
        "reward.normalize=true",
    )
    run_ppo(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    assert all(isinstance(m["train/loss"], float) for m in metrics)  # NaN is logged as a str
    assert metrics[0]["reward/total_mean"] == 0.0


def test_separate_critic_and_gold_judge(tiny_model_dir, ppo_files, tmp_path):
    """critic.kind=separate: a backbone of its own, trained by the value loss, gives the
    values and is saved as final/critic/ (no value head on the policy). The gold judge is
    logged per step and per sample."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tether.config import ModelConfig
    from tether.models.loading import load_tokenizer
    from tether.models.reward_model import load_reward_backbone

    _, reward = ppo_files
    cfg = ppo_config(
        tiny_model_dir,
        ppo_files,
        "train.max_steps=2",
        "critic.kind=separate",
        f"reward.gold={reward}:response_chars",
        "rollout.samples_every=1",
    )
    final = run_ppo(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    samples = [json.loads(x) for x in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    step1 = [s for s in samples if s["step"] == 1]
    assert metrics[0]["gold/mean"] == pytest.approx(mean([len(s["response"]) for s in step1]))
    assert all(s["gold"] == len(s["response"]) for s in samples)

    # The values are the separate critic's: its head starts random (a new value head starts
    # at 0, whose step-1 explained variance is exactly 0), and the value loss is taken.
    assert metrics[0]["value/explained_var"] != 0.0
    assert all(0 < m["value/loss"] < float("inf") for m in metrics)
    # Trained: head and backbone moved from the critic's seeded start.
    assert (final / "critic").is_dir() and not (final / "value_head.safetensors").exists()
    start = load_reward_backbone(
        ModelConfig(name=str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), cfg.train.seed
    ).state_dict()
    critic = AutoModelForSequenceClassification.from_pretrained(final / "critic").state_dict()
    assert not torch.equal(critic["score.weight"], start["score.weight"])
    backbone = [k for k in start if k.startswith("model.layers.")]
    assert any(not torch.equal(critic[k], start[k]) for k in backbone)
    # A backbone of its own: the policy's trained weights are not the critic's.
    policy = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(critic[k], policy[k]) for k in backbone)


# --------------------------------------------------------------------------- critic-free


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_algorithms_raise_a_rule_reward(peaked_model_dir, ppo_files, tmp_path, algo):
    cfg = ppo_config(
        peaked_model_dir,
        ppo_files,
        *blue_overrides(ppo_files),
        f"algo={algo}",
        "train.batch_size=5",
        "rollout.samples_per_prompt=4",
        "train.max_steps=20",
    )
    run_ppo(cfg, tmp_path / "run")
    score = series(tmp_path / "run", "reward/score_mean")
    assert mean(score[-4:]) > mean(score[:4]) + 0.3, score
    first = read_metrics(tmp_path / "run/metrics.jsonl")[0]
    assert "value/loss" not in first  # no critic
    if algo == "grpo":  # KL is a loss term (k3), not part of the reward
        assert "kl/loss" in first
        assert first["reward/total_mean"] == pytest.approx(first["reward/score_mean"])


def test_grpo_cli_defaults_and_group_size_check(tiny_model_dir, ppo_files, tmp_path):
    from tether.config import GRPOConfig

    cfg = load_config(GRPOConfig, None, ppo_overrides(tiny_model_dir, ppo_files))
    assert (cfg.algo, cfg.rollout.samples_per_prompt) == ("grpo", 4)
    assert cfg.ppo.kl.resolved(cfg.algo) == ("loss", "k3")
    with pytest.raises(ConfigError, match=r"samples_per_prompt' must be >= 2 for algo rloo"):
        ppo_config(tiny_model_dir, ppo_files, "algo=rloo")


@pytest.mark.parametrize("algo", ["reinforce", "a2c"])
def test_single_pass_algorithms_take_one_unclipped_step(tiny_model_dir, ppo_files, tmp_path, algo):
    """REINFORCE and A2C: one optimizer step per rollout, so the ratio is exactly 1 when the
    loss is taken and nothing is clipped, whatever ppo.ppo_epochs says."""
    cfg = ppo_config(tiny_model_dir, ppo_files, f"algo={algo}", "train.max_steps=3")
    run_ppo(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run/metrics.jsonl")
    assert all(m["policy/approx_kl"] < 1e-7 and m["policy/clipfrac"] == 0 for m in metrics)
    assert ("value/loss" in metrics[0]) == (algo == "a2c")
    assert metrics[-1]["kl/mean"] != 0  # but the policy did move


@pytest.mark.parametrize(
    ("algo", "reused", "fresh"),
    [
        # one update over the whole batch: the rollout's pass is the update's only forward
        ("grpo", [True], [False, True]),
        ("a2c", [True], [False, True]),
        # 2 epochs x 2 minibatches of 4 rows: the first of the update's four is the rollout's
        ("ppo", [False, True, True, True, True], [False, False, True, True, True, True]),
    ],
)
def test_the_update_starts_from_the_rollouts_forward(
    peaked_model_dir, ppo_files, tmp_path, monkeypatch, algo, reused, fresh
):
    """The update's first micro-batch runs at the rollout's weights, so the rollout's policy
    pass over its rows, run with its graph, is that micro-batch's forward: one policy forward
    fewer per step. Its first step is the one of the same run with every forward run afresh,
    within float rounding; later steps are not compared: rounding in the first one's weights
    becomes other samples a step or two later."""
    from tether.rollout import actor_critic
    from tether.stages import ppo

    calls = []
    real_forward = actor_critic.ActorCritic.forward_responses

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(actor_critic.ActorCritic, "forward_responses", counted)
    common = [f"algo={algo}", "train.max_steps=2"]
    common += {
        "grpo": ["train.batch_size=4", "ppo.ppo_epochs=1", "rollout.samples_per_prompt=2"],
        "a2c": ["train.batch_size=4", "ppo.ppo_epochs=1"],
        "ppo": ["train.batch_size=8", "ppo.ppo_epochs=2", "ppo.num_minibatches=2"],
    }[algo]
    run_ppo(ppo_config(peaked_model_dir, ppo_files, *common), tmp_path / "reused")
    assert calls == reused * 2  # grad enabled or not, per policy forward
    calls.clear()
    monkeypatch.setattr(ppo, "first_micro_batch", lambda *args: None)
    run_ppo(ppo_config(peaked_model_dir, ppo_files, *common), tmp_path / "fresh")
    assert calls == fresh * 2
    reused_run = read_metrics(tmp_path / "reused/metrics.jsonl")
    if len(reused) == 1:  # π_old is the update's own forward, detached: the ratio is 1
        assert all(m["policy/approx_kl"] == 0.0 for m in reused_run)
    first, fresh_first = reused_run[0], read_metrics(tmp_path / "fresh/metrics.jsonl")[0]
    for key in ["train/loss", "policy/loss", "train/grad_norm", "kl/mean"]:
        assert first[key] == pytest.approx(fresh_first[key], rel=1e-4, abs=1e-6), key


# --------------------------------------------------------------------------- resume, bad input


def test_truncated_sampling_is_refused_before_anything_loads(tiny_model_dir, ppo_files, tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.top_p/top_k"):
        ppo_config(tiny_model_dir, ppo_files, "rollout.top_p=0.9")
    with pytest.raises(ConfigError, match=r"ppo\.num_minibatches"):
        ppo_config(tiny_model_dir, ppo_files, "ppo.num_minibatches=3")  # 3 does not divide 10


def test_bad_prompt_file_fails_with_file_and_line(tiny_model_dir, ppo_files, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 42}\n')
    _, reward = ppo_files
    args = ["ppo", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "r")]
    args += ["--set", f"reward.terms=[{{name: '{reward}:vowel_share'}}]"]
    proc = run_cli(args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}:2: field 'prompt'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r/checkpoints").exists()
