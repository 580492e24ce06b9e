"""The KL inspector on tiny models: per-token numbers that add up to the trainers' quantities."""

from __future__ import annotations

import pytest
import torch
from test_sft import run_cli

from tether.models.loading import load_tokenizer
from tether.tools.inspector import Inspector


@pytest.fixture(scope="module")
def shifted_policy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output embeddings nudged: a 'policy' that differs from it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
    out = tmp_path_factory.mktemp("policy")
    model.save_pretrained(out)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(out)
    return out


def full_forward_answer_logprob(model_dir, prompt: str, response: str) -> float:
    """log p(answer | prompt) from one unpadded forward pass of plain transformers."""
    from transformers import AutoModelForCausalLM

    from tether.rollout.generation import encode_answer, encode_prompt

    tokenizer = load_tokenizer(str(model_dir))
    messages = [{"role": "user", "content": prompt}]
    p, a = encode_prompt(tokenizer, messages), encode_answer(tokenizer, messages, response)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0].float(), -1)
    return sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(a))


def test_token_rows_add_up_to_the_sequence_kl(tiny_model_dir, shifted_policy_dir):
    inspector = Inspector(str(shifted_policy_dir), str(tiny_model_dir))
    prompt, responses = "Is the sky blue?", ["Yes.", "Indeed, resplendently and gloriously so."]
    results = inspector.inspect(prompt, responses)
    for result, response in zip(results, responses, strict=True):
        assert result.tokens[-1].text == "<|im_end|>"  # the EOS the policy must also emit
        policy = full_forward_answer_logprob(shifted_policy_dir, prompt, response)
        reference = full_forward_answer_logprob(tiny_model_dir, prompt, response)
        assert sum(t.logprob for t in result.tokens) == pytest.approx(policy, abs=1e-3)
        assert result.kl == pytest.approx(policy - reference, abs=1e-3)
    same = Inspector(str(tiny_model_dir), str(tiny_model_dir)).inspect(prompt, responses)
    assert all(t.log_ratio == 0.0 for r in same for t in r.tokens)


def test_cli_terminal_and_html(tiny_model_dir, shifted_policy_dir, tmp_path):
    page = tmp_path / "kl.html"
    args = ["inspect", "--policy", str(shifted_policy_dir), "--reference", str(tiny_model_dir)]
    args += ["--prompt", "Is the sky blue?", "--response", "Yes.", "--response", "No."]
    proc = run_cli([*args, "--html", str(page), "--beta", "0.1"])
    assert "response 1:" in proc.stdout and "response 2:" in proc.stdout
    assert "penalty β·KL" in proc.stdout and "\033[" not in proc.stdout  # no colour in a pipe
    text = page.read_text()
    assert "Response 2" in text and "log-ratio" in text and "http" not in text  # no network
    bad = run_cli([*args[:5], "--prompt", "hi"], check=False)
    assert bad.returncode == 2 and "--prompt needs at least one --response" in bad.stderr


def test_critic_values_and_advantages_from_a_ppo_run(tiny_model_dir, ppo_files, tmp_path):
    """PPO saves its value head with the policy; inspect reads it back and shows V_t and the
    GAE advantage of each token under r_t = −β·log-ratio_t (no reward model: no score)."""
    from test_ppo import ppo_config

    from tether.stages.ppo import VALUE_HEAD_FILE, run_ppo

    final = run_ppo(ppo_config(tiny_model_dir, ppo_files, "train.max_steps=2"), tmp_path / "run")
    assert (final / VALUE_HEAD_FILE).is_file()
    inspector = Inspector(str(final), str(tiny_model_dir), critic=str(final), beta=0.1)
    tokens = inspector.inspect("Write about tea.", ["Tea is warm."])[0].tokens
    assert all(t.value is not None for t in tokens)
    last = tokens[-1]  # after the last token V = 0: A_T = r_T − V_T
    assert last.advantage == pytest.approx(-0.1 * last.log_ratio - last.value, abs=1e-5)
    before = tokens[-2]  # A_{T−1} = r + V_T − V_{T−1} + γλ·A_T
    expected = -0.1 * before.log_ratio + last.value - before.value + 0.95 * last.advantage
    assert before.advantage == pytest.approx(expected, abs=1e-5)
